"""The analyses of a report, one table each: scaling exponents, crossovers, speedups, roofline, backward
ratio, errors, layer stacks, memory budgets and where curves stopped; :func:`analyze` runs them all.

Everything works on the frame of :func:`bench.report.load.load_results` and groups by curve, so environments
are never merged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from bench.families import ERROR_FIELDS
from bench.report.complexity import complexity_exponent
from bench.report.defaults import (
    DEFAULT_BASELINES,
    DEFAULT_CONFIDENCE,
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_MIN_FIT_SEQ_LEN,
)
from bench.report.load import (
    CURVE_COLUMNS,
    PEER_COLUMNS,
    STATUS_LABELS,
    Results,
    iter_curves,
    memory_column,
    ok_rows,
)
from bench.report.stats import PowerFit, fit_power_law

MAX_EXTRAPOLATION = 32  # a memory fit is not trusted beyond this multiple of the longest measured length


# ---------------------------------------------------------------- where curves stopped


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
        memory = memory_column(row["mode"])  # a decode step's: its cache
        for prefix, column, complexity_column in (
            ("time", "median_s", "time_complexity"),
            ("memory", memory, "memory_complexity"),
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


def speedup_table(frame: pd.DataFrame, *, baselines: Sequence[str] = DEFAULT_BASELINES) -> pd.DataFrame:
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


def crossover_table(frame: pd.DataFrame, *, baselines: Sequence[str] = DEFAULT_BASELINES) -> pd.DataFrame:
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
    """Per ok case that measured it: the approximation error on each input family (bench.families)."""
    ok = ok_rows(frame)
    fields = list(ERROR_FIELDS.values())
    ok = ok[ok[fields].notna().any(axis=1)]
    columns = [*CURVE_COLUMNS, "label", "seq_len", "median_s", *fields]
    return ok[columns].reset_index(drop=True)


def layers_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The layer-stack cases (scope ``layers``): time and peak memory by depth and residual kind, all statuses."""
    rows = frame[frame["scope"] == "layers"]
    columns = [*CURVE_COLUMNS, "label", "seq_len", "status", "median_s", "peak_bytes"]
    return rows[columns].sort_values(
        ["env_id", "device", "dtype", "causal", "mode", "impl", "params", "seq_len", "residual", "depth"],
        kind="stable",
    )


def grouped_heads_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The attention cases of setups measured with more than one number of key/value heads at a length: time and
    memory (a decode step's: its cache) by ``kv_heads``, all statuses."""
    rows = frame[frame["scope"] == "attention"]
    keys = [*(c for c in CURVE_COLUMNS if c != "kv_heads"), "seq_len"]
    varied = rows.groupby(keys, sort=False)["kv_heads"].transform("nunique") > 1
    table = rows[varied].assign(memory_bytes=lambda f: [r[memory_column(r["mode"])] for r in f.to_dict("records")])
    columns = [*CURVE_COLUMNS, "label", "seq_len", "status", "median_s", "memory_bytes"]
    return table[columns].sort_values([*keys, "kv_heads"], ascending=[True] * len(keys) + [False], kind="stable")


# ---------------------------------------------------------------- memory budget


def budget_table(
    frame: pd.DataFrame, exponents: pd.DataFrame, *, budget_bytes: float = DEFAULT_MEMORY_BUDGET_BYTES
) -> pd.DataFrame:
    """Per curve: the longest length whose peak memory (a decode step's: its cache) fits ``budget_bytes``.

    ``basis`` says where the number comes from: ``measured`` (a measured length fits and a longer one does
    not), ``extrapolated`` (every measured length fits; solved from the memory fit), ``beyond`` (the fit's
    answer is more than ``MAX_EXTRAPOLATION`` times the longest measured length, too far to trust: the
    number is that limit, a lower bound), ``at least`` (every measured length fits and there is no fit),
    ``none`` (even the shortest measured length is over) or ``no data``.
    """
    fits = {tuple(row[c] for c in CURVE_COLUMNS): fit_from_row(row, prefix="memory") for row in _records(exponents)}
    rows = []
    for key, curve in iter_curves(frame):
        memory = memory_column(_curve_dict(key)["mode"])  # the column the memory fit was made on
        ok = ok_rows(curve)
        ok = ok[ok[memory].notna()]
        within = ok[ok[memory] <= budget_bytes]["seq_len"]
        over = ok[ok[memory] > budget_bytes]["seq_len"]
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
    grouped_heads: pd.DataFrame
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
    baselines: Sequence[str] = DEFAULT_BASELINES,
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
        grouped_heads=grouped_heads_table(frame),
        stops=stop_points(frame),
        min_fit_seq_len=min_fit_seq_len,
        max_fit_seq_len=max_fit_seq_len,
        confidence=confidence,
        budget_bytes=budget_bytes,
        baselines=tuple(b for b in baselines if (frame["impl"] == b).any()),
    )
