"""Figures of a report (seaborn styling on matplotlib's object-oriented API, Agg canvas; never imports torch).

Every figure is drawn inside :func:`_style` (an ``rc_context``): importing this module changes no global
state, and neither does plotting. Figures are built with ``matplotlib.figure.Figure`` rather than pyplot,
so no GUI backend is ever selected. Each is saved as PNG and as SVG; the SVG is deterministic (fixed
``svg.hashsalt``, no date in its metadata).

Conventions shared by every figure: one colour per implementation, from :func:`impl_palette` over the
sorted names of all implementations in the results; non-default configs of one implementation differ by
line style; a case that did not run (OOM, timeout, skipped, error, crashed) is drawn as an ``X`` with its
status written beside it at the length (or depth) where its curve stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report.analysis import STATUS_LABELS, Analysis, ok_rows

MIB = 2**20
SVG_HASHSALT = "attnbench"
PNG_DPI = 120
# a figure per combination of these; its panels split by mode (the lines are implementations)
PANEL_GROUP_COLUMNS = ("env_id", "device", "dtype", "causal", "batch", "heads", "head_dim")
_PARAM_STYLES = ("-", "--", "-.", ":")
_REFERENCE_SLOPES = ((1, "n", (0, (5, 3))), (2, "n²", (0, (2, 2))))


@dataclasses.dataclass(frozen=True)
class FigureInfo:
    """A saved figure: file stem, title and the one sentence the report prints under it."""

    stem: str
    title: str
    caption: str
    png: Path
    svg: Path


# ---------------------------------------------------------------- style and palette


def impl_palette(impls: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per implementation, keyed by the sorted names: the same impl has the same colour everywhere."""
    import seaborn as sns

    names = sorted(set(impls))
    colors = sns.color_palette("tab10" if len(names) <= 10 else "husl", max(len(names), 1))
    return {name: tuple(color) for name, color in zip(names, colors, strict=False)}


def _rc() -> Any:  # a dict of rcParams (Any: matplotlib types its keys as literals)
    import seaborn as sns

    return {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("notebook", font_scale=0.85),
        "svg.hashsalt": SVG_HASHSALT,
        "svg.fonttype": "path",
        "legend.frameon": False,
        "axes.titleweight": "bold",
    }


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Seaborn's whitegrid look and deterministic SVG, for the duration of one figure only."""
    import matplotlib

    with matplotlib.rc_context(_rc()):
        yield


