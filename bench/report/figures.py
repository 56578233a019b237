"""The kinds of figure in a report, one function each: a column against sequence length (time, memory,
roofline), the backward ratio, layer-stack memory against depth, time and memory against the number of
key/value heads, and speed against approximation error.

Each draws one figure from the rows it is given and saves it through :mod:`bench.report.plot_style`; it
returns None when there is nothing to show. Which figures a report has is :mod:`bench.report.plots`' job.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd

from bench.families import ERROR_FIELDS
from bench.report.formatting import MIB
from bench.report.load import MEMORY_COLUMNS, ok_rows
from bench.report.plot_style import (
    FigureInfo,
    failure_handle,
    figure_style,
    finish_figure,
    line_with_stops,
    log2_axis,
    lowest_positive,
    new_figure,
    no_data,
    plain_log_ticks,
    reference_slopes,
)
from bench.report.stats import pareto_front

# ---------------------------------------------------------------- per-length curves (time, memory, roofline)


@dataclasses.dataclass(frozen=True)
class CurveSpec:
    """A figure of one column against sequence length, a panel per mode."""

    base: str
    title: str
    column: str
    scale: float
    ylabel: str
    log_y: bool
    references: bool
    caption: str
    # a mode whose panel shows another column: mode -> (column, y label)
    mode_columns: tuple[tuple[str, tuple[str, str]], ...] = ()

    def column_of(self, mode: str) -> tuple[str, str]:
        """The column a mode's panel draws, and its y label."""
        return dict(self.mode_columns).get(mode, (self.column, self.ylabel))


TIME = CurveSpec(
    base="time_vs_seq_len",
    title="Median time vs sequence length",
    column="median_s",
    scale=1.0,
    ylabel="median time per call (s)",
    log_y=True,
    references=True,
    caption="Median time per call against sequence length on log-log axes, one panel per mode (decode: one new "
    "token's step against a context of n tokens); the grey dashed lines are reference slopes ∝ n and ∝ n², "
    "and an X marks where a curve stopped (OOM, timeout, skipped).",
)
MEMORY = CurveSpec(
    base="memory_vs_seq_len",
    title="Peak memory vs sequence length",
    column="peak_bytes",
    scale=MIB,
    ylabel="peak memory above inputs (MiB)",
    log_y=True,
    references=True,
    caption="Peak memory of one call (allocator level, above the resident inputs) against sequence length on "
    "log-log axes, with reference slopes ∝ n and ∝ n²; an X marks where a curve stopped. The decode panel shows "
    "the bytes of the cache a step reads, against the context's length.",
    mode_columns=(("decode", (MEMORY_COLUMNS["decode"], "decode cache (MiB)")),),
)
ROOFLINE = CurveSpec(
    base="roofline",
    title="Roofline efficiency",
    column="roofline_percent",
    scale=1.0,
    ylabel="achieved / matmul peak FLOP/s (%)",
    log_y=False,
    references=False,
    caption="Achieved FLOP/s as a percentage of the same machine's measured matmul peak for the dtype, against "
    "sequence length: how far each implementation is from compute-bound.",
)


# marker and line style of each residual kind in the layer-stack figure (bench.cases.RESIDUALS)
RESIDUAL_STYLES = {"standard": ("o", "-"), "reversible": ("s", "--"), "checkpoint": ("^", ":")}


