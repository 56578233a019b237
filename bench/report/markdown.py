"""The markdown report: ``attnbench report RESULTS... --out reports/`` (never imports torch).

Writes ``README.md`` (environment, grid, headline table of exponents and crossovers, tables by length,
every figure with one sentence saying what it shows), ``tables/*.csv`` and ``figures/*.png|svg``.

Deterministic: the same results give byte-identical markdown and CSV. Everything is sorted, floats have
fixed formats, and the only times printed are the run timestamps stored in the records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report import analysis
from bench.report.analysis import CURVE_COLUMNS, STATUS_LABELS, Analysis

MIB = 2**20
GIB = 2**30
CSV_FLOAT_FORMAT = "%.6g"
# columns of the tables by length that name a curve; the others are shown only when they vary
_ALWAYS_SHOWN = ("impl", "params", "mode")
_SHOWN_WHEN_VARYING = ("env_id", "device", "dtype", "causal", "batch", "heads", "head_dim")
_HEADERS = {
    "env_id": "env",
    "device": "device",
    "dtype": "dtype",
    "causal": "causal",
    "batch": "batch",
    "heads": "heads",
    "head_dim": "head dim",
    "label": "impl",
    "mode": "mode",
    "depth": "depth",
    "residual": "residual",
}
_TABLE_FILES = (
    ("measurements", "every record kept (one per environment and case; `samples` left out), all statuses"),
    ("exponents", "fitted time and memory exponents with their intervals, beside the theoretical ones"),
    ("crossovers", "per curve and baseline: the length from which it is faster, and the common range"),
    ("speedups", "per ok case: median and the ratio of each baseline's median to it (above 1: faster)"),
    ("roofline", "per ok case: FLOPs, achieved FLOP/s, the measured matmul peak, and their ratio"),
    ("memory_budget", "per curve: the longest length whose peak memory fits the budget, and how it was found"),
    ("errors", "per case that measured it: relative error against exact attention, random and peaked inputs"),
    ("backward_ratio", "per curve and length: median fwd+bwd time over median fwd time"),
    ("layers", "layer-stack cases: median time and peak memory by depth and residual kind"),
    ("stops", "where each curve stopped: the first non-ok length and its status and message"),
    ("environments", "the environments the records come from, with their identity fields"),
)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What the report computes; each has the CLI's default."""

    min_fit_seq_len: int = analysis.DEFAULT_MIN_FIT_SEQ_LEN
    max_fit_seq_len: int | None = None
    confidence: float = analysis.DEFAULT_CONFIDENCE
    budget_bytes: float = analysis.DEFAULT_MEMORY_BUDGET_BYTES
    baselines: tuple[str, ...] = analysis.BASELINES
    figures: bool = True


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    """What a report wrote."""

    readme: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]
    problems: tuple[str, ...]


# ---------------------------------------------------------------- formatting