def _new_figure(*, ncols: int, nrows: int = 1, width_in: float = 4.6, height_in: float = 3.6):
    """A figure not attached to pyplot (no backend selection, no global registry of figures)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(width_in * ncols, 6.4), height_in * nrows + 0.8), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save(figure, *, out_dir: Path, stem: str) -> tuple[Path, Path]:
    png = out_dir / f"{stem}.png"
    svg = out_dir / f"{stem}.svg"
    figure.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
    figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png, svg


# ---------------------------------------------------------------- helpers


def _group_title(group: dict[str, Any]) -> str:
    causal = "causal" if group["causal"] else "non-causal"
    return (
        f"{group['device']} {group['dtype']}, {causal}, batch {group['batch']}, "
        f"{group['heads']} heads × {group['head_dim']}, env {group['env_id']}"
    )


def _group_slug(group: dict[str, Any]) -> str:
    causal = "causal" if group["causal"] else "full"
    return (
        f"{group['env_id']}-{group['device'].replace(':', '')}-{group['dtype']}-{causal}"
        f"-b{group['batch']}h{group['heads']}d{group['head_dim']}"
    )


def _panel_groups(frame: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    groups = []
    for key, rows in frame.groupby(list(PANEL_GROUP_COLUMNS), sort=True):
        groups.append((dict(zip(PANEL_GROUP_COLUMNS, key, strict=True)), rows))
    return groups


def _stem(base: str, group: dict[str, Any], *, many: bool) -> str:
    return f"{base}--{_group_slug(group)}" if many else base


def _line_styles(frame: pd.DataFrame) -> dict[tuple[str, str], Any]:
    """Per (impl, params): the default config solid, the others dashed, dash-dotted, dotted."""
    styles = {}
    for impl, rows in frame.groupby("impl", sort=True):
        params = sorted(rows["params"].unique(), key=lambda p: (p != "", p))
        for index, param in enumerate(params):
            styles[(impl, param)] = _PARAM_STYLES[index % len(_PARAM_STYLES)]
    return styles


def _stops(xs: Sequence[float], statuses: Sequence[str], ys: Sequence[float]) -> list[tuple[float, str, float]]:
    """(x, status, y of the last ok point before it or NaN) where a line stops: a non-ok after an ok or first."""
    stops = []
    previous, last_y = "ok", math.nan
    for x, status, y in zip(xs, statuses, ys, strict=True):
        if status == "ok":
            last_y = y
        elif previous != status:
            stops.append((x, status, last_y))
        previous = status
    return stops


def _mark_stops(
    ax, stops: list[tuple[float, str, float]], *, color, floor: float, placed: dict[tuple[float, float], int]
) -> None:
    """Draw each stop as an X labelled with its status, at the last ok value of its line (else at ``floor``).

    Labels of stops at the same place (counted in ``placed``, one dict per panel) are stacked, not overprinted.
    """
    for x, status, y in stops:
        y = y if math.isfinite(y) else floor
        count = placed.get((x, y), 0)
        placed[(x, y)] = count + 1
        ax.plot([x], [y], marker="X", markersize=9, color=color, markeredgecolor="black", linestyle="none", zorder=5)
        ax.annotate(
            STATUS_LABELS.get(status, status),
            (x, y),
            xytext=(5, 4 + 10 * count),
            textcoords="offset points",
            fontsize=8,
            color=color,
            fontweight="bold",
        )


def _floor(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return min(finite) if finite else 1.0


def _log2_axis(ax, seq_lens: Iterable[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ticks = sorted({int(n) for n in seq_lens})
    ax.set_xscale("log", base=2)
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        ax.tick_params(axis="x", labelrotation=45 if len(ticks) > 6 else 0)
        ax.set_xlim(ticks[0] / 1.2, ticks[-1] * 1.2)  # every length of the grid, run or not


def _plain_log_ticks(axis) -> None:
    """On a log axis spanning under two decades, tick labels as plain numbers (0.5, 2, 3) rather than
    2×10^0; wider axes keep matplotlib's powers of ten. Call after plotting (reads the view limits)."""
    from matplotlib.ticker import LogFormatter

    low, high = sorted(axis.get_view_interval())
    if low <= 0 or high / low >= 100:
        return
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _reference_slopes(ax, points: pd.DataFrame, *, column: str, scale: float = 1.0) -> None:
    """Dashed grey lines ∝ n and ∝ n², through the geometric mean of the values at the shortest length."""
    valid = points[points[column] > 0]
    if valid.empty or valid["seq_len"].nunique() < 2:
        return
    n0, n1 = valid["seq_len"].min(), valid["seq_len"].max()
    y0 = math.exp(np.log(valid[valid["seq_len"] == n0][column] / scale).mean())
    xs = np.array([n0, n1], dtype=float)
    for power, label, dashes in _REFERENCE_SLOPES:
        ys = y0 * (xs / n0) ** power
        ax.plot(xs, ys, color="0.45", linestyle=dashes, linewidth=1.1, zorder=1, label=f"∝ {label} (reference)")
        ax.annotate(label, (xs[-1], ys[-1]), xytext=(3, 0), textcoords="offset points", fontsize=8, color="0.35")


def _legend(figure, axes_list) -> None:
    """One legend for the whole figure, below the panels (implementations first, references last)."""
    handles, labels = [], []
    for ax in axes_list:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        order = sorted(
            range(len(labels)), key=lambda i: ("reference" in labels[i] or "stopped" in labels[i], labels[i])
        )
        figure.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="outside lower center",
            ncols=min(len(labels), 4),
            fontsize=8,
        )


def _suptitle(figure, title: str, group: dict[str, Any]) -> None:
    figure.suptitle(f"{title}\n{_group_title(group)}", fontsize=10)


