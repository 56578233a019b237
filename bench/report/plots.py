"""Which figures a report has: one of each kind per panel group (a setup of one environment), their file
names, the palette and line styles they share; :func:`make_figures` draws them all (never imports torch).

Conventions shared by every figure: one colour per implementation, from
:func:`bench.report.plot_style.impl_palette` over the sorted names of all implementations in the results;
non-default configs of one implementation differ by line style; a case that did not run (OOM, timeout,
skipped, error, crashed) is drawn as an ``X`` with its status written beside it at the length (or depth)
where its curve stopped. The kinds of figure are drawn by :mod:`bench.report.figures`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report import figures
from bench.report.analysis import Analysis
from bench.report.load import ok_rows
from bench.report.plot_style import FigureInfo, impl_palette

# a figure per combination of these; its panels split by mode (the lines are implementations)
PANEL_GROUP_COLUMNS = ("env_id", "device", "dtype", "causal", "batch", "heads", "kv_heads", "q_len", "head_dim")
_PARAM_STYLES = ("-", "--", "-.", ":")


# ---------------------------------------------------------------- figure groups, titles and line styles


def _group_title(group: dict[str, Any]) -> str:
    causal = "causal" if group["causal"] else "non-causal"
    kv = f" ({group['kv_heads']} key/value)" if group["kv_heads"] != group["heads"] else ""
    queries = f", {group['q_len']} queries against n keys" if group["q_len"] else ""
    return (
        f"{group['device']} {group['dtype']}, {causal}, batch {group['batch']}, "
        f"{group['heads']} heads{kv} × {group['head_dim']}{queries}, env {group['env_id']}"
    )


def _group_slug(group: dict[str, Any]) -> str:
    causal = "causal" if group["causal"] else "full"
    kv = f"kv{group['kv_heads']}" if group["kv_heads"] != group["heads"] else ""
    queries = f"-q{group['q_len']}" if group["q_len"] else ""
    return (
        f"{group['env_id']}-{group['device'].replace(':', '')}-{group['dtype']}-{causal}"
        f"-b{group['batch']}h{group['heads']}{kv}d{group['head_dim']}{queries}"
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


# ---------------------------------------------------------------- all figures


def make_figures(analysis: Analysis, *, out_dir: Path) -> list[FigureInfo]:
    """Draw every figure the results allow into ``out_dir``; figures with nothing to show are left out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = analysis.results.frame
    palette = impl_palette(frame["impl"])
    styles = _line_styles(frame)
    drawn: list[FigureInfo | None] = []

    def draw(kind: Callable[..., FigureInfo | None], rows: pd.DataFrame, group: dict[str, Any], **how: Any) -> None:
        """One figure of ``kind`` for one panel group, named ``base`` (with the group when there are ``many``)."""
        stem = _stem(how.pop("base"), group, many=how.pop("many"))
        drawn.append(kind(rows, subtitle=_group_title(group), palette=palette, out_dir=out_dir, stem=stem, **how))

    attention = frame[frame["scope"] == "attention"].assign(roofline_percent=lambda f: f["roofline"] * 100.0)
    attention_groups = _panel_groups(attention)
    many = len(attention_groups) > 1
    for spec in (figures.TIME, figures.MEMORY):
        for group, rows in attention_groups:
            draw(figures.curve_figure, rows, group, base=spec.base, many=many, spec=spec, styles=styles)
    ratio = analysis.backward_ratio
    for group, rows in _panel_groups(ratio[ratio["scope"] == "attention"]):
        draw(figures.backward_ratio_figure, rows, group, base="fwd_bwd_ratio", many=many, styles=styles)
    layer_groups = _panel_groups(frame[frame["scope"] == "layers"])
    for group, rows in layer_groups:
        draw(figures.layers_figure, rows, group, base="layers_memory_vs_depth", many=len(layer_groups) > 1)
    grouped = analysis.grouped_heads.assign(kv_heads=lambda f: f["heads"])  # one figure for all the counts
    grouped_groups = [(group, analysis.grouped_heads.loc[rows.index]) for group, rows in _panel_groups(grouped)]
    for group, rows in grouped_groups:
        draw(figures.grouped_heads_figure, rows, group, base="grouped_heads", many=len(grouped_groups) > 1)
    for group, rows in attention_groups:
        draw(figures.pareto_figure, rows, group, base="speed_vs_error", many=many)
    roofline = figures.ROOFLINE
    for group, rows in attention_groups:
        if ok_rows(rows)["roofline"].notna().any():
            draw(figures.curve_figure, rows, group, base=roofline.base, many=many, spec=roofline, styles=styles)
    return [figure for figure in drawn if figure is not None]
