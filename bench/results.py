"""Results files: the record's fields, and JSONL read and written one record per line.

A sweep appends each record and syncs it to disk as its case ends, holding an exclusive lock on the
file so that one run at a time writes it; readers are bounded per line (``MAX_LINE_BYTES``) and report
the lines they skip (:class:`Problem`) the same way for every command.

Schema history (``schema_version``):
  1 — the fields of ``RECORD_FIELDS`` below. Fields added since are optional (a record without ``process``
      is process 0 of its case), so every version-1 file stays readable. ``rel_error`` (random inputs) was
      renamed ``rel_error_random`` when the input families came (bench.families): readers rename it. A case
      without ``compile`` is eager (``Case.to_dict`` leaves it out when false).

Never imports torch: reports are rebuilt from ``results/`` alone.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.families import ERROR_FIELDS, LEGACY_ERROR_FIELDS
from bench.outputs import OutputError, check_regular_file, make_parents, reason, remove_created

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "timeout", "error", "crashed", "skipped")
# a case that ran and did not finish: ``--retry-failed`` runs these again
FAILED_STATUSES = ("error", "timeout", "oom", "crashed")
# env fields that must agree for two records to be comparable (and for a finished case to be reused)
# (the conditions too: TF32, the FLOP convention, the GPU's driver, CUDA and cuDNN, the C allocator's setting)
ENV_IDENTITY_FIELDS = (
    "host",
    "cpu_model",
    "gpu_name",
    "gpu_driver",
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "num_threads",
    "tf32",
    "flop_convention",
    "allocator",
)
# what an implementation declares it runs beyond non-causal self-attention (``impl_info``), in words
SUPPORT_WORDS = {"causal": "causal", "grouped_heads": "GQA", "cross": "cross", "decode": "decode"}
# a longer line is no record of ours: it is reported and skipped without being held in memory
MAX_LINE_BYTES = 16 * 2**20
_SKIP_CHUNK_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "number", "text", "bool", "list", "object"
    doc: str
    in_tables: bool = True  # a number the report's tables carry


# Every field a record may have: the one declaration (the writer refuses any other key).
RECORD_FIELDS = (
    Field("schema_version", "number", "version of this layout (see the history above)", in_tables=False),
    Field("run_id", "text", "one id per `attnbench run`"),
    Field("case", "object", "the case key: bench.cases.Case.to_dict()"),
    Field("status", "text", "one of STATUSES"),
    Field("message", "text", "one line for anything not ok"),
    Field("impl_info", "object", "the implementation's metadata: name, family, paper, complexities, exact, ..."),
    Field("meta", "object", "optional, from other producers: time_complexity and memory_complexity"),
    Field("env", "object", "the environment probe: host, CPU, GPU, versions, threads, matmul peaks, free memory"),
    Field("median_s", "number", "median seconds per call (pooled over processes: the fastest process's median)"),
    Field("pooled_median_s", "number", "pooled records only: the median of every process's samples"),
    Field("iqr_s", "number", "interquartile range of the per-call samples"),
    Field("min_s", "number", "fastest sample, seconds per call"),
    Field("mean_s", "number", "mean of the samples, seconds per call"),
    Field("samples", "list", "seconds per call, one value per sample"),
    Field("n_samples", "number", "how many samples"),
    Field("calls_per_sample", "number", "back-to-back calls timed as one sample"),
    Field("timer", "text", "clock (perf_counter after syncing the case's device) or cuda-events"),
    Field("noisy", "bool", "IQR / median above 0.1"),
    Field("process", "number", "which of the run's worker processes measured this record (0: the first)", False),
    Field("processes", "number", "worker processes that measure each case (pooled: those that finished ok)", False),
    Field("process_medians_s", "list", "pooled records only: each process's median"),
    Field("process_spread", "number", "pooled: range of the process medians over the fastest"),
    Field("within_spread", "number", "pooled: median over processes of IQR / median"),
    Field("unstable", "bool", "pooled: the processes disagree (bench.pooling) or one did not finish"),
    Field("measured_s", "number", "seconds inside timed calls, warm-up included"),
    Field("peak_bytes", "number", "allocator-level peak above what was resident before the call"),
    Field("rss_peak_bytes", "number", "process RSS high-water mark during the call"),
    Field("rss_before_bytes", "number", "process RSS before the call", in_tables=False),
    Field("memory_method", "text", "how peak_bytes was measured"),
    Field("cache_bytes", "number", "decode: bytes of the cache a step reads (keys and values, a window, a state)"),
    Field("sdpa_backend", "text", "the scaled_dot_product_attention backends the call ran (flash, math, ...)"),
    Field("flops", "number", "floating-point operations of one call"),
    Field("achieved_flops_per_s", "number", "flops / median_s"),
    Field("roofline", "number", "achieved FLOP/s over the matmul peak measured at the start of the run"),
    *(
        Field(field, "number", f"||out - exact|| / ||exact|| on {family} inputs (float64 reference; bench.families)")
        for family, field in ERROR_FIELDS.items()
    ),
    Field("compile_s", "number", "--compile on: seconds the untimed compiling calls took beyond as many medians"),
    Field("compile_calls", "number", "--compile on: untimed calls until one compiled nothing new (at most 3)"),
    Field("compiled_graphs", "number", "--compile on: graphs compiled before timing (above 1: graph breaks)"),
    Field("recompiles", "number", "--compile on: graphs compiled during the timed calls (their samples include it)"),
    Field("estimate_bytes", "number", "the memory the runner expected the case to need"),
    Field("wall_s", "number", "seconds the worker spent on the case, set-up included"),
    Field(
        "lane",
        "text",
        "the lane that ran it (bench.measure.lanes: cpu, cpu[2-3], cuda:1, ...); none when skipped",
        False,
    ),
    Field("executor", "text", "what ran the sweep's cases: local or ray", False),
)
FIELD_NAMES = tuple(f.name for f in RECORD_FIELDS)
# the numbers a record may carry, in the order the report's tables show them
NUMERIC_FIELDS = tuple(f.name for f in RECORD_FIELDS if f.kind == "number" and f.in_tables)


class ResultsError(Exception):
    """A results file that can not be used at all (wrong schema, unreadable): one line for the user."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A line of a results file that was skipped."""

    path: str
    line_number: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.reason}; line skipped"


