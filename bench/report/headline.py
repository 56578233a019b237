"""The report's headline table: per curve, its exponents beside theory, crossovers, best roofline, longest
length within the memory budget and largest-length error, with the paragraph that explains the columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from bench.families import ERROR_FIELDS
from bench.report.analysis import MAX_EXTRAPOLATION, Analysis
from bench.report.formatting import (
    COLUMN_HEADERS,
    GIB,
    cell_text,
    curve_name_columns,
    fmt_fixed,
    fmt_int,
    fmt_sig,
    markdown_table,
)
from bench.report.load import CURVE_COLUMNS


def _interval(row: Mapping[str, Any], prefix: str) -> str:
    exponent = row[f"{prefix}_exponent"]
    if not math.isfinite(exponent):
        return "no fit (< 2 ok lengths in range)"
    low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
    points = int(row[f"{prefix}_points"])
    if math.isfinite(low) and math.isfinite(high):
        return f"{exponent:.2f} [{low:.2f}, {high:.2f}] ({points} pts)"
    return f"{exponent:.2f} (2 pts, no interval)"


def _theory(row: Mapping[str, Any], prefix: str) -> str:
    theory = row[f"{prefix}_theory"]
    text = row[f"{prefix}_complexity"]
    if not isinstance(text, str):
        return "–"
    return f"{theory:g} `{text}`" if math.isfinite(theory) else f"`{text}`"


def headline_section(an: Analysis) -> list[str]:
    exponents = an.exponents[an.exponents["scope"] == "attention"]
    lines = ["## Headline", ""]
    if exponents.empty:
        return [*lines, "No attention-scope cases."]
    fit_range = f"n ≥ {an.min_fit_seq_len}" + (f" and n ≤ {an.max_fit_seq_len}" if an.max_fit_seq_len else "")
    budget = f"{an.budget_bytes / GIB:g} GiB"
    lines += [
        f"Exponent k of `t ∝ n^k` (time) and `m ∝ n^k` (peak memory), least squares in log-log over the ok lengths "
        f"with {fit_range} (shorter lengths are dominated by fixed overheads; set the range with "
        f"`--fit-min-seq-len` / `--fit-max-seq-len`), with a {an.confidence:.0%} interval from the slope's standard "
        "error and a t-quantile; the theory column is the exponent of n in the implementation's complexity. "
        "Crossover: the smallest length from which the implementation is faster than the baseline "
        "(interpolated in log-log between measured lengths; `always` / `never` within the common range). "
        f"Longest n in {budget}: measured, or extrapolated from the memory fit where every measured length fits "
        f"(no further than {MAX_EXTRAPOLATION}× the longest measured length: `>` marks that limit). "
        "Decode rows: the time of one new token's step against a context of n tokens, and for memory the bytes of "
        "the cache it reads (keys and values, a window, a running state); their theory is the step's complexity. "
        "Rows with a number of queries (cross-attention: that many queries against n keys) have none: the "
        "complexities are self-attention's. "
        "Supports: what the implementation runs beyond non-causal self-attention (causal masking, grouped "
        "key/value heads, cross lengths, decoding); the rest it refuses, and such cases are skipped (`–`: records from before it was recorded).",
        "",
    ]
    supports = _supports_by_impl(an.results.frame)
    crossovers = {(an.curve_key(row), row["baseline"]): row for row in an.crossovers.to_dict("records")}
    budgets = {an.curve_key(row): row for row in an.budget.to_dict("records")}
    best_roofline = an.roofline.groupby(list(CURVE_COLUMNS))["roofline"].max().to_dict()
    errors = _largest_length_errors(an.errors)
    name_columns = curve_name_columns(exponents)
    headers = [
        *(COLUMN_HEADERS[c] for c in name_columns),
        "supports",
        "time k [CI]",
        "theory",
        "memory k [CI]",
        "theory",
        *(f"faster than {b} from n" for b in an.baselines),
        "best roofline",
        f"longest n in {budget}",
        "rel. error: best / worst input family (n)",
    ]
    rows = []
    for row in exponents.to_dict("records"):
        key = an.curve_key(row)
        cells = [cell_text(row, c) for c in name_columns]
        cells.append(supports.get(row["impl"], "–"))
        cells += [_interval(row, "time"), _theory(row, "time"), _interval(row, "memory"), _theory(row, "memory")]
        for baseline in an.baselines:
            found = crossovers.get((key, baseline))
            cells.append(found["crossover"] if found else "–")
        roof = best_roofline.get(key, math.nan)
        cells.append(fmt_fixed(roof * 100 if roof is not None else math.nan, decimals=1, suffix="%"))
        cells.append(_budget_text(budgets.get(key)))
        cells.append(errors.get(key, "–"))
        rows.append(cells)
    lines.append(markdown_table(headers, rows))
    return lines


def _supports_by_impl(frame: pd.DataFrame) -> dict[str, str]:
    """Per implementation, what its records say it supports (the newest record that says)."""
    found = {}
    for impl, rows in frame.groupby("impl", sort=True):
        texts = rows["supports"].dropna()
        if not texts.empty:
            found[impl] = str(texts.iloc[-1])
    return found


def _budget_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "–"
    basis = row["basis"]
    if basis in ("no data", "none"):
        text = basis
    elif basis == "at least":
        text = f"≥ {fmt_int(row['max_seq_len'])}"
    elif basis == "extrapolated":
        text = f"~{fmt_int(row['max_seq_len'])} (extrapolated)"
    elif basis == "beyond":
        text = f"> {fmt_int(row['max_seq_len'])} (extrapolated)"
    else:
        text = fmt_int(row["max_seq_len"])
    return f"{text}; {row['note']}" if row["note"] else text


def _largest_length_errors(errors: pd.DataFrame) -> dict[tuple, str]:
    """Per curve, at its longest length with errors: the input family it approximates best, and the worst."""
    found = {}
    for key, rows in errors.groupby(list(CURVE_COLUMNS), sort=True):
        last = rows.sort_values("seq_len").iloc[-1]
        measured = {
            family: last[field]
            for family, field in ERROR_FIELDS.items()
            if isinstance(last.get(field), float) and math.isfinite(last[field])
        }
        best, worst = min(measured, key=measured.get), max(measured, key=measured.get)
        found[key] = (
            f"{fmt_sig(measured[best], digits=2)} {best} / {fmt_sig(measured[worst], digits=2)} {worst} ({int(last['seq_len'])})"
        )
    return found
