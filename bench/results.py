"""Results files: one JSON record per line, appended and synced as each case ends.

Schema history (``schema_version``):
  1 — first version: case, status, message, timing (median_s, iqr_s, min_s,
      mean_s, samples, n_samples, calls_per_sample, noisy, measured_s),
      memory (peak_bytes, rss_peak_bytes, rss_before_bytes, memory_method),
      flops, achieved_flops_per_s, peak_flops_per_s, rel_error, estimate_bytes,
      env, run_id, wall_s, impl_info (name, family, paper, time_complexity,
      memory_complexity, exact, causal, source).

Never imports torch: reports are rebuilt from ``results/`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "timeout", "error", "crashed", "skipped")
# env fields that must agree for two records to be comparable (and for a finished case to be reused)
ENV_IDENTITY_FIELDS = ("host", "cpu_model", "gpu_name", "torch_version", "num_threads")


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


def env_identity(env: dict[str, Any]) -> tuple:
    return tuple(env.get(field) for field in ENV_IDENTITY_FIELDS)


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
    """Appends records to a JSONL file; each write is flushed and fsynced before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - kept open for the sweep
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() > 0:
            self._file.seek(-1, os.SEEK_END)
            last = self._file.read(1)
            self._file.seek(0, os.SEEK_END)
            if last != b"\n":  # a line cut by a kill: start the next record on a line of its own
                self._write_bytes(b"\n")

    def _write_bytes(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: dict[str, Any]) -> None:
        record = _sanitize({"schema_version": SCHEMA_VERSION, **record})
        self._write_bytes((dumps(record) + "\n").encode())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, Problem | None]]:
    """(line number, record or None, problem or None) for each non-blank line."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
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
            yield number, record, None


def read_records(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """All valid records of the files, and the lines that were skipped."""
    records: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for path in paths:
        for _, record, problem in iter_records(path):
            if record is not None:
                records.append(record)
            if problem is not None:
                problems.append(problem)
    return records, problems
