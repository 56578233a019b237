"""Analysis of results files: scaling exponents, crossovers, speedups, roofline, memory budgets, errors.

Everything here works on a pandas DataFrame with one row per (environment, case)
and never imports torch: reports are rebuilt from ``results/`` alone.

Environments are never silently merged. Every record gets an ``env_id`` (a short
hash of :func:`bench.results.env_identity`), and every grouping in this module
includes it: a curve (all the lengths of one implementation at one shape, mode,
device, dtype and scope) lives in exactly one environment.

A case measured more than once in the same environment (a ``--force`` or
``--retry-failed`` run, or the same file given twice) keeps its latest record:
files in the order given, lines in file order; the number replaced is reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.cases import Case, GridError
from bench.results import STATUSES, ResultsError, env_identity, iter_records

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
    "head_dim",
    "depth",
    "residual",
    "impl",
    "params",
)
# a curve without its implementation: curves that share these can be compared with each other
PEER_COLUMNS = tuple(c for c in CURVE_COLUMNS if c not in ("impl", "params"))
BASELINES = ("full", "sdpa")
STATUS_LABELS = {"oom": "OOM", "timeout": "timeout", "skipped": "skipped", "error": "error", "crashed": "crashed"}
DEFAULT_MIN_FIT_SEQ_LEN = 1024
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MEMORY_BUDGET_BYTES = 16 * 2**30
MAX_EXTRAPOLATION = 32  # a memory fit is not trusted beyond this multiple of the longest measured length
_NUMERIC_FIELDS = (
    "median_s",
    "iqr_s",
    "min_s",
    "mean_s",
    "n_samples",
    "calls_per_sample",
    "measured_s",
    "peak_bytes",
    "rss_peak_bytes",
    "flops",
    "achieved_flops_per_s",
    "roofline",
    "rel_error",
    "rel_error_peaked",
    "estimate_bytes",
    "wall_s",
)


# ---------------------------------------------------------------- statistics (no scipy: it is not a runtime dependency)


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, 1.0
        if df > 1:
            series = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= cos2 * (2 * k) / (2 * k + 1)
                series += term
        two_sided = 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:
        series, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        two_sided = math.sin(theta) * series
    two_sided = min(1.0, max(0.0, two_sided))
    return 0.5 + 0.5 * two_sided if t >= 0 else 0.5 - 0.5 * two_sided


def student_t_ppf(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`student_t_cdf`)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    if probability < 0.5:
        return -student_t_ppf(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class PowerFit:
    """``value = exp(intercept) * seq_len ** exponent``, fitted by least squares in log-log space."""

    exponent: float
    low: float  # confidence interval of the exponent (NaN with only two points)
    high: float
    intercept: float  # natural log of the prefactor
    n_points: int
    min_seq_len: int
    max_seq_len: int

    def predict(self, seq_len: float) -> float:
        return math.exp(self.intercept + self.exponent * math.log(seq_len))

    def solve(self, value: float) -> float:
        """The length at which the fitted curve reaches ``value`` (NaN for a flat fit)."""
        if self.exponent <= 0:
            return math.nan
        return math.exp((math.log(value) - self.intercept) / self.exponent)


def fit_power_law(
    seq_lens: Sequence[float], values: Sequence[float], *, confidence: float = DEFAULT_CONFIDENCE
) -> PowerFit | None:
    """Fit ``log value = a + k log seq_len``; the interval of ``k`` is its standard error times a t-quantile.

    Points with a non-positive value are dropped. None when fewer than two distinct lengths remain.
    """
    pairs = sorted((float(n), float(v)) for n, v in zip(seq_lens, values, strict=True) if n > 0 and v > 0)
    if len({n for n, _ in pairs}) < 2:
        return None
    x = np.log([n for n, _ in pairs])
    y = np.log([v for _, v in pairs])
    x_mean = x.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x_mean)
    dof = len(pairs) - 2
    if dof >= 1:
        residuals = y - (intercept + slope * x)
        stderr = math.sqrt(float((residuals**2).sum()) / dof / sxx)
        half = student_t_ppf(0.5 + confidence / 2.0, dof) * stderr
        low, high = slope - half, slope + half
    else:
        low = high = math.nan
    return PowerFit(
        exponent=slope,
        low=low,
        high=high,
        intercept=intercept,
        n_points=len(pairs),
        min_seq_len=int(pairs[0][0]),
        max_seq_len=int(pairs[-1][0]),
    )


# ---------------------------------------------------------------- complexity strings

_SUPERSCRIPTS = str.maketrans({"²": "^2", "³": "^3", "·": " ", "×": " ", "*": " ", "⋅": " "})
_TOKEN = re.compile(r"([A-Za-z_]\w*)\s*(?:\^\s*\{?\(?\s*([0-9]*\.?[0-9]+(?:\s*/\s*[0-9]+)?)\s*\)?\}?)?")


def complexity_exponent(text: str | None) -> float | None:
    """The exponent of ``n`` in a big-O string, ignoring logarithms and other symbols; None if unparseable.

    ``"O(n^2 d)"`` -> 2, ``"O(n w d)"`` -> 1, ``"O(n k d)"`` -> 1, ``"O(n d^2)"`` -> 1, ``"O(n log n)"`` -> 1,
    ``"O(n^2 + n d)"`` -> 2 (the largest term), ``"O(n sqrt(n))"`` -> 1.5, ``"O(1)"`` -> 0.
    """
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"\s*O\s*\((.*)\)\s*", text)
    if not match:
        return None
    inner = match.group(1).translate(_SUPERSCRIPTS)
    inner = re.sub(r"\blog\s*_?\d*\s*\(?\s*n\s*\)?", " ", inner)  # log n, log(n), log2 n: no power of n
    inner = re.sub(r"\bsqrt\s*\(\s*n\s*\)", "n^0.5", inner)
    exponents = []
    for term in inner.split("+"):
        exponent = 0.0
        for name, power in _TOKEN.findall(term):
            if name == "n":
                exponent += _parse_power(power)
        exponents.append(exponent)
    return max(exponents)


def _parse_power(text: str) -> float:
    if not text:
        return 1.0
    if "/" in text:
        numerator, denominator = text.split("/")
        return float(numerator) / float(denominator)
    return float(text)


# ---------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Results:
    """The records of one or more results files, one row per (environment, case)."""

    frame: pd.DataFrame
    environments: pd.DataFrame  # one row per env_id
    paths: tuple[str, ...]
    problems: tuple[str, ...]  # lines skipped, one sentence each
    superseded: int  # records replaced by a later record of the same case in the same environment

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
    for field in _NUMERIC_FIELDS:
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
    row: dict[str, Any] = {
        "env_id": env_id_of(env),
        "scope": case.scope,
        "device": case.device,
        "dtype": case.dtype,
        "causal": case.causal,
        "mode": case.mode,
        "batch": case.batch,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "depth": case.depth,
        "residual": case.residual,
        "impl": case.impl,
        "params": params_text(case.params_dict()),
        "seq_len": case.seq_len,
        "case_key": case.key(),
        "status": record["status"],
        "message": record.get("message"),
        "samples": list(record.get("samples") or []),
        "noisy": record.get("noisy"),
        "memory_method": record.get("memory_method"),
        "peak_flops_per_s": peaks.get(f"{case.device}/{case.dtype}"),
        "time_complexity": time_text,
        "memory_complexity": memory_text,
        "exact": info.get("exact"),
        "run_id": record.get("run_id"),
        "git_commit": env.get("git_commit"),
        "timestamp": env.get("timestamp"),
        "source_path": path,
        "line_number": line_number,
    }
    for field in _NUMERIC_FIELDS:
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
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    envs: dict[str, dict[str, Any]] = {}
    for path in names:
        for line_number, record, problem in iter_records(path):
            if problem is not None:
                problems.append(str(problem))
                continue
            assert record is not None
            reason = record_problem(record)
            if reason is not None:
                problems.append(f"{path}:{line_number}: {reason}; line skipped")
                continue
            rows.append(record_row(record, path=path, line_number=line_number, complexities=complexities))
            env = record.get("env") or {}
            envs.setdefault(env_id_of(env), _environment_row(env))
    if not rows:
        raise ResultsError(f"no usable result records in {', '.join(names)}")
    frame = pd.DataFrame(rows)
    before = len(frame)
    frame = frame.drop_duplicates(subset=["env_id", "case_key"], keep="last")
    frame = _with_labels(frame)
    frame = frame.sort_values([*CURVE_COLUMNS, "seq_len"], kind="stable").reset_index(drop=True)
    environments = pd.DataFrame(sorted(envs.values(), key=lambda row: row["env_id"]))
    environments = _environment_summary(environments, frame)
    return Results(
        frame=frame,
        environments=environments,
        paths=tuple(names),
        problems=tuple(problems),
        superseded=before - len(frame),
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


# ---------------------------------------------------------------- per-curve helpers


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def iter_curves(frame: pd.DataFrame) -> Iterable[tuple[tuple, pd.DataFrame]]:
    """(curve key, its rows sorted by length) in sorted order."""
    for key, rows in frame.groupby(list(CURVE_COLUMNS), sort=True):
        yield key, rows.sort_values("seq_len")


def _curve_dict(key: tuple) -> dict[str, Any]:
    return dict(zip(CURVE_COLUMNS, key, strict=True))


def stop_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Where each curve stopped working: every non-ok record whose next-shorter length was ok (or that is first).

    Columns: the curve columns, ``seq_len``, ``status``, ``label`` (``OOM``, ``timeout`` ...), ``last_ok_seq_len``,
    ``last_ok_median_s`` and ``last_ok_peak_bytes`` (NaN when nothing shorter ran).
    """
    rows = []
    for key, curve in iter_curves(frame):
        previous_status = "ok"
        last_ok: Mapping[str, Any] | None = None
        for record in curve.to_dict("records"):
            if record["status"] == "ok":
                last_ok = record
            elif previous_status == "ok" or previous_status != record["status"]:
                rows.append(
                    {
                        **_curve_dict(key),
                        "seq_len": record["seq_len"],
                        "status": record["status"],
                        "status_label": STATUS_LABELS[record["status"]],
                        "message": record["message"],
                        "last_ok_seq_len": last_ok["seq_len"] if last_ok else math.nan,
                        "last_ok_median_s": last_ok["median_s"] if last_ok else math.nan,
                        "last_ok_peak_bytes": last_ok["peak_bytes"] if last_ok else math.nan,
                    }
                )
            previous_status = record["status"]
    return pd.DataFrame(rows, columns=[*CURVE_COLUMNS, *_STOP_COLUMNS])


