"""How every figure looks and is saved: seaborn styling, the palette, axes helpers, PNG and SVG files.

Every figure is drawn inside :func:`figure_style` (an ``rc_context``): importing this module changes no
global state, and neither does plotting. Figures are built with ``matplotlib.figure.Figure`` rather than
pyplot, so no GUI backend is ever selected. Each is saved as PNG and as SVG; the SVG is deterministic (fixed
``svg.hashsalt``, no date in its metadata). matplotlib and seaborn are imported inside the functions.
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

from bench.report.load import STATUS_LABELS

SVG_HASHSALT = "attnbench"
PNG_DPI = 120
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
def figure_style() -> Iterator[None]:
    """Seaborn's whitegrid look and deterministic SVG, for the duration of one figure only."""
    import matplotlib

    with matplotlib.rc_context(_rc()):
        yield


def new_figure(*, ncols: int, nrows: int = 1, width_in: float = 4.6, height_in: float = 3.6):
    """A figure not attached to pyplot (no backend selection, no global registry of figures)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(width_in * ncols, 6.4), height_in * nrows + 0.8), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


# ---------------------------------------------------------------- axes


def lowest_positive(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return min(finite) if finite else 1.0


def log2_axis(ax, seq_lens: Iterable[int]) -> None:
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


def plain_log_ticks(axis) -> None:
    """On a log axis spanning under two decades, tick labels as plain numbers (0.5, 2, 3) rather than
    2×10^0; wider axes keep matplotlib's powers of ten. Call after plotting (reads the view limits)."""
    from matplotlib.ticker import LogFormatter

    low, high = sorted(axis.get_view_interval())
    if low <= 0 or high / low >= 100:
        return
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def reference_slopes(ax, points: pd.DataFrame, *, column: str, scale: float = 1.0) -> None:
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


def no_data(ax) -> None:
    """Say so in a panel where nothing ran successfully (its X markers still show why)."""
    ax.text(0.5, 0.5, "no successful runs", transform=ax.transAxes, ha="center", va="center", color="0.5")


def failure_handle(figure_axes) -> None:
    """A legend entry explaining the X markers (added once, to the first axes, invisible)."""
    figure_axes.plot([], [], marker="X", color="0.5", markeredgecolor="black", linestyle="none", label="stopped here")


# ---------------------------------------------------------------- lines and where they stopped


def line_with_stops(
    ax,
    line: pd.DataFrame,
    *,
    x: str,
    column: str,
    scale: float,
    floor: float,
    placed: dict[tuple[float, float], int],
    **style: Any,
) -> None:
    """Plot ``column / scale`` against ``x`` through the ok points of ``line`` (sorted by ``x``), then mark
    with an X where it stopped (see :func:`_mark_stops` for ``floor`` and ``placed``)."""
    good = line[(line["status"] == "ok") & line[column].notna()]
    ax.plot(good[x], good[column] / scale, markersize=4, **style)
    values = (line[column] / scale).where(line["status"] == "ok").tolist()
    stops = _line_stops(line[x].tolist(), line["status"].tolist(), values)
    _mark_stops(ax, stops, color=style["color"], floor=floor, placed=placed)


def _line_stops(xs: Sequence[float], statuses: Sequence[str], ys: Sequence[float]) -> list[tuple[float, str, float]]:
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


# ---------------------------------------------------------------- legend, title, saving


def finish_figure(
    figure, axes_list, *, title: str, subtitle: str, caption: str, out_dir: Path, stem: str
) -> FigureInfo:
    """The legend below the panels, the title above them, and the figure saved as ``stem``.png and .svg."""
    _figure_legend(figure, axes_list)
    figure.suptitle(f"{title}\n{subtitle}", fontsize=10)
    png, svg = _save_figure(figure, out_dir=out_dir, stem=stem)
    return FigureInfo(stem=stem, title=title, caption=caption, png=png, svg=svg)


def _figure_legend(figure, axes_list) -> None:
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


def _save_figure(figure, *, out_dir: Path, stem: str) -> tuple[Path, Path]:
    png = out_dir / f"{stem}.png"
    svg = out_dir / f"{stem}.svg"
    figure.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
    figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png, svg
