"""Export results to other tools' formats: ``attnbench export RESULTS --format pytest-benchmark --out FILE``.

The pytest-benchmark format is the JSON that ``pytest --benchmark-save`` writes and that
``pytest-benchmark compare FILE --group-by=param:seq_len`` reads: ``machine_info``, ``commit_info``,
``benchmarks`` (one per ok case: ``group``, ``name``, ``fullname``, ``params``, ``param``, ``extra_info``,
``options``, ``stats``), ``datetime`` and ``version``. Its ``stats`` are computed from the record's raw
samples (seconds per call) with pytest-benchmark's own definitions (quartiles, outliers, ops). One
environment per file, like a pytest-benchmark run: results that mix environments need ``env_id``.

Never imports torch, nor pytest-benchmark (an optional dependency, only needed to read the file).
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from bench.families import ERROR_FIELDS
from bench.report.defaults import EXPORT_FORMATS
from bench.report.load import Results, curve_label, ok_rows

# the version of pytest-benchmark's saved-JSON layout this writer follows (5.x)
PYTEST_BENCHMARK_FORMAT_VERSION = "5.1.0"
_EXTRA_FIELDS = (
    "peak_bytes",
    "rss_peak_bytes",
    "flops",
    "achieved_flops_per_s",
    "roofline",
    *ERROR_FIELDS.values(),
    "noisy",
    "memory_method",
    "run_id",
)
_PARAM_FIELDS = (
    "impl",
    "params",
    "seq_len",
    "mode",
    "device",
    "dtype",
    "batch",
    "heads",
    "head_dim",
    "causal",
    "scope",
    "depth",
    "residual",
)


class ExportError(ValueError):
    """Results that cannot be exported as asked (one line for the user)."""


# ---------------------------------------------------------------- statistics as pytest-benchmark computes them


def _quartiles(data: Sequence[float]) -> tuple[float, float]:
    """Q1 and Q3 by pytest-benchmark's methods (Wikipedia's method 3 for odd counts, method 2 for even)."""
    rounds = len(data)
    if rounds == 1:
        return data[0], data[0]
    if rounds % 2:
        n, q = rounds // 4, rounds % 4
        if q == 1:
            return 0.25 * data[n - 1] + 0.75 * data[n], 0.75 * data[3 * n] + 0.25 * data[3 * n + 1]
        return 0.75 * data[n] + 0.25 * data[n + 1], 0.25 * data[3 * n + 1] + 0.75 * data[3 * n + 2]
    return statistics.median(data[: rounds // 2]), statistics.median(data[rounds // 2 :])


def benchmark_stats(samples: Sequence[float], *, iterations: int = 1) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` object for per-call times ``samples`` (seconds), raw data included."""
    if not samples:
        raise ValueError("no samples")
    data = sorted(float(s) for s in samples)
    rounds = len(data)
    mean = statistics.fmean(data)
    stddev = statistics.stdev(data) if rounds > 1 else 0.0
    q1, q3 = _quartiles(data)
    iqr = q3 - q1
    iqr_outliers = sum(1 for v in data if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr)
    stddev_outliers = sum(1 for v in data if v < mean - stddev or v > mean + stddev)
    if rounds == 1:
        ld15iqr = hd15iqr = data[0]
    else:
        ld15iqr = data[bisect.bisect_left(data, q1 - 1.5 * iqr)]
        # the highest datum within the fence (pytest-benchmark >= 5.3; older releases took the one above it)
        hd15iqr = data[bisect.bisect_right(data, q3 + 1.5 * iqr) - 1]
    total = sum(data)
    return {
        "min": data[0],
        "max": data[-1],
        "mean": mean,
        "stddev": stddev,
        "rounds": rounds,
        "median": statistics.median(data),
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": ld15iqr,
        "hd15iqr": hd15iqr,
        "ops": rounds / total if total else 0.0,
        "total": total,
        "data": [float(s) for s in samples],
        "iterations": int(iterations),
    }


# ---------------------------------------------------------------- the file


