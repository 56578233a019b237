"""The report's section on compiled cases (``attnbench run --compile on``): each compiled case beside the eager
one of the same curve and length, its speedup, its compilation's time, graph breaks and recompilations.

Compiled curves are also curves of their own everywhere else in the report (``<impl>+compiled``)."""

from __future__ import annotations

import pandas as pd

from bench.report.formatting import fmt_sig, markdown_table
from bench.report.load import CURVE_COLUMNS, ok_rows

# what pairs a compiled case with its eager one: its curve but the implementation's shown name, and its length
_PAIR_COLUMNS = [*(c for c in CURVE_COLUMNS if c != "impl"), "base_impl", "seq_len"]


def compilation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per compiled case that ran: its eager twin's median (NaN without one), the speedup, compile_s,
    the graphs compiled before timing and those compiled while it was timed."""
    compiled = ok_rows(frame[frame["compiled"]])
    if compiled.empty:
        return pd.DataFrame()
    eager = ok_rows(frame[~frame["compiled"]])[[*_PAIR_COLUMNS, "median_s"]]
    table = compiled.merge(eager, on=_PAIR_COLUMNS, how="left", suffixes=("", "_eager"))
    table = table.assign(speedup=table["median_s_eager"] / table["median_s"])
    columns = ["base_impl", "params", "mode", "causal", "dtype", "device", "seq_len", "median_s_eager", "median_s"]
    columns += ["speedup", "compile_s", "compiled_graphs", "recompiles"]
    return table[columns].sort_values(["base_impl", "params", "mode", "causal", "seq_len"]).reset_index(drop=True)


def compilation_section(frame: pd.DataFrame) -> list[str]:
    table = compilation_table(frame)
    if table.empty:
        return []
    headers = ["impl", "mode", "length", "eager (ms)", "compiled (ms)", "speedup", "compile (s)", "graphs"]
    headers.append("recompiled")
    rows = []
    for row in table.to_dict("records"):
        name = f"{row['base_impl']}[{row['params']}]" if row["params"] else row["base_impl"]
        mode = f"{row['mode']} causal" if row["causal"] else row["mode"]
        eager = "–" if pd.isna(row["median_s_eager"]) else fmt_sig(row["median_s_eager"] * 1e3)
        speedup = "–" if pd.isna(row["speedup"]) else f"{row['speedup']:.2f}×"
        graphs = "–" if pd.isna(row["compiled_graphs"]) else str(int(row["compiled_graphs"]))
        recompiled = (
            "–"
            if pd.isna(row["recompiles"])
            else ("no" if row["recompiles"] == 0 else f"{int(row['recompiles'])} graphs")
        )
        compile_s = "–" if pd.isna(row["compile_s"]) else fmt_sig(row["compile_s"])
        rows.append(
            [name, mode, row["seq_len"], eager, fmt_sig(row["median_s"] * 1e3), speedup, compile_s, graphs, recompiled]
        )
    text = (
        "Each compiled case (`--compile on`: the implementation wrapped in `torch.compile` for its shapes) beside "
        "the eager one of the same curve and length. Speedup: eager median over compiled median. Compile: the "
        "seconds of the untimed calls that compiled it (until one compiled nothing new) beyond as many timed "
        "calls, a cold compilation (Inductor's caches off), never in the samples; graphs: those compiled before "
        "timing (more than one: graph breaks); recompiled: graphs compiled while the case was timed (their "
        "samples then include compilation)."
    )
    return [
        "## Compiled and eager",
        "",
        text,
        "",
        markdown_table(headers, rows, align_right=[False, False] + [True] * 7),
    ]