def curve_figure(
    rows: pd.DataFrame,
    *,
    spec: CurveSpec,
    subtitle: str,
    palette: dict[str, Any],
    styles: dict[tuple[str, str], Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    modes = sorted(rows["mode"].unique())
    drawn = {spec.column_of(mode)[0] for mode in modes}
    if ok_rows(rows)[sorted(drawn)].notna().sum().sum() == 0 and (rows["status"] == "ok").all():
        return None
    with figure_style():
        figure, axes = new_figure(ncols=len(modes))
        for ax, mode in zip(axes[0], modes, strict=True):
            panel = rows[rows["mode"] == mode]
            column, ylabel = spec.column_of(mode)
            ok_values = ok_rows(panel)[column] / spec.scale
            floor = lowest_positive(ok_values)
            placed: dict[tuple[float, float], int] = {}
            for (impl, params), curve in panel.groupby(["impl", "params"], sort=True):
                line_with_stops(
                    ax,
                    curve.sort_values("seq_len"),
                    x="seq_len",
                    column=column,
                    scale=spec.scale,
                    floor=floor,
                    placed=placed,
                    marker="o",
                    color=palette[impl],
                    linestyle=styles[(impl, params)],
                    label=curve["label"].iloc[0],
                )
            if ok_values.dropna().empty:
                no_data(ax)
            if spec.references:
                reference_slopes(ax, ok_rows(panel), column=column, scale=spec.scale)
            log2_axis(ax, panel["seq_len"])
            if spec.log_y:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_xlabel("sequence length n (tokens)" if mode != "decode" else "context n (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(mode)
        failure_handle(axes[0][0])
        return finish_figure(
            figure,
            axes[0],
            title=spec.title,
            subtitle=subtitle,
            caption=spec.caption,
            out_dir=out_dir,
            stem=stem,
        )


# ---------------------------------------------------------------- fwd+bwd over fwd


def backward_ratio_figure(
    table: pd.DataFrame,
    *,
    subtitle: str,
    palette: dict[str, Any],
    styles: dict[tuple[str, str], Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    if table.empty:
        return None
    title = "Backward cost: fwd+bwd over fwd"
    caption = (
        "The ratio of the forward-plus-backward median to the forward median at each length where both modes "
        "ran; the dashed line at 3× is what a backward costing twice the forward would give."
    )
    with figure_style():
        figure, axes = new_figure(ncols=1)
        ax = axes[0][0]
        for (impl, params), curve in table.groupby(["impl", "params"], sort=True):
            curve = curve.sort_values("seq_len")
            ax.plot(
                curve["seq_len"],
                curve["fwd_bwd_over_fwd"],
                marker="o",
                markersize=4,
                color=palette[impl],
                linestyle=styles[(impl, params)],
                label=curve["label"].iloc[0],
            )
        ax.axhline(3.0, color="0.45", linestyle=(0, (5, 3)), linewidth=1.1, label="3× (backward ≈ 2× forward)")
        log2_axis(ax, table["seq_len"])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_ylabel("median time fwd+bwd / fwd (×)")
        return finish_figure(figure, [ax], title=title, subtitle=subtitle, caption=caption, out_dir=out_dir, stem=stem)


# ---------------------------------------------------------------- layer stacks: memory vs depth


def layers_figure(
    rows: pd.DataFrame,
    *,
    subtitle: str,
    palette: dict[str, Any],
    out_dir: Path,
    stem: str,
    max_lengths: int = 4,
) -> FigureInfo | None:
    if rows.empty:
        return None
    lengths = sorted(rows["seq_len"].unique())[-max_lengths:]
    modes = sorted(rows["mode"].unique())
    title = "Layer stack: peak memory vs depth"
    caption = (
        "Peak memory of a stack of transformer layers against its depth, solid for standard residuals, dashed "
        "for reversible ones and dotted for checkpointed ones (both should grow slowly in fwd+bwd), one panel "
        "per mode and length."
    )
    with figure_style():
        figure, axes = new_figure(ncols=len(lengths), nrows=len(modes), width_in=3.8, height_in=3.2)
        for row_index, mode in enumerate(modes):
            for col_index, seq_len in enumerate(lengths):
                ax = axes[row_index][col_index]
                panel = rows[(rows["mode"] == mode) & (rows["seq_len"] == seq_len)]
                floor = lowest_positive(ok_rows(panel)["peak_bytes"] / MIB)
                placed: dict[tuple[float, float], int] = {}
                for (impl, _params, residual), line in panel.groupby(["impl", "params", "residual"], sort=True):
                    line_with_stops(
                        ax,
                        line.sort_values("depth"),
                        x="depth",
                        column="peak_bytes",
                        scale=MIB,
                        floor=floor,
                        placed=placed,
                        marker=RESIDUAL_STYLES[residual][0],
                        color=palette[impl],
                        linestyle=RESIDUAL_STYLES[residual][1],
                        label=f"{line['label'].iloc[0]} {residual}",
                    )
                if ok_rows(panel)["peak_bytes"].dropna().empty:
                    no_data(ax)
                depths = sorted(rows["depth"].unique())
                ax.set_xticks(depths)
                ax.set_xlim(min(depths) - 0.5, max(depths) + 0.5)
                ax.set_ylim(bottom=0)
                ax.set_xlabel("depth (layers)")
                ax.set_ylabel("peak memory above inputs (MiB)")
                ax.set_title(f"{mode}, n={seq_len}")
        failure_handle(axes[0][0])
        panels = [ax for row in axes for ax in row]
        return finish_figure(
            figure, panels, title=title, subtitle=subtitle, caption=caption, out_dir=out_dir, stem=stem
        )


# ---------------------------------------------------------------- grouped key/value heads


def grouped_heads_figure(
    rows: pd.DataFrame,
    *,
    subtitle: str,
    palette: dict[str, Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    """Time (top) and memory (bottom) against the number of key/value heads, a column per mode and length."""
    if rows.empty:
        return None
    columns = sorted({(mode, int(n)) for mode, n in zip(rows["mode"], rows["seq_len"], strict=True)})
    title = "Grouped key/value heads: time and memory"
    caption = (
        "Median time (top) and memory (bottom: peak above the inputs; for decode, the cache's bytes) of one call "
        "against the number of key/value heads at one length, the query heads fixed (1: multi-query attention)."
    )
    measures = (("median_s", 1e-3, "median time (ms)"), ("memory_bytes", MIB, "memory (MiB)"))
    with figure_style():
        figure, axes = new_figure(ncols=len(columns), nrows=len(measures), width_in=3.8, height_in=3.0)
        for col_index, (mode, seq_len) in enumerate(columns):
            panel = rows[(rows["mode"] == mode) & (rows["seq_len"] == seq_len)]
            for row_index, (column, scale, ylabel) in enumerate(measures):
                ax = axes[row_index][col_index]
                floor = lowest_positive(ok_rows(panel)[column] / scale)
                placed: dict[tuple[float, float], int] = {}
                for (impl, _params), line in panel.groupby(["impl", "params"], sort=True):
                    line_with_stops(
                        ax,
                        line.sort_values("kv_heads"),
                        x="kv_heads",
                        column=column,
                        scale=scale,
                        floor=floor,
                        placed=placed,
                        marker="o",
                        color=palette[impl],
                        linestyle="-",
                        label=line["label"].iloc[0],
                    )
                if ok_rows(panel)[column].dropna().empty:
                    no_data(ax)
                log2_axis(ax, panel["kv_heads"])
                ax.set_yscale("log")
                ax.set_xlabel("key/value heads")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{mode}, n={seq_len}")
        failure_handle(axes[0][0])
        panels = [ax for row in axes for ax in row]
        return finish_figure(
            figure, panels, title=title, subtitle=subtitle, caption=caption, out_dir=out_dir, stem=stem
        )


# ---------------------------------------------------------------- speed vs approximation error


@dataclasses.dataclass(frozen=True)
class ErrorPoint:
    """A mechanism on a speed-against-error panel (an exact one: error 0, drawn as a line at its time)."""

    impl: str  # picks the colour
    label: str
    error: float
    time_s: float
    marker: str = "o"


def speed_vs_error_panel(ax, approx: list[ErrorPoint], exact: list[ErrorPoint], *, palette: dict[str, Any]) -> None:
    """Time against approximation error on log axes: a labelled marker per approximation, the grey steps of
    their Pareto front (nothing is both faster and more accurate), a dashed labelled line per exact one."""
    for point in approx:
        ax.plot([point.error], [point.time_s], marker=point.marker, markersize=7, color=palette[point.impl],
                linestyle="none", label=point.label)  # fmt: skip
        ax.annotate(point.label, (point.error, point.time_s), xytext=(5, 3), textcoords="offset points", fontsize=7)
    front = pareto_front([(point.error, point.time_s) for point in approx])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), color="0.6", linewidth=1, drawstyle="steps-post", zorder=0,
                label="Pareto front")  # fmt: skip
    for point in exact:
        color = palette[point.impl]
        ax.axhline(point.time_s, color=color, linestyle=(0, (5, 3)), linewidth=1.1, label=f"{point.label} (exact)")
        ax.annotate(f"{point.label} (exact)", (0.02, point.time_s), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=7, color=color)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)


def pareto_figure(
    rows: pd.DataFrame,
    *,
    subtitle: str,
    palette: dict[str, Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    forward = ok_rows(rows[rows["mode"] == "fwd"])
    fields = list(ERROR_FIELDS.values())
    measured = forward[forward[fields].notna().any(axis=1)]
    if measured.empty:
        return None
    seq_len = int(measured["seq_len"].max())
    at_length = forward[forward["seq_len"] == seq_len]
    title = f"Speed vs approximation error at n={seq_len}, by input family"
    caption = (
        f"Forward time against relative error at n={seq_len} (the longest length with an error measurement), one "
        "panel per input family (bench.families); dashed horizontal lines are exact implementations, the grey "
        "steps the Pareto front (nothing is both faster and more accurate)."
    )
    panels = [(field, f"{family} inputs") for family, field in ERROR_FIELDS.items() if at_length[field].notna().any()]
    ncols = min(3, len(panels))
    with figure_style():
        figure, axes = new_figure(ncols=ncols, nrows=math.ceil(len(panels) / ncols))
        grid = [ax for row in axes for ax in row]
        for ax in grid[len(panels) :]:
            ax.set_visible(False)
        exact_rows = at_length[at_length["exact"].map(lambda value: value is True)].sort_values(["impl", "params"])
        exact = [ErrorPoint(r["impl"], r["label"], 0.0, r["median_s"]) for r in exact_rows.to_dict("records")]
        for ax, (column, what) in zip(grid, panels, strict=False):
            approx = at_length[at_length[column] > 0].sort_values(["impl", "params"])
            points = [ErrorPoint(r["impl"], r["label"], r[column], r["median_s"]) for r in approx.to_dict("records")]
            speed_vs_error_panel(ax, points, exact, palette=palette)
            ax.set_xlabel("relative error ‖out − exact‖ / ‖exact‖")
            ax.set_ylabel("median time per call (s)")
            ax.set_title(what)
        return finish_figure(
            figure, grid[: len(panels)], title=title, subtitle=subtitle, caption=caption, out_dir=out_dir, stem=stem
        )