def _no_data(ax) -> None:
    """Say so in a panel where nothing ran successfully (its X markers still show why)."""
    ax.text(0.5, 0.5, "no successful runs", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _failure_handle(figure_axes) -> None:
    """A legend entry explaining the X markers (added once, to the first axes, invisible)."""
    figure_axes.plot([], [], marker="X", color="0.5", markeredgecolor="black", linestyle="none", label="stopped here")


# ---------------------------------------------------------------- per-length curves (time, memory, roofline)


@dataclasses.dataclass(frozen=True)
class _CurveSpec:
    base: str
    title: str
    column: str
    scale: float
    ylabel: str
    log_y: bool
    references: bool
    caption: str


_TIME = _CurveSpec(
    base="time_vs_seq_len",
    title="Median time vs sequence length",
    column="median_s",
    scale=1.0,
    ylabel="median time per call (s)",
    log_y=True,
    references=True,
    caption="Median time per call against sequence length on log-log axes, one panel per mode; the grey dashed "
    "lines are reference slopes ∝ n and ∝ n², and an X marks where a curve stopped (OOM, timeout, skipped).",
)
_MEMORY = _CurveSpec(
    base="memory_vs_seq_len",
    title="Peak memory vs sequence length",
    column="peak_bytes",
    scale=MIB,
    ylabel="peak memory above inputs (MiB)",
    log_y=True,
    references=True,
    caption="Peak memory of one call (allocator level, above the resident inputs) against sequence length on "
    "log-log axes, with reference slopes ∝ n and ∝ n²; an X marks where a curve stopped.",
)
_ROOFLINE = _CurveSpec(
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


def _curve_figure(
    spec: _CurveSpec,
    rows: pd.DataFrame,
    *,
    group: dict[str, Any],
    palette: dict[str, Any],
    styles: dict[tuple[str, str], Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    modes = sorted(rows["mode"].unique())
    if ok_rows(rows)[spec.column].notna().sum() == 0 and (rows["status"] == "ok").all():
        return None
    with _style():
        figure, axes = _new_figure(ncols=len(modes))
        for ax, mode in zip(axes[0], modes, strict=True):
            panel = rows[rows["mode"] == mode]
            ok_values = ok_rows(panel)[spec.column] / spec.scale
            floor = _floor(ok_values)
            placed: dict[tuple[float, float], int] = {}
            for (impl, params), curve in panel.groupby(["impl", "params"], sort=True):
                curve = curve.sort_values("seq_len")
                color = palette[impl]
                good = curve[(curve["status"] == "ok") & curve[spec.column].notna()]
                ax.plot(
                    good["seq_len"],
                    good[spec.column] / spec.scale,
                    marker="o",
                    markersize=4,
                    color=color,
                    linestyle=styles[(impl, params)],
                    label=curve["label"].iloc[0],
                )
                values = (curve[spec.column] / spec.scale).where(curve["status"] == "ok").tolist()
                stops = _stops(curve["seq_len"].tolist(), curve["status"].tolist(), values)
                _mark_stops(ax, stops, color=color, floor=floor, placed=placed)
            if ok_values.dropna().empty:
                _no_data(ax)
            if spec.references:
                _reference_slopes(ax, ok_rows(panel), column=spec.column, scale=spec.scale)
            _log2_axis(ax, panel["seq_len"])
            if spec.log_y:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_xlabel("sequence length n (tokens)")
            ax.set_ylabel(spec.ylabel)
            ax.set_title(mode)
        _failure_handle(axes[0][0])
        _legend(figure, axes[0])
        _suptitle(figure, spec.title, group)
        png, svg = _save(figure, out_dir=out_dir, stem=stem)
    return FigureInfo(stem=stem, title=spec.title, caption=spec.caption, png=png, svg=svg)


# ---------------------------------------------------------------- fwd+bwd over fwd


def _backward_ratio_figure(
    table: pd.DataFrame,
    *,
    group: dict[str, Any],
    palette: dict[str, Any],
    styles: dict[tuple[str, str], Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    if table.empty:
        return None
    title = "Backward cost: fwd+bwd over fwd"
    with _style():
        figure, axes = _new_figure(ncols=1)
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
        _log2_axis(ax, table["seq_len"])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_ylabel("median time fwd+bwd / fwd (×)")
        _legend(figure, [ax])
        _suptitle(figure, title, group)
        png, svg = _save(figure, out_dir=out_dir, stem=stem)
    caption = (
        "The ratio of the forward-plus-backward median to the forward median at each length where both modes "
        "ran; the dashed line at 3× is what a backward costing twice the forward would give."
    )
    return FigureInfo(stem=stem, title=title, caption=caption, png=png, svg=svg)


# ---------------------------------------------------------------- layer stacks: memory vs depth


def _layers_figure(
    rows: pd.DataFrame,
    *,
    group: dict[str, Any],
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
    with _style():
        figure, axes = _new_figure(ncols=len(lengths), nrows=len(modes), width_in=3.8, height_in=3.2)
        for row_index, mode in enumerate(modes):
            for col_index, seq_len in enumerate(lengths):
                ax = axes[row_index][col_index]
                panel = rows[(rows["mode"] == mode) & (rows["seq_len"] == seq_len)]
                floor = _floor(ok_rows(panel)["peak_bytes"] / MIB)
                placed: dict[tuple[float, float], int] = {}
                for (impl, _params, residual), line in panel.groupby(["impl", "params", "residual"], sort=True):
                    line = line.sort_values("depth")
                    color = palette[impl]
                    good = line[(line["status"] == "ok") & line["peak_bytes"].notna()]
                    ax.plot(
                        good["depth"],
                        good["peak_bytes"] / MIB,
                        marker="o" if residual == "standard" else "s",
                        markersize=4,
                        color=color,
                        linestyle="-" if residual == "standard" else "--",
                        label=f"{line['label'].iloc[0]} {residual}",
                    )
                    values = (line["peak_bytes"] / MIB).where(line["status"] == "ok").tolist()
                    stops = _stops(line["depth"].tolist(), line["status"].tolist(), values)
                    _mark_stops(ax, stops, color=color, floor=floor, placed=placed)
                if ok_rows(panel)["peak_bytes"].dropna().empty:
                    _no_data(ax)
                depths = sorted(rows["depth"].unique())
                ax.set_xticks(depths)
                ax.set_xlim(min(depths) - 0.5, max(depths) + 0.5)
                ax.set_ylim(bottom=0)
                ax.set_xlabel("depth (layers)")
                ax.set_ylabel("peak memory above inputs (MiB)")
                ax.set_title(f"{mode}, n={seq_len}")
        _failure_handle(axes[0][0])
        _legend(figure, [ax for row in axes for ax in row])
        _suptitle(figure, title, group)
        png, svg = _save(figure, out_dir=out_dir, stem=stem)
    caption = (
        "Peak memory of a stack of transformer layers against its depth, solid for standard residuals and dashed "
        "for reversible ones (which should stay nearly flat in fwd+bwd), one panel per mode and length."
    )
    return FigureInfo(stem=stem, title=title, caption=caption, png=png, svg=svg)


# ---------------------------------------------------------------- speed vs approximation error


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (error, time) points no other point beats on both (sorted by error)."""
    front, best_time = [], math.inf
    for error, time_s in sorted(points):
        if time_s < best_time:
            front.append((error, time_s))
            best_time = time_s
    return front


def _pareto_figure(
    rows: pd.DataFrame,
    *,
    group: dict[str, Any],
    palette: dict[str, Any],
    out_dir: Path,
    stem: str,
) -> FigureInfo | None:
    forward = ok_rows(rows[rows["mode"] == "fwd"])
    measured = forward[forward["rel_error"].notna()]
    if measured.empty:
        return None
    seq_len = int(measured["seq_len"].max())
    at_length = forward[forward["seq_len"] == seq_len]
    title = f"Speed vs approximation error at n={seq_len}"
    panels = [("rel_error", "random inputs"), ("rel_error_peaked", "peaked attention")]
    with _style():
        figure, axes = _new_figure(ncols=len(panels))
        for ax, (column, what) in zip(axes[0], panels, strict=True):
            approx = at_length[at_length[column] > 0]
            for record in approx.sort_values(["impl", "params"]).to_dict("records"):
                ax.plot(
                    [record[column]],
                    [record["median_s"]],
                    marker="o",
                    markersize=7,
                    color=palette[record["impl"]],
                    linestyle="none",
                    label=record["label"],
                )
                ax.annotate(
                    record["label"],
                    (record[column], record["median_s"]),
                    xytext=(5, 3),
                    textcoords="offset points",
                    fontsize=7,
                )
            front = _pareto_front(list(zip(approx[column], approx["median_s"], strict=True)))
            if len(front) > 1:
                ax.plot(
                    *zip(*front, strict=True),
                    color="0.6",
                    linewidth=1,
                    drawstyle="steps-post",
                    zorder=0,
                    label="Pareto front",
                )
            exact = at_length[at_length["rel_error"].isna() & at_length["exact"].map(lambda value: value is True)]
            for record in exact.sort_values(["impl", "params"]).to_dict("records"):
                ax.axhline(
                    record["median_s"],
                    color=palette[record["impl"]],
                    linestyle=(0, (5, 3)),
                    linewidth=1.1,
                    label=f"{record['label']} (exact)",
                )
                ax.annotate(
                    f"{record['label']} (exact)",
                    (0.02, record["median_s"]),
                    xycoords=("axes fraction", "data"),
                    xytext=(0, 3),
                    textcoords="offset points",
                    fontsize=7,
                    color=palette[record["impl"]],
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("relative error ‖out − exact‖ / ‖exact‖")
            ax.set_ylabel("median time per call (s)")
            ax.set_title(what)
        _legend(figure, axes[0])
        _suptitle(figure, title, group)
        png, svg = _save(figure, out_dir=out_dir, stem=stem)
    caption = (
        f"Forward time against relative error at n={seq_len} (the longest length with an error measurement), on "
        "random and on peaked inputs; dashed horizontal lines are exact implementations, the grey steps the "
        "Pareto front (nothing is both faster and more accurate)."
    )
    return FigureInfo(stem=stem, title=title, caption=caption, png=png, svg=svg)


# ---------------------------------------------------------------- all figures


def make_figures(analysis: Analysis, *, out_dir: Path) -> list[FigureInfo]:
    """Draw every figure the results allow into ``out_dir``; figures with nothing to show are left out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = analysis.results.frame
    palette = impl_palette(frame["impl"])
    styles = _line_styles(frame)
    figures: list[FigureInfo | None] = []
    attention = frame[frame["scope"] == "attention"].assign(roofline_percent=lambda f: f["roofline"] * 100.0)
    attention_groups = _panel_groups(attention)
    many = len(attention_groups) > 1
    for spec in (_TIME, _MEMORY):
        for group, rows in attention_groups:
            figures.append(
                _curve_figure(
                    spec,
                    rows,
                    group=group,
                    palette=palette,
                    styles=styles,
                    out_dir=out_dir,
                    stem=_stem(spec.base, group, many=many),
                )
            )
    ratio = analysis.backward_ratio
    ratio = ratio[ratio["scope"] == "attention"]
    for group, rows in _panel_groups(ratio):
        figures.append(
            _backward_ratio_figure(
                rows,
                group=group,
                palette=palette,
                styles=styles,
                out_dir=out_dir,
                stem=_stem("fwd_bwd_ratio", group, many=many),
            )
        )
    layers = frame[frame["scope"] == "layers"]
    layer_groups = _panel_groups(layers)
    for group, rows in layer_groups:
        figures.append(
            _layers_figure(
                rows,
                group=group,
                palette=palette,
                out_dir=out_dir,
                stem=_stem("layers_memory_vs_depth", group, many=len(layer_groups) > 1),
            )
        )
    for group, rows in attention_groups:
        figures.append(
            _pareto_figure(
                rows, group=group, palette=palette, out_dir=out_dir, stem=_stem("speed_vs_error", group, many=many)
            )
        )
    for group, rows in attention_groups:
        if ok_rows(rows)["roofline"].notna().any():
            figures.append(
                _curve_figure(
                    _ROOFLINE,
                    rows,
                    group=group,
                    palette=palette,
                    styles=styles,
                    out_dir=out_dir,
                    stem=_stem(_ROOFLINE.base, group, many=many),
                )
            )
    return [figure for figure in figures if figure is not None]