_STOP_COLUMNS = (
    "seq_len",
    "status",
    "status_label",
    "message",
    "last_ok_seq_len",
    "last_ok_median_s",
    "last_ok_peak_bytes",
)


# ---------------------------------------------------------------- exponents


def exponent_table(
    frame: pd.DataFrame,
    *,
    min_seq_len: int = DEFAULT_MIN_FIT_SEQ_LEN,
    max_seq_len: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """Per curve: fitted time and memory exponents with their intervals, beside the theoretical ones.

    Only ok lengths within ``[min_seq_len, max_seq_len]`` enter a fit: short lengths are dominated by fixed
    overheads and would bend the exponent down.
    """
    rows = []
    for key, curve in iter_curves(frame):
        ok = ok_rows(curve)
        ok = ok[(ok["seq_len"] >= min_seq_len) & ((ok["seq_len"] <= max_seq_len) if max_seq_len else True)]
        row = {**_curve_dict(key), "label": curve["label"].iloc[0]}
        for prefix, column, complexity_column in (
            ("time", "median_s", "time_complexity"),
            ("memory", "peak_bytes", "memory_complexity"),
        ):
            valid = ok[ok[column] > 0]
            fit = fit_power_law(valid["seq_len"].tolist(), valid[column].tolist(), confidence=confidence)
            complexity = _first_text(curve[complexity_column])
            theory = complexity_exponent(complexity)
            row.update(
                {
                    f"{prefix}_exponent": fit.exponent if fit else math.nan,
                    f"{prefix}_low": fit.low if fit else math.nan,
                    f"{prefix}_high": fit.high if fit else math.nan,
                    f"{prefix}_points": fit.n_points if fit else 0,
                    f"{prefix}_fit_min_seq_len": fit.min_seq_len if fit else math.nan,
                    f"{prefix}_fit_max_seq_len": fit.max_seq_len if fit else math.nan,
                    f"{prefix}_intercept": fit.intercept if fit else math.nan,
                    f"{prefix}_complexity": complexity,
                    f"{prefix}_theory": theory if theory is not None else math.nan,
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _first_text(values: pd.Series) -> str | None:
    texts = sorted({v for v in values if isinstance(v, str) and v})
    return texts[0] if texts else None


def fit_from_row(row: Mapping[str, Any], *, prefix: str) -> PowerFit | None:
    """The :class:`PowerFit` stored in a row of :func:`exponent_table` (None where there was no fit)."""
    if not row.get(f"{prefix}_points"):
        return None
    return PowerFit(
        exponent=row[f"{prefix}_exponent"],
        low=row[f"{prefix}_low"],
        high=row[f"{prefix}_high"],
        intercept=row[f"{prefix}_intercept"],
        n_points=int(row[f"{prefix}_points"]),
        min_seq_len=int(row[f"{prefix}_fit_min_seq_len"]),
        max_seq_len=int(row[f"{prefix}_fit_max_seq_len"]),
    )


# ---------------------------------------------------------------- baselines: speedups and crossovers


def _baseline_curves(frame: pd.DataFrame, baseline: str) -> dict[tuple, pd.DataFrame]:
    """Per peer key, the baseline's rows (its default config when it ran with several)."""
    rows = frame[frame["impl"] == baseline]
    found: dict[tuple, pd.DataFrame] = {}
    for key, group in rows.groupby(list(PEER_COLUMNS), sort=True):
        params = sorted(group["params"].unique(), key=lambda p: (p != "", p))[0]
        found[key] = group[group["params"] == params].sort_values("seq_len")
    return found


def speedup_table(frame: pd.DataFrame, *, baselines: Sequence[str] = BASELINES) -> pd.DataFrame:
    """Per ok case: its median and, for each baseline, the baseline's median at that length and their ratio.

    ``speedup_vs_<b> = median_s(b) / median_s(impl)``: above 1 the implementation is faster than the baseline.
    """
    ok = ok_rows(frame)
    table = ok[[*CURVE_COLUMNS, "label", "seq_len", "median_s"]].copy()
    for baseline in baselines:
        medians = {}
        for key, rows in _baseline_curves(ok, baseline).items():
            for seq_len, median in zip(rows["seq_len"], rows["median_s"], strict=True):
                medians[(*key, seq_len)] = median
        lookup = [
            medians.get((*peer, seq_len), math.nan)
            for peer, seq_len in zip(
                table[list(PEER_COLUMNS)].itertuples(index=False, name=None), table["seq_len"], strict=True
            )
        ]
        table[f"{baseline}_median_s"] = lookup
        table[f"speedup_vs_{baseline}"] = table[f"{baseline}_median_s"] / table["median_s"]
    return table.reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class Crossover:
    """Where a curve becomes faster than a baseline, over the lengths both ran."""

    kind: str  # "at" (seq_len holds the interpolated length), "always", "never", "no common lengths"
    seq_len: float = math.nan

    def text(self) -> str:
        return f"{self.seq_len:.0f}" if self.kind == "at" else self.kind


def crossover(seq_lens: Sequence[float], ratios: Sequence[float]) -> Crossover:
    """The smallest length from which ``ratio = t_impl / t_baseline`` stays below 1, interpolated in log-log.

    "always": faster at every common length; "never": not faster at the longest one.
    """
    points = sorted((float(n), float(r)) for n, r in zip(seq_lens, ratios, strict=True) if r > 0)
    if not points:
        return Crossover("no common lengths")
    slower = [i for i, (_, ratio) in enumerate(points) if ratio >= 1.0]
    if not slower:
        return Crossover("always")
    last = slower[-1]
    if last == len(points) - 1:
        return Crossover("never")
    (n0, r0), (n1, r1) = points[last], points[last + 1]
    log_r0, log_r1 = math.log(r0), math.log(r1)
    fraction = log_r0 / (log_r0 - log_r1) if log_r0 != log_r1 else 0.0
    return Crossover("at", math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0))))


