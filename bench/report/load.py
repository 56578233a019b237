"""Results files into pandas: one row per (environment, case), the environments, and what was skipped.

Every other module of :mod:`bench.report` reads results through :func:`load_results` and the names defined
here: the columns that make a curve, the status labels, :func:`ok_rows` and :func:`iter_curves`.

Environments are never silently merged. Every record gets an ``env_id`` (a short hash of
:func:`bench.results.env_identity`), and every grouping of the report includes it: a curve (all the lengths
of one implementation at one shape, mode, device, dtype and scope) lives in exactly one environment.

A case is measured in several worker processes, a record each; they are pooled into one row
(:mod:`bench.pooling`). A case measured again in the same environment (a ``--force`` or ``--retry-failed``
run, or the same file given twice) keeps its latest measurement: files in the order given, lines in file
order; the number of records replaced is reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.cases import Case, GridError
from bench.pooling import CaseGroups
from bench.results import NUMERIC_FIELDS, STATUSES, ResultsError, env_identity, iter_records, supports_text

# every field but seq_len: the points of one scaling curve share these (env_id first: never merge environments)
CURVE_COLUMNS = (
    "env_id",
    "scope",
    "device",
    "dtype",
    "causal",
    "mode",
    "batch",
    "heads",
    "kv_heads",
    "q_len",
    "head_dim",
    "depth",
    "residual",
    "impl",
    "params",
)
# a curve without its implementation: curves that share these can be compared with each other
PEER_COLUMNS = tuple(c for c in CURVE_COLUMNS if c not in ("impl", "params"))
# a compiled case's curve is its implementation's name with this (eager and compiled side by side everywhere)
COMPILED_SUFFIX = "+compiled"
STATUS_LABELS = {"oom": "OOM", "timeout": "timeout", "skipped": "skipped", "error": "error", "crashed": "crashed"}


# ---------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Results:
    """The records of one or more results files, one row per (environment, case)."""

    frame: pd.DataFrame
    environments: pd.DataFrame  # one row per env_id
    paths: tuple[str, ...]
    problems: tuple[str, ...]  # lines skipped, one sentence each
    superseded: int  # records replaced by a later record of the same case in the same environment
    # records per environment, executor, lane and GPU (bench.measure.lanes): where the cases ran
    lanes: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    @property
    def env_ids(self) -> list[str]:
        return sorted(self.environments["env_id"])


def env_id_of(env: Mapping[str, Any]) -> str:
    """A short, stable name for an environment identity: the same machine setup always gets the same id."""
    identity = json.dumps(list(env_identity(dict(env))), sort_keys=True, default=str)
    return hashlib.sha1(identity.encode()).hexdigest()[:8]


def env_label(env: Mapping[str, Any]) -> str:
    """The identity fields in words, e.g. ``vm · Intel Xeon · torch 2.3.0 · 8 threads``."""
    parts = [str(env.get("host")), str(env.get("cpu_model"))]
    if env.get("gpu_name"):
        parts.append(str(env["gpu_name"]))
    parts.append(f"torch {env.get('torch_version')}")
    parts.append(f"{env.get('num_threads')} threads")
    return " · ".join(parts)


# the memory a mode's curves are fitted and drawn by: a decode step's is the cache it reads
MEMORY_COLUMNS = {"decode": "cache_bytes"}


def memory_column(mode: str) -> str:
    """The column of a mode's memory: ``peak_bytes`` of a call, or ``cache_bytes`` for decode."""
    return MEMORY_COLUMNS.get(mode, "peak_bytes")


def params_text(params: Mapping[str, Any]) -> str:
    """An implementation's config as ``k=v,k2=v2`` (sorted; empty for the defaults)."""
    return ",".join(f"{name}={params[name]}" for name in sorted(params))