def first_line(exc: BaseException) -> str:
    """An exception as the one-line ``message`` of a record."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# the value of an identity field in records written before the field existed (attnbench never set the
# allocator then: such a run used the platform's default unless its user had set one)
ENV_IDENTITY_DEFAULTS = {"allocator": "default"}


def env_identity(env: dict[str, Any]) -> tuple:
    return tuple(env.get(field, ENV_IDENTITY_DEFAULTS.get(field)) for field in ENV_IDENTITY_FIELDS)


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sanitize(value: Any) -> Any:
    """NaN and infinities are not JSON: store them as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return value


class ResultsWriter:
    """Appends records to a JSONL file under an exclusive lock; each write is flushed and fsynced.

    Opening it checks everything a sweep needs before any case runs: the path is a regular file (or can
    be created as one) and no other run holds its lock. If nothing was written by the time it closes,
    it removes what it created (the file and the folders above it), so a refused or failed run leaves
    nothing behind. Raises :class:`ResultsError` with one line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._written = False
        try:
            check_regular_file(self.path)
            existed = self.path.exists()
            self._created = make_parents(self.path)
        except OutputError as exc:
            raise ResultsError(str(exc)) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            remove_created(self._created)
            raise ResultsError(f"cannot write {self.path}: {reason(exc)}") from None
        if not existed:
            self._created.append(self.path)
        self._file = os.fdopen(fd, "a+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            remove_created(self._created)
            raise ResultsError(
                f"{self.path} is being written by another attnbench run: wait for it to end or choose another --out"
            ) from None

    def _ends_mid_line(self) -> bool:
        size = self._file.seek(0, os.SEEK_END)
        if size == 0:
            return False
        self._file.seek(-1, os.SEEK_END)
        return self._file.read(1) != b"\n"

    def _write_bytes(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: dict[str, Any]) -> None:
        unknown = set(record) - set(FIELD_NAMES)
        if unknown:
            raise ValueError(f"record fields not declared in RECORD_FIELDS: {', '.join(sorted(unknown))}")
        record = _sanitize({"schema_version": SCHEMA_VERSION, **record})
        line = (dumps(record) + "\n").encode()
        if not self._written and self._ends_mid_line():  # a line cut by a kill: start on a line of its own
            line = b"\n" + line
        self._write_bytes(line)
        self._written = True

    def close(self) -> None:
        self._file.close()  # releases the lock
        if not self._written:
            remove_created(self._created)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_lines(handle) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) for each line; a line over MAX_LINE_BYTES is skipped in chunks, never held whole."""
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw, False
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(_SKIP_CHUNK_BYTES)
        yield b"", True


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, Problem | None]]:
    """(line number, record or None, problem or None) for each non-blank line."""
    path = Path(path)
    try:
        check_regular_file(path)
    except OutputError as exc:
        raise ResultsError(str(exc)) from None
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, (raw, too_long) in enumerate(_read_lines(handle), start=1):
            if too_long:
                yield number, None, Problem(str(path), number, f"line longer than {MAX_LINE_BYTES // 2**20} MiB")
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                reason = "truncated line" if not raw.endswith(b"\n") else "corrupt line (not JSON)"
                yield number, None, Problem(str(path), number, reason)
                continue
            if not isinstance(record, dict) or "case" not in record or "status" not in record:
                yield number, None, Problem(str(path), number, "not a result record")
                continue
            version = record.get("schema_version")
            if version != SCHEMA_VERSION:
                raise ResultsError(
                    f"{path}:{number}: written with results schema version {version}, "
                    f"this attnbench reads version {SCHEMA_VERSION}"
                )
            for old, new in LEGACY_ERROR_FIELDS.items():
                if old in record:
                    record.setdefault(new, record.pop(old))
            yield number, record, None


def summarize_problems(problems: Iterable[object], *, limit: int = 10) -> list[str]:
    """The skipped lines as warning lines, the first ``limit`` named and the rest counted."""
    items = [str(p) for p in problems]
    lines = [f"warning: {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"warning: {len(items) - limit} more lines skipped")
    return lines


def supports_text(info: Mapping[str, Any]) -> str | None:
    """``"causal, GQA, cross, decode"`` from an implementation's metadata (``ImplSpec.describe()``, a record's
    ``impl_info``); None for metadata from before the shapes beyond self-attention were declared."""
    if "decode" not in info:
        return None
    return ", ".join(word for key, word in SUPPORT_WORDS.items() if info.get(key)) or "–"