def _json_value(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN to null."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def benchmark_id(row: Mapping[str, Any]) -> str:
    """The parametrization id of a case, e.g. ``sdpa-fwd-cpu-float32-b1h8d64-n1024``."""
    parts = [curve_label(row["impl"], row["params"]), row["mode"], row["device"], row["dtype"]]
    parts.append(f"b{row['batch']}h{row['heads']}d{row['head_dim']}")
    if row["causal"]:
        parts.append("causal")
    if row["scope"] == "layers":
        parts.append(f"{row['residual']}{row['depth']}")
    parts.append(f"n{row['seq_len']}")
    return "-".join(str(part) for part in parts)


def _benchmark(row: Mapping[str, Any]) -> dict[str, Any]:
    param = benchmark_id(row)
    samples = row["samples"] or [row["median_s"]]
    calls = row["calls_per_sample"]
    group = f"{row['scope']} {row['mode']} {row['device']} {row['dtype']} n={row['seq_len']}"
    return {
        "group": group,
        "name": f"{row['scope']}[{param}]",
        "fullname": f"attnbench::{row['scope']}[{param}]",
        "params": {field: _json_value(row[field]) for field in _PARAM_FIELDS},
        "param": param,
        "extra_info": {field: _json_value(row[field]) for field in _EXTRA_FIELDS},
        "options": {
            "disable_gc": False,
            "timer": "torch.utils.benchmark.Timer",
            "min_rounds": len(samples),
            "max_time": None,
            "min_time": None,
            "warmup": True,
        },
        "stats": benchmark_stats(samples, iterations=int(calls) if calls and math.isfinite(calls) else 1),
    }


def _machine_info(env: Mapping[str, Any]) -> dict[str, Any]:
    platform_text = str(env.get("platform") or "")
    return {
        "node": env.get("host"),
        "processor": env.get("cpu_model"),
        "machine": next((p for p in platform_text.split("-") if p in ("x86_64", "aarch64", "arm64")), ""),
        "python_compiler": "",
        "python_implementation": "CPython",
        "python_implementation_version": env.get("python_version"),
        "python_version": env.get("python_version"),
        "python_build": [],
        "release": "",
        "system": platform_text.split("-")[0] if platform_text else "",
        "cpu": {"brand_raw": env.get("cpu_model"), "count": _json_value(env.get("cpu_cores_logical"))},
        "attnbench": {
            "env_id": env.get("env_id"),
            "gpu_name": env.get("gpu_name"),
            "torch_version": env.get("torch_version"),
            "cuda_version": env.get("cuda_version"),
            "num_threads": _json_value(env.get("num_threads")),
        },
    }


def _commit_info(rows: pd.DataFrame) -> dict[str, Any]:
    latest = rows.sort_values(["timestamp", "git_commit"], na_position="first", kind="stable").iloc[-1]
    commit = latest["git_commit"] if isinstance(latest["git_commit"], str) else "unknown"
    return {
        "id": commit,
        "time": None,
        "author_time": None,
        "dirty": False,
        "project": "attnbench",
        "branch": "(unknown)",
    }


def to_pytest_benchmark(results: Results, *, env_id: str | None = None) -> dict[str, Any]:
    """The pytest-benchmark JSON document for the ok cases of one environment."""
    env_ids = results.env_ids
    if env_id is None and len(env_ids) > 1:
        raise ExportError(
            f"the results come from {len(env_ids)} environments ({', '.join(env_ids)}); choose one with --env"
        )
    env_id = env_id or env_ids[0]
    if env_id not in env_ids:
        raise ExportError(f"unknown environment {env_id!r} (the results have {', '.join(env_ids)})")
    frame = ok_rows(results.frame[results.frame["env_id"] == env_id])
    if frame.empty:
        raise ExportError(f"no ok case to export in environment {env_id}")
    environment = results.environments.set_index("env_id").loc[env_id].to_dict()
    stamps = sorted(str(t) for t in frame["timestamp"].dropna())
    return {
        "machine_info": _machine_info({**environment, "env_id": env_id}),
        "commit_info": _commit_info(frame),
        "benchmarks": [_benchmark(row) for row in frame.to_dict("records")],
        "datetime": stamps[-1] if stamps else "",
        "version": PYTEST_BENCHMARK_FORMAT_VERSION,
    }


def export_text(results: Results, *, fmt: str = EXPORT_FORMATS[0], env_id: str | None = None) -> str:
    """The text of ``results`` in format ``fmt`` (``attnbench export`` writes it to its --out, whole or not at all)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    document = to_pytest_benchmark(results, env_id=env_id)
    return json.dumps(document, indent=4, sort_keys=True, allow_nan=False) + "\n"