def record_problem(record: Mapping[str, Any]) -> str | None:
    """Why a record does not meet the schema (None when it does)."""
    if record.get("status") not in STATUSES:
        return f"unknown status {record.get('status')!r}"
    if not isinstance(record.get("case"), dict):
        return "case is not an object"
    try:
        Case.from_dict(record["case"])
    except (GridError, TypeError) as exc:
        return f"invalid case ({exc})"
    if not isinstance(record.get("env", {}), dict):
        return "env is not an object"
    for field in NUMERIC_FIELDS:
        value = record.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{field} is not a number"
    if record["status"] == "ok":
        median = record.get("median_s")
        if median is None or not median > 0:
            return "status ok without a positive median_s"
    samples = record.get("samples")
    if samples is not None and (
        not isinstance(samples, list)
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in samples)
    ):
        return "samples is not a list of numbers"
    return None


def _complexity(
    record: Mapping[str, Any], impl: str, complexities: Mapping[str, Mapping[str, str]] | None
) -> tuple[str | None, str | None]:
    """Time and memory complexity strings: the mapping given, else the record's impl_info, else its meta."""
    for source in ((complexities or {}).get(impl), record.get("impl_info"), record.get("meta")):
        if isinstance(source, Mapping):
            time_text = source.get("time_complexity", source.get("time"))
            memory_text = source.get("memory_complexity", source.get("memory"))
            if time_text or memory_text:
                return time_text, memory_text
    return None, None


def record_row(
    record: Mapping[str, Any],
    *,
    path: str,
    line_number: int,
    complexities: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """One flat row of the analysis frame for a valid record."""
    case = Case.from_dict(record["case"])
    env = record.get("env") or {}
    peaks = env.get("peak_flops_per_s") or {}
    time_text, memory_text = _complexity(record, case.impl, complexities)
    raw_info = record.get("impl_info")
    info: Mapping[str, Any] = raw_info if isinstance(raw_info, Mapping) else {}
    if case.mode == "decode":  # a step's time and its cache's bytes (memory_column) grow alike
        time_text = memory_text = info.get("decode_complexity") or None
    if case.q_len:  # a fixed number of queries against growing keys: self-attention's complexity does not apply
        time_text = memory_text = None
    row: dict[str, Any] = {
        "env_id": env_id_of(env),
        "scope": case.scope,
        "device": case.device,
        "dtype": case.dtype,
        "causal": case.causal,
        "mode": case.mode,
        "batch": case.batch,
        "heads": case.heads,
        "kv_heads": case.key_value_heads,
        "q_len": case.q_len,  # 0: self-attention
        "head_dim": case.head_dim,
        "depth": case.depth,
        "residual": case.residual,
        "impl": case.impl + COMPILED_SUFFIX if case.compile else case.impl,  # compiled: a curve of its own
        "base_impl": case.impl,
        "compiled": case.compile,
        "params": params_text(case.params_dict()),
        "seq_len": case.seq_len,
        "case_key": case.key(),
        "status": record["status"],
        "message": record.get("message"),
        "samples": list(record.get("samples") or []),
        "noisy": record.get("noisy"),
        "unstable": record.get("unstable"),
        "process_medians_s": list(record.get("process_medians_s") or []),
        "processes": record.get("processes") or 1,
        "timer": record.get("timer"),
        "sdpa_backend": record.get("sdpa_backend"),
        "memory_method": record.get("memory_method"),
        "peak_flops_per_s": peaks.get(f"{case.device}/{case.dtype}"),
        "time_complexity": time_text,
        "memory_complexity": memory_text,
        "exact": info.get("exact"),
        "supports": supports_text(info),
        "run_id": record.get("run_id"),
        "git_commit": env.get("git_commit"),
        "timestamp": env.get("timestamp"),
        "source_path": path,
        "line_number": line_number,
    }
    for field in NUMERIC_FIELDS:
        value = record.get(field)
        row[field] = float(value) if value is not None else math.nan
    return row


def _environment_row(env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "env_id": env_id_of(env),
        "label": env_label(env),
        "host": env.get("host"),
        "cpu_model": env.get("cpu_model"),
        "gpu_name": env.get("gpu_name"),
        "torch_version": env.get("torch_version"),
        "num_threads": env.get("num_threads"),
        "python_version": env.get("python_version"),
        "cuda_version": env.get("cuda_version"),
        "platform": env.get("platform"),
        "cpu_cores_logical": env.get("cpu_cores_logical"),
    }


def load_results(
    paths: Iterable[str | Path], *, complexities: Mapping[str, Mapping[str, str]] | None = None
) -> Results:
    """Read and check results files; raises :class:`ResultsError` when none of them holds a usable record.

    ``complexities`` maps an implementation name to ``{"time_complexity": "O(n^2 d)", "memory_complexity":
    "O(n^2)"}``; it overrides what the records carry (``impl_info``, or an optional ``meta`` object).
    """
    names = [str(p) for p in paths]
    groups = CaseGroups()
    problems: list[str] = []
    envs: dict[str, dict[str, Any]] = {}
    lanes: Counter = Counter()
    for path in names:
        for line_number, record, problem in iter_records(path):
            if problem is not None:
                problems.append(str(problem))
                continue
            assert record is not None
            reason = record_problem(record)
            if reason is None:
                env = record.get("env") or {}
                key = (env_id_of(env), Case.from_dict(record["case"]).key())
                reason = groups.add(key, record, extra=(path, line_number))
            if reason is not None:
                problems.append(f"{path}:{line_number}: {reason}; line skipped")
                continue
            envs.setdefault(env_id_of(env), _environment_row(env))
            if record.get("lane"):
                lanes[(env_id_of(env), record.get("executor"), record["lane"], env.get("gpu_uuid"))] += 1
    rows = [
        record_row(record, path=path, line_number=line_number, complexities=complexities)
        for _key, record, (path, line_number) in groups
    ]
    if not rows:
        raise ResultsError(f"no usable result records in {', '.join(names)}")
    frame = pd.DataFrame(rows)
    frame = _with_labels(frame)
    frame = frame.sort_values([*CURVE_COLUMNS, "seq_len"], kind="stable").reset_index(drop=True)
    environments = pd.DataFrame(sorted(envs.values(), key=lambda row: row["env_id"]))
    environments = _environment_summary(environments, frame)
    return Results(
        frame=frame,
        environments=environments,
        paths=tuple(names),
        problems=tuple(problems),
        superseded=groups.superseded,
        lanes=pd.DataFrame(
            [(*key, count) for key, count in sorted(lanes.items(), key=lambda item: tuple(map(str, item[0])))],
            columns=["env_id", "executor", "lane", "gpu_uuid", "records"],
        ),
    )


def _with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        label=[curve_label(impl, params) for impl, params in zip(frame["impl"], frame["params"], strict=True)]
    )