def fmt_sig(value: Any, *, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, without exponent between 1e-3 and 10**digits; ``–`` for none."""
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits:
        return f"{value:,.0f}"
    if magnitude < -3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def fmt_fixed(value: Any, *, decimals: int = 2, suffix: str = "") -> str:
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    return f"{value:.{decimals}f}{suffix}"


def fmt_int(value: Any) -> str:
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    return f"{round(value)}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align_right: Sequence[bool] = ()) -> str:
    """A GitHub markdown table; pipes in cells are escaped."""
    rows = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    align = list(align_right) + [False] * (len(headers) - len(align_right))
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if right else "---" for right in align) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in frame and frame[c].nunique(dropna=False) > 1]


def _curve_name_columns(frame: pd.DataFrame) -> list[str]:
    return [*_varying(frame, _SHOWN_WHEN_VARYING), "label", "mode"]


def _cell(row: Mapping[str, Any], column: str) -> str:
    value = row[column]
    if column == "causal":
        return "yes" if value else "no"
    return str(value)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")
    return path


# ---------------------------------------------------------------- sections


def _inputs_section(an: Analysis) -> list[str]:
    results = an.results
    counts = results.frame.groupby("source_path").size()
    lines = ["# attnbench report", "", "Generated by `attnbench report` from:", ""]
    for path in results.paths:
        lines.append(f"- `{path}`: {int(counts.get(path, 0))} records kept")
    if results.superseded:
        lines += [
            "",
            f"{results.superseded} records were replaced by a later record of the same case in the same "
            "environment (files in the order given, lines in order).",
        ]
    if results.problems:
        lines += ["", f"**{len(results.problems)} lines were skipped:**", ""]
        lines += [f"- {problem}" for problem in results.problems]
    return lines


def _environment_section(an: Analysis) -> list[str]:
    envs = an.results.environments
    lines = ["## Environment", ""]
    if len(envs) > 1:
        lines += [
            f"> **Warning:** these results come from {len(envs)} environments that are not comparable "
            "(host, CPU model, GPU, torch version or thread count differ). They are never merged: every table "
            "and figure keeps them apart, the `env` column or the figure title says which is which.",
            "",
        ]
    headers = ["env", "host", "CPU", "GPU", "torch", "threads", "python", "git commits", "runs from", "to", "peaks"]
    rows = [
        [
            f"`{env['env_id']}`",
            env["host"],
            env["cpu_model"],
            env["gpu_name"] or "–",
            env["torch_version"],
            env["num_threads"],
            env["python_version"],
            env["git_commits"] or "–",
            env["first_timestamp"] or "–",
            env["last_timestamp"] or "–",
            _peaks_text(env["peak_flops_per_s"]),
        ]
        for env in envs.to_dict("records")
    ]
    lines.append(markdown_table(headers, rows))
    lines += ["", "peaks: the machine's measured matmul FLOP/s per device and dtype (the roofline's ceiling)."]
    return lines


def _peaks_text(text: str) -> str:
    if not text:
        return "–"
    parts = []
    for item in text.split(","):
        name, value = item.split("=")
        parts.append(f"{name}: {float(value) / 1e9:.1f} GFLOP/s")
    return "; ".join(parts)


def _grid_section(an: Analysis) -> list[str]:
    frame = an.results.frame
    lines = ["## Grid", ""]

    def values(column: str, rows: pd.DataFrame = frame) -> str:
        return ", ".join(str(v) for v in sorted(rows[column].unique()))

    lines.append(f"- implementations: {', '.join(sorted(frame['label'].unique()))}")
    lines.append(f"- sequence lengths: {values('seq_len')}")
    lines.append(f"- modes: {values('mode')}; scopes: {values('scope')}")
    lines.append(f"- devices: {values('device')}; dtypes: {values('dtype')}; causal: {values('causal')}")
    lines.append(f"- batch: {values('batch')}; heads: {values('heads')}; head dim: {values('head_dim')}")
    layers = frame[frame["scope"] == "layers"]
    if len(layers):
        lines.append(f"- layer stacks: depths {values('depth', layers)}; residuals {values('residual', layers)}")
    counts = frame["status"].value_counts()
    outcome = ", ".join(f"{status} {int(counts[status])}" for status in sorted(counts.index))
    lines.append(f"- outcomes: {outcome} ({len(frame)} cases)")
    return lines


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


def _headline_section(an: Analysis) -> list[str]:
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
        f"(no further than {analysis.MAX_EXTRAPOLATION}× the longest measured length: `>` marks that limit).",
        "",
    ]
    crossovers = {(an.curve_key(row), row["baseline"]): row for row in an.crossovers.to_dict("records")}
    budgets = {an.curve_key(row): row for row in an.budget.to_dict("records")}
    best_roofline = an.roofline.groupby(list(CURVE_COLUMNS))["roofline"].max().to_dict()
    errors = _largest_length_errors(an.errors)
    name_columns = _curve_name_columns(exponents)
    headers = [
        *(_HEADERS[c] for c in name_columns),
        "time k [CI]",
        "theory",
        "memory k [CI]",
        "theory",
        *(f"faster than {b} from n" for b in an.baselines),
        "best roofline",
        f"longest n in {budget}",
        "rel. error random / peaked (n)",
    ]
    rows = []
    for row in exponents.to_dict("records"):
        key = an.curve_key(row)
        cells = [_cell(row, c) for c in name_columns]
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
    found = {}
    for key, rows in errors.groupby(list(CURVE_COLUMNS), sort=True):
        last = rows.sort_values("seq_len").iloc[-1]
        peaked = last.get("rel_error_peaked")
        peaked_text = f"{peaked:.2f}" if isinstance(peaked, float) and math.isfinite(peaked) else "–"
        found[key] = f"{last['rel_error']:.2f} / {peaked_text} ({int(last['seq_len'])})"
    return found


def _by_length_table(
    frame: pd.DataFrame, *, value: str, scale: float, digits: int = 3, only_ok_values: bool = True
) -> str:
    """Rows: curves; columns: lengths; cells: the value, or the status where the case did not run."""
    lengths = sorted(frame["seq_len"].unique())
    name_columns = _curve_name_columns(frame)
    headers = [*(_HEADERS[c] for c in name_columns), *(str(n) for n in lengths)]
    rows = []
    for _, curve in analysis.iter_curves(frame):
        first = curve.iloc[0].to_dict()
        by_length = {row["seq_len"]: row for row in curve.to_dict("records")}
        cells = [_cell(first, c) for c in name_columns]
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


def _by_length_sections(an: Analysis) -> list[str]:
    frame = an.results.frame
    attention = frame[frame["scope"] == "attention"]
    if attention.empty:
        return []
    lines = [
        "## Median time by length (ms)",
        "",
        "Median of the per-call timing samples; a status where the case did not run.",
        "",
        _by_length_table(attention, value="median_s", scale=1e-3),
        "",
        "## Peak memory by length (MiB)",
        "",
        "Allocator-level peak of one call above the inputs already resident.",
        "",
        _by_length_table(attention, value="peak_bytes", scale=MIB),
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
            f"## Speedup over {baseline} by length (×)",
            "",
            f"Median time of `{baseline}` divided by the implementation's at the same length and setup: "
            "above 1 it is faster.",
            "",
            _by_length_table(table, value=column, scale=1.0),
        ]
    return lines


def _layers_section(an: Analysis) -> list[str]:
    layers = an.layers
    if layers.empty:
        return []
    depths = sorted(layers["depth"].unique())
    name_columns = [*_varying(layers, _SHOWN_WHEN_VARYING), "label", "mode"]
    headers = [*(_HEADERS[c] for c in name_columns), "n", "residual", *(f"depth {d}" for d in depths)]
    rows = []
    group_columns = [*[c for c in CURVE_COLUMNS if c not in ("depth", "residual")], "seq_len", "residual"]
    for _, group in layers.groupby(group_columns, sort=True):
        first = group.iloc[0].to_dict()
        by_depth = {row["depth"]: row for row in group.to_dict("records")}
        cells = [_cell(first, c) for c in name_columns] + [str(first["seq_len"]), first["residual"]]
        for depth in depths:
            row = by_depth.get(depth)
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(STATUS_LABELS[row["status"]])
            else:
                cells.append(f"{fmt_sig(row['peak_bytes'] / MIB)} MiB / {fmt_sig(row['median_s'] * 1e3)} ms")
        rows.append(cells)
    return [
        "## Layer stacks",
        "",
        "Peak memory and median time of a stack of transformer layers by depth, standard against reversible "
        "residuals (a reversible stack recomputes activations in backward instead of storing them). Both "
        "stacks also hold one gradient per parameter, which grows with depth whatever the residual: "
        "about 12·d² weights per layer (four projections and a feed-forward of width 4d; d = heads × head_dim: "
        "12 MB per layer in float32 at d = 512), "
        "so a reversible stack is flattest where activations dominate, at long sequences.",
        "",
        markdown_table(headers, rows),
    ]


def _errors_section(an: Analysis) -> list[str]:
    errors = an.errors
    if errors.empty:
        return []
    name_columns = _curve_name_columns(errors)
    headers = [*(_HEADERS[c] for c in name_columns), "n", "rel. error (random)", "rel. error (peaked)"]
    rows = [
        [
            *(_cell(row, c) for c in name_columns),
            str(row["seq_len"]),
            _sci(row["rel_error"]),
            _sci(row["rel_error_peaked"]),
        ]
        for row in errors.to_dict("records")
    ]
    return [
        "## Approximation error",
        "",
        "`‖out − exact‖ / ‖exact‖` against exact attention in float64 on the same inputs. Random inputs (standard "
        "normal q, k, v) give nearly uniform exact attention, whose output shrinks like 1/√n: a mechanism that "
        "keeps a fixed number of keys per query then shows an error that grows with n and can pass 1. Peaked "
        "inputs scale q and k so that the scores have a standard deviation of 4: each query puts most of its "
        "weight on a few keys, anywhere in the sequence.",
        "",
        markdown_table(headers, rows),
    ]


def _sci(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, float) and math.isfinite(value) else "–"


def _stops_section(an: Analysis) -> list[str]:
    stops = an.stops
    if stops.empty:
        return []
    name_columns = _curve_name_columns(stops.assign(label=stops["impl"]))
    extra = ["scope", "depth", "residual"] if (stops["scope"] == "layers").any() else []
    headers = [*(_HEADERS.get(c, c) for c in name_columns), *extra, "n", "status", "message"]
    rows = []
    for row in stops.assign(
        label=[analysis.curve_label(i, p) for i, p in zip(stops["impl"], stops["params"], strict=True)]
    ).to_dict("records"):
        message = row["message"] if isinstance(row["message"], str) else ""
        rows.append(
            [
                *(_cell(row, c) for c in name_columns),
                *(str(row[c]) for c in extra),
                str(row["seq_len"]),
                row["status_label"],
                message[:120],
            ]
        )
    return [
        "## Where curves stopped",
        "",
        "The first length (or depth) at which a curve did not run, and why; the figures mark these with an X.",
        "",
        markdown_table(headers, rows),
    ]


def _figures_section(figures: Sequence[Any], *, out_dir: Path) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for figure in figures:
        png = figure.png.relative_to(out_dir).as_posix()
        svg = figure.svg.relative_to(out_dir).as_posix()
        lines += [f"### {figure.title}", "", f"![{figure.title}]({png})", "", f"{figure.caption} ([SVG]({svg}))", ""]
    return lines[:-1]


def _tables_section(written: Sequence[Path], *, out_dir: Path) -> list[str]:
    descriptions = dict(_TABLE_FILES)
    lines = ["## Tables", ""]
    for path in written:
        lines.append(
            f"- [{path.relative_to(out_dir).as_posix()}]({path.relative_to(out_dir).as_posix()}): "
            f"{descriptions[path.stem]}"
        )
    return lines


# ---------------------------------------------------------------- writing


def _tables(an: Analysis) -> dict[str, pd.DataFrame]:
    measurements = an.results.frame.drop(columns=["samples"])
    return {
        "measurements": measurements,
        "exponents": an.exponents,
        "crossovers": an.crossovers,
        "speedups": an.speedups,
        "roofline": an.roofline,
        "memory_budget": an.budget,
        "errors": an.errors,
        "backward_ratio": an.backward_ratio,
        "layers": an.layers,
        "stops": an.stops,
        "environments": an.results.environments,
    }


def _clear_generated(folder: Path, *, suffixes: Sequence[str]) -> None:
    """Remove what an earlier report left in one of the report's own folders (only files it writes)."""
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in suffixes:
                path.unlink()


def render_markdown(an: Analysis, *, figures: Sequence[Any], tables: Sequence[Path], out_dir: Path) -> str:
    """The README text (pure: the same inputs give the same text)."""
    sections = [
        _inputs_section(an),
        _environment_section(an),
        _grid_section(an),
        _headline_section(an),
        _by_length_sections(an),
        _layers_section(an),
        _errors_section(an),
        _stops_section(an),
        _figures_section(figures, out_dir=out_dir),
        _tables_section(tables, out_dir=out_dir),
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def write_report(
    paths: Sequence[str | Path],
    *,
    out_dir: str | Path,
    options: ReportOptions | None = None,
    complexities: Mapping[str, Mapping[str, str]] | None = None,
) -> ReportFiles:
    """Load ``paths``, analyse them and write the report into ``out_dir``; raises ``ResultsError`` on bad input."""
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    results = analysis.load_results(paths, complexities=complexities)
    an = analysis.analyze(
        results,
        min_fit_seq_len=options.min_fit_seq_len,
        max_fit_seq_len=options.max_fit_seq_len,
        confidence=options.confidence,
        budget_bytes=options.budget_bytes,
        baselines=options.baselines,
    )
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    tables_dir.mkdir(parents=True, exist_ok=True)
    _clear_generated(tables_dir, suffixes=(".csv",))
    _clear_generated(figures_dir, suffixes=(".png", ".svg"))
    written = [_csv(table, tables_dir / f"{name}.csv") for name, table in _tables(an).items()]
    figures = []
    if options.figures:
        from bench.report import plots

        figures = plots.make_figures(an, out_dir=figures_dir)
    readme = out_dir / "README.md"
    text = render_markdown(an, figures=figures, tables=written, out_dir=out_dir)
    readme.write_text(text, encoding="utf-8", newline="\n")
    return ReportFiles(
        readme=readme,
        tables=tuple(written),
        figures=tuple(path for figure in figures for path in (figure.png, figure.svg)),
        problems=results.problems,
    )