def crossover_table(frame: pd.DataFrame, *, baselines: Sequence[str] = BASELINES) -> pd.DataFrame:
    """Per curve and baseline: the crossover length, the common range, and where only the curve still ran."""
    rows = []
    for baseline in baselines:
        base_curves = _baseline_curves(frame, baseline)
        for key, curve in iter_curves(frame):
            curve_fields = _curve_dict(key)
            peer = tuple(curve_fields[c] for c in PEER_COLUMNS)
            if curve_fields["impl"] == baseline or peer not in base_curves:
                continue
            base = base_curves[peer]
            ok = ok_rows(curve).set_index("seq_len")["median_s"]
            base_ok = ok_rows(base).set_index("seq_len")["median_s"]
            common = sorted(set(ok.index) & set(base_ok.index))
            result = crossover(common, [ok[n] / base_ok[n] for n in common])
            base_failed = set(base[base["status"] != "ok"]["seq_len"])
            beyond = sorted(n for n in ok.index if n in base_failed)
            rows.append(
                {
                    **curve_fields,
                    "label": curve["label"].iloc[0],
                    "baseline": baseline,
                    "crossover": result.text(),
                    "crossover_seq_len": result.seq_len,
                    "common_min_seq_len": common[0] if common else math.nan,
                    "common_max_seq_len": common[-1] if common else math.nan,
                    "common_points": len(common),
                    "baseline_failed_from_seq_len": beyond[0] if beyond else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=[*CURVE_COLUMNS, *_CROSSOVER_COLUMNS])


_CROSSOVER_COLUMNS = (
    "label",
    "baseline",
    "crossover",
    "crossover_seq_len",
    "common_min_seq_len",
    "common_max_seq_len",
    "common_points",
    "baseline_failed_from_seq_len",
)


# ---------------------------------------------------------------- roofline, backward ratio, errors, layers


def roofline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ok case: FLOPs, achieved FLOP/s, the measured matmul peak and their ratio (the record's roofline)."""
    ok = ok_rows(frame)
    columns = [*CURVE_COLUMNS, "label", "seq_len", "flops", "median_s", "achieved_flops_per_s"]
    return ok[[*columns, "peak_flops_per_s", "roofline"]].reset_index(drop=True)


def backward_ratio_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per curve and length where both modes ran: ``median_s(fwd+bwd) / median_s(fwd)``."""
    keys = [c for c in CURVE_COLUMNS if c != "mode"] + ["seq_len"]
    ok = ok_rows(frame)
    forward = ok[ok["mode"] == "fwd"][[*keys, "label", "median_s"]]
    both = ok[ok["mode"] == "fwd+bwd"][[*keys, "median_s"]]
    table = forward.merge(both, on=keys, suffixes=("_fwd", "_fwd_bwd"))
    table["fwd_bwd_over_fwd"] = table["median_s_fwd_bwd"] / table["median_s_fwd"]
    return table.sort_values(keys, kind="stable").reset_index(drop=True)


def error_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ok case that measured it: the approximation error on random and on peaked inputs."""
    ok = ok_rows(frame)
    ok = ok[ok["rel_error"].notna() | ok["rel_error_peaked"].notna()]
    columns = [*CURVE_COLUMNS, "label", "seq_len", "median_s", "rel_error", "rel_error_peaked"]
    return ok[columns].reset_index(drop=True)


def layers_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The layer-stack cases (scope ``layers``): time and peak memory by depth and residual kind, all statuses."""
    rows = frame[frame["scope"] == "layers"]
    columns = [*CURVE_COLUMNS, "label", "seq_len", "status", "median_s", "peak_bytes"]
    return rows[columns].sort_values(
        ["env_id", "device", "dtype", "causal", "mode", "impl", "params", "seq_len", "residual", "depth"],
        kind="stable",
    )


# ---------------------------------------------------------------- memory budget


def budget_table(
    frame: pd.DataFrame, exponents: pd.DataFrame, *, budget_bytes: float = DEFAULT_MEMORY_BUDGET_BYTES
) -> pd.DataFrame:
    """Per curve: the longest length whose peak memory fits ``budget_bytes``.

    ``basis`` says where the number comes from: ``measured`` (a measured length fits and a longer one does
    not), ``extrapolated`` (every measured length fits; solved from the memory fit), ``beyond`` (the fit's
    answer is more than ``MAX_EXTRAPOLATION`` times the longest measured length, too far to trust: the
    number is that limit, a lower bound), ``at least`` (every measured length fits and there is no fit),
    ``none`` (even the shortest measured length is over) or ``no data``.
    """
    fits = {tuple(row[c] for c in CURVE_COLUMNS): fit_from_row(row, prefix="memory") for row in _records(exponents)}
    rows = []
    for key, curve in iter_curves(frame):
        ok = ok_rows(curve)
        ok = ok[ok["peak_bytes"].notna()]
        within = ok[ok["peak_bytes"] <= budget_bytes]["seq_len"]
        over = ok[ok["peak_bytes"] > budget_bytes]["seq_len"]
        failed = curve[curve["status"].isin(("oom", "crashed"))]["seq_len"]
        note = f"{STATUS_LABELS['oom']}/crash from n={int(failed.min())}" if len(failed) else ""
        fit = fits.get(key)
        if ok.empty:
            basis, seq_len = "no data", math.nan
        elif len(over):
            basis, seq_len = ("measured", float(within.max())) if len(within) else ("none", math.nan)
        elif fit is not None and fit.exponent > 0 and math.floor(fit.solve(budget_bytes)) > ok["seq_len"].max():
            limit = MAX_EXTRAPOLATION * float(ok["seq_len"].max())
            solved = float(math.floor(fit.solve(budget_bytes)))
            basis, seq_len = ("extrapolated", solved) if solved <= limit else ("beyond", limit)
        else:
            basis, seq_len = "at least", float(ok["seq_len"].max())
        rows.append(
            {
                **_curve_dict(key),
                "label": curve["label"].iloc[0],
                "budget_bytes": float(budget_bytes),
                "max_seq_len": seq_len,
                "basis": basis,
                "note": note,
            }
        )
    return pd.DataFrame(rows, columns=[*CURVE_COLUMNS, "label", "budget_bytes", "max_seq_len", "basis", "note"])


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return table.to_dict("records") if len(table) else []


# ---------------------------------------------------------------- everything at once


@dataclasses.dataclass(frozen=True)
class Analysis:
    """All the tables of a report."""

    results: Results
    exponents: pd.DataFrame
    crossovers: pd.DataFrame
    speedups: pd.DataFrame
    roofline: pd.DataFrame
    budget: pd.DataFrame
    errors: pd.DataFrame
    backward_ratio: pd.DataFrame
    layers: pd.DataFrame
    stops: pd.DataFrame
    min_fit_seq_len: int
    max_fit_seq_len: int | None
    confidence: float
    budget_bytes: float
    baselines: tuple[str, ...]  # those asked for that are present in the results

    def curve_key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(row[c] for c in CURVE_COLUMNS)


def analyze(
    results: Results,
    *,
    min_fit_seq_len: int = DEFAULT_MIN_FIT_SEQ_LEN,
    max_fit_seq_len: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    budget_bytes: float = DEFAULT_MEMORY_BUDGET_BYTES,
    baselines: Sequence[str] = BASELINES,
) -> Analysis:
    """Every table of the report for ``results``."""
    frame = results.frame
    exponents = exponent_table(frame, min_seq_len=min_fit_seq_len, max_seq_len=max_fit_seq_len, confidence=confidence)
    return Analysis(
        results=results,
        exponents=exponents,
        crossovers=crossover_table(frame, baselines=baselines),
        speedups=speedup_table(frame, baselines=baselines),
        roofline=roofline_table(frame),
        budget=budget_table(frame, exponents, budget_bytes=budget_bytes),
        errors=error_table(frame),
        backward_ratio=backward_ratio_table(frame),
        layers=layers_table(frame),
        stops=stop_points(frame),
        min_fit_seq_len=min_fit_seq_len,
        max_fit_seq_len=max_fit_seq_len,
        confidence=confidence,
        budget_bytes=budget_bytes,
        baselines=tuple(b for b in baselines if (frame["impl"] == b).any()),
    )
