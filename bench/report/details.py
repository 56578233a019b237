"""The report's detailed sections, below the headline: median time, peak memory and speedups by length,
layer stacks by depth, approximation errors, where curves stopped, and how well the timings repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from bench.families import ERROR_FIELDS, ERROR_ROWS, FAMILIES
from bench.report.analysis import Analysis
from bench.report.formatting import (
    COLUMN_HEADERS,
    MIB,
    cell_text,
    curve_name_columns,
    fmt_sig,
    markdown_table,
)
from bench.report.load import CURVE_COLUMNS, STATUS_LABELS, curve_label, iter_curves


def _by_length_table(
    frame: pd.DataFrame, *, value: str, scale: float, digits: int = 3, only_ok_values: bool = True
) -> str:
    """Rows: curves; columns: lengths; cells: the value, or the status where the case did not run."""
    lengths = sorted(frame["seq_len"].unique())
    name_columns = curve_name_columns(frame)
    headers = [*(COLUMN_HEADERS[c] for c in name_columns), *(str(n) for n in lengths)]
    rows = []
    for _, curve in iter_curves(frame):
        first = curve.iloc[0].to_dict()
        by_length = {row["seq_len"]: row for row in curve.to_dict("records")}
        cells = [cell_text(first, c) for c in name_columns]
        for n in lengths:
            row = by_length.get(n)
            if row is None:
                cells.append("")
            elif row["status"] != "ok" and only_ok_values:
                cells.append(STATUS_LABELS[row["status"]])
            else:
                cells.append(fmt_sig(row[value] / scale, digits=digits))
        rows.append(cells)
    return markdown_table(headers, rows, align_right=[False] * len(name_columns) + [True] * len(lengths))


def by_length_sections(an: Analysis) -> list[str]:
    frame = an.results.frame
    attention = frame[frame["scope"] == "attention"]
    if attention.empty:
        return []
    lines = [
        *_section(
            "Median time by length (ms)",
            "Median of the per-call timing samples; a status where the case did not run.",
            _by_length_table(attention, value="median_s", scale=1e-3),
        ),
        "",
        *_section(
            "Peak memory by length (MiB)",
            "Allocator-level peak of one call above the inputs already resident.",
            _by_length_table(attention, value="peak_bytes", scale=MIB),
        ),
    ]
    decode = attention[attention["mode"] == "decode"]
    if not decode.empty:
        lines += [
            "",
            *_section(
                "Decode cache by length (MiB)",
                "Bytes of the cache a decode step reads with a context of n tokens: every key and value for "
                "softmax attention, the window for sliding windows, the running state for linear attention.",
                _by_length_table(decode, value="cache_bytes", scale=MIB),
            ),
        ]
    for baseline in an.baselines:
        column = f"speedup_vs_{baseline}"
        if column not in an.speedups or an.speedups[column].notna().sum() == 0:
            continue
        speedups = an.speedups
        table = speedups[(speedups["scope"] == "attention") & speedups[column].notna() & (speedups["impl"] != baseline)]
        table = table.assign(status="ok")
        lines += [
            "",
            *_section(
                f"Speedup over {baseline} by length (×)",
                f"Median time of `{baseline}` divided by the implementation's at the same length and setup: "
                "above 1 it is faster.",
                _by_length_table(table, value=column, scale=1.0),
            ),
        ]
    return lines


def _across_table(
    frame: pd.DataFrame,
    *,
    across: str,
    values: list,
    value_header: Callable[[Any], str],
    extra: tuple[str, ...],
    cell: Callable[[dict[str, Any]], str],
) -> str:
    """Rows: the cases that differ only in ``across``; columns: the curve's name, ``extra`` columns (``n``,
    ``residual``), then one per value of ``across``; a cell is ``cell(row)``, or the status where it did not run."""
    name_columns = [c for c in curve_name_columns(frame) if c != across]
    extra_headers = ["n" if c == "seq_len" else c for c in extra]
    headers = [*(COLUMN_HEADERS[c] for c in name_columns), *extra_headers, *(value_header(v) for v in values)]
    group_columns = [*(c for c in CURVE_COLUMNS if c not in (across, *extra)), *extra]
    rows = []
    for _, group in frame.groupby(group_columns, sort=True):
        first = group.iloc[0].to_dict()
        by_value = {row[across]: row for row in group.to_dict("records")}
        cells = [cell_text(first, c) for c in name_columns] + [str(first[c]) for c in extra]
        for value in values:
            row = by_value.get(value)
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(STATUS_LABELS[row["status"]])
            else:
                cells.append(cell(row))
        rows.append(cells)
    return markdown_table(headers, rows)


def layers_section(an: Analysis) -> list[str]:
    layers = an.layers
    if layers.empty:
        return []
    table = _across_table(
        layers,
        across="depth",
        values=sorted(layers["depth"].unique()),
        value_header=lambda depth: f"depth {depth}",
        extra=("seq_len", "residual"),
        cell=lambda row: f"{fmt_sig(row['peak_bytes'] / MIB)} MiB / {fmt_sig(row['median_s'] * 1e3)} ms",
    )
    return _section(
        "Layer stacks",
        "Peak memory and median time of a stack of transformer layers by depth, standard against reversible "
        "and checkpointed residuals (a reversible stack recomputes activations in backward from the layer "
        "above; a checkpointed one keeps each layer's input and runs the layer again). Every "
        "stack also holds one gradient per parameter, which grows with depth whatever the residual: "
        "about 12·d² weights per layer (four projections and a feed-forward of width 4d; d = heads × head_dim: "
        "12 MB per layer in float32 at d = 512), "
        "so a reversible stack is flattest where activations dominate, at long sequences.",
        table,
    )


def grouped_heads_section(an: Analysis) -> list[str]:
    grouped = an.grouped_heads
    if grouped.empty:
        return []
    table = _across_table(
        grouped,
        across="kv_heads",
        values=sorted(grouped["kv_heads"].unique(), reverse=True),
        value_header=lambda count: f"{count} kv heads",
        extra=("seq_len",),
        cell=lambda row: f"{fmt_sig(row['median_s'] * 1e3)} ms / {fmt_sig(row['memory_bytes'] / MIB)} MiB",
    )
    return _section(
        "Grouped key/value heads",
        "Median time and memory of one call with fewer key/value heads than query heads (grouped-query "
        "attention; 1: multi-query), at the same length: peak memory above the inputs for fwd and fwd+bwd, the "
        "cache's bytes for decode (the inputs, keys and values included, shrink with the key/value heads too).",
        table,
    )


def errors_section(an: Analysis) -> list[str]:
    errors = an.errors
    if errors.empty:
        return []
    name_columns = curve_name_columns(errors)
    families = [family for family, field in ERROR_FIELDS.items() if errors[field].notna().any()]
    headers = [*(COLUMN_HEADERS[c] for c in name_columns), "n", *families]
    rows = [
        [
            *(cell_text(row, c) for c in name_columns),
            str(row["seq_len"]),
            *(fmt_sig(row[ERROR_FIELDS[family]], digits=2) for family in families),
        ]
        for row in errors.to_dict("records")
    ]
    described = "; ".join(f"**{family}**: {FAMILIES[family]}" for family in families)
    return _section(
        "Approximation error by input family",
        "`‖out − exact‖ / ‖exact‖` against exact attention in float64 on the same inputs, over every query row up "
        f"to {ERROR_ROWS} of them and {ERROR_ROWS} evenly spaced rows beyond. Each input family has the structure one kind of "
        f"approximation bets on (bench.families): {described}. On random inputs exact attention is nearly "
        "uniform and its output shrinks like 1/√n: a mechanism that keeps a fixed number of keys per query then "
        "shows an error that grows with n and can pass 1.",
        markdown_table(headers, rows),
    )


def stops_section(an: Analysis) -> list[str]:
    stops = an.stops
    if stops.empty:
        return []
    name_columns = curve_name_columns(stops.assign(label=stops["impl"]))
    extra = ["scope", "depth", "residual"] if (stops["scope"] == "layers").any() else []
    headers = [*(COLUMN_HEADERS.get(c, c) for c in name_columns), *extra, "n", "status", "message"]
    rows = []
    for row in stops.assign(
        label=[curve_label(i, p) for i, p in zip(stops["impl"], stops["params"], strict=True)]
    ).to_dict("records"):
        message = row["message"] if isinstance(row["message"], str) else ""
        rows.append(
            [
                *(cell_text(row, c) for c in name_columns),
                *(str(row[c]) for c in extra),
                str(row["seq_len"]),
                row["status_label"],
                message[:120],
            ]
        )
    return _section(
        "Where curves stopped",
        "The first length (or depth) at which a curve did not run, and why; the figures mark these with an X.",
        markdown_table(headers, rows),
    )


def repeatability_section(an: Analysis) -> list[str]:
    """The spread between worker processes beside the spread within one, and the cases whose processes disagree."""
    frame = an.results.frame
    pooled = frame[(frame["status"] == "ok") & (frame["processes"] > 1)]
    if pooled.empty:
        return []
    unstable = pooled[pooled["unstable"].fillna(False).astype(bool)]
    text = (
        f"Each case was timed in {int(pooled['processes'].median())} worker processes, in rounds spread over the "
        "sweep; its time is the fastest process's median, the best of its rounds (bench.pooling). Spread between "
        "processes (range of their medians over the fastest): median "
        f"{100 * pooled['process_spread'].median():.1f}%, 90th percentile {100 * pooled['process_spread'].quantile(0.9):.1f}%; "
        f"within one process (IQR over median): median {100 * pooled['within_spread'].median():.1f}%. "
        f"{len(unstable)} of {len(pooled)} cases are flagged unstable: their processes disagree by more than 5% "
        "and more than twice the spread within one, or a process did not finish."
    )
    if unstable.empty:
        return ["## Repeatability", "", text]
    name_columns = curve_name_columns(unstable)
    headers = [*(COLUMN_HEADERS.get(c, c) for c in name_columns), "n", "process medians (ms)", "between", "within"]
    rows = [
        [
            *(cell_text(row, c) for c in name_columns),
            str(row["seq_len"]),
            ", ".join(fmt_sig(1e3 * m) for m in row["process_medians_s"]),
            f"{100 * row['process_spread']:.1f}%",
            f"{100 * row['within_spread']:.1f}%",
        ]
        for row in unstable.to_dict("records")
    ]
    return _section("Repeatability", text, markdown_table(headers, rows))


def _section(title: str, text: str, table: str) -> list[str]:
    """A section of the README: its heading, one paragraph, and its table."""
    return [f"## {title}", "", text, "", table]