def _environment_summary(environments: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """Per environment: record count, git commits and the span of run timestamps (all from the records)."""
    extra = []
    for env_id in environments["env_id"]:
        rows = frame[frame["env_id"] == env_id]
        stamps = sorted(str(t) for t in rows["timestamp"].dropna().unique())
        commits = sorted(str(c) for c in rows["git_commit"].dropna().unique())
        peaks = sorted(
            f"{device}/{dtype}={peak:.3g}"
            for (device, dtype), peak in rows.groupby(["device", "dtype"])["peak_flops_per_s"].first().items()
            if pd.notna(peak)
        )
        extra.append(
            {
                "records": len(rows),
                "git_commits": ",".join(commits),
                "first_timestamp": stamps[0] if stamps else None,
                "last_timestamp": stamps[-1] if stamps else None,
                "peak_flops_per_s": ",".join(peaks),
            }
        )
    return pd.concat([environments.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def curve_label(impl: str, params: str) -> str:
    """How a curve is named in tables and legends: the impl, with its non-default config in brackets."""
    return f"{impl}[{params}]" if params else impl


# ---------------------------------------------------------------- reading the frame


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the cases that ran (status ``ok``)."""
    return frame[frame["status"] == "ok"]


def iter_curves(frame: pd.DataFrame) -> Iterable[tuple[tuple, pd.DataFrame]]:
    """(curve key, its rows sorted by length) in sorted order."""
    for key, rows in frame.groupby(list(CURVE_COLUMNS), sort=True):
        yield key, rows.sort_values("seq_len")
