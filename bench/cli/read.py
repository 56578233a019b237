"""``attnbench report``, ``compare`` and ``export``: the commands that read results files (no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench.cli.common import HelpWithDefaults, UsageError, warn
from bench.outputs import AtomicFile, OutputDir, OutputError, check_regular_file
from bench.results import ResultsError, summarize_problems


def _results_paths(items: Sequence[str]) -> list[Path]:
    """The results files named: a file as given, a directory as its ``*.jsonl`` files (sorted)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not found:
                raise UsageError(f"no .jsonl results files in directory {path}")
            paths.extend(found)
        elif not path.exists():
            raise UsageError(f"results file {path} does not exist")
        else:
            try:
                check_regular_file(path)
            except OutputError as exc:
                raise UsageError(str(exc)) from None
            paths.append(path)
    return paths


def _load(paths: list[Path]):
    """Results files into pandas; their skipped lines are reported as warnings, as every reader does."""
    from bench.report.load import load_results

    try:
        results = load_results(paths)
    except ResultsError as exc:
        raise UsageError(str(exc)) from None
    warn(summarize_problems(results.problems))
    return results


def _cmd_report(args: argparse.Namespace) -> int:
    from bench.report.markdown import ReportOptions, write_report

    paths = _results_paths(args.results)
    if args.fit_min_seq_len < 1:
        raise UsageError(f"--fit-min-seq-len must be at least 1, got {args.fit_min_seq_len}")
    if args.fit_max_seq_len is not None and args.fit_max_seq_len < args.fit_min_seq_len:
        raise UsageError("--fit-max-seq-len must not be below --fit-min-seq-len")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be between 0 and 1, got {args.confidence}")
    if not 0 < args.budget_gb < float("inf"):
        raise UsageError(f"--budget-gb must be a positive number, got {args.budget_gb}")
    options = ReportOptions(
        min_fit_seq_len=args.fit_min_seq_len,
        max_fit_seq_len=args.fit_max_seq_len,
        confidence=args.confidence,
        budget_bytes=args.budget_gb * 2**30,
        baselines=tuple(name.strip() for name in args.baselines.split(",") if name.strip()),
        figures=not args.no_figures,
    )
    try:
        out = OutputDir(args.out)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    try:
        files = write_report(paths, out_dir=out.path, options=options)
    except ResultsError as exc:
        out.discard()
        raise UsageError(str(exc)) from None
    except OSError as exc:
        out.discard()
        raise UsageError(f"cannot write the report to {out.path}: {exc.strerror or exc}") from None
    warn(summarize_problems(files.problems))
    print(f"report: {files.readme} ({len(files.tables)} tables, {len(files.figures) // 2} figures)")
    return 0


def add_report_parser(sub) -> None:
    from bench.report import defaults

    p = sub.add_parser(
        "report",
        help="write a markdown report with tables and figures from results files",
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.jsonl) or folders of them")
    p.add_argument("--out", default="reports", help="output folder (README.md, tables/, figures/)")
    p.add_argument(
        "--fit-min-seq-len",
        type=int,
        default=defaults.DEFAULT_MIN_FIT_SEQ_LEN,
        help="shortest length entering the exponent fits",
    )
    p.add_argument("--fit-max-seq-len", type=int, help="longest length entering the exponent fits (default: all)")
    p.add_argument(
        "--confidence", type=float, default=defaults.DEFAULT_CONFIDENCE, help="level of the exponent intervals"
    )
    p.add_argument(
        "--budget-gb",
        type=float,
        default=defaults.DEFAULT_MEMORY_BUDGET_BYTES / 2**30,
        help="memory budget for 'longest length that fits'",
    )
    p.add_argument(
        "--baselines",
        default=",".join(defaults.DEFAULT_BASELINES),
        help="implementations to compute speedups and crossovers against",
    )
    p.add_argument("--no-figures", action="store_true", help="tables and markdown only")
    p.set_defaults(func=_cmd_report)


def _cmd_compare(args: argparse.Namespace) -> int:
    from bench.report.compare import CompareError, compare_results, format_comparison

    base_paths, new_paths = _results_paths([args.base]), _results_paths([args.new])
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.fail_above is not None and not 0 < args.fail_above < float("inf"):
        raise UsageError(f"--fail-above must be a positive ratio, got {args.fail_above}")
    if not 0 <= args.min_change < 1:
        raise UsageError(f"--min-change must be between 0 and 1, got {args.min_change}")
    try:
        csv = AtomicFile(args.csv) if args.csv else None
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    try:
        base, new = _load(base_paths), _load(new_paths)
        comparison = compare_results(base, new, alpha=args.alpha, any_env=args.any_env, min_change=args.min_change)
    except (UsageError, CompareError) as exc:
        if csv is not None:
            csv.discard()
        raise UsageError(str(exc)) from None
    print(format_comparison(comparison, fail_above=args.fail_above))
    if csv is not None:
        try:
            csv.commit(comparison.rows.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
        except OutputError as exc:
            raise UsageError(str(exc)) from None
        print(f"table: {csv.path}")
    if args.fail_above is not None and len(comparison.regressions(fail_above=args.fail_above)):
        return 1
    return 0


def add_compare_parser(sub) -> None:
    from bench.report.defaults import DEFAULT_ALPHA, DEFAULT_MIN_CHANGE

    p = sub.add_parser(
        "compare", help="compare two runs case by case, with a significance test", formatter_class=HelpWithDefaults
    )
    p.add_argument("base", metavar="BASE", help="results file (or folder) of the reference run")
    p.add_argument("new", metavar="NEW", help="results file (or folder) of the run to judge")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level of the Mann-Whitney U test")
    p.add_argument(
        "--min-change",
        type=float,
        default=DEFAULT_MIN_CHANGE,
        metavar="FRACTION",
        help="a significant change of the median within 1 +- FRACTION is reported as 'within'",
    )
    p.add_argument(
        "--fail-above",
        type=float,
        metavar="RATIO",
        help="exit 1 if a case is significantly slower than RATIO x base, e.g. 1.10 (default: never)",
    )
    p.add_argument("--any-env", action="store_true", help="match cases across environments that are not comparable")
    p.add_argument("--csv", help="also write the per-case table to this CSV file")
    p.set_defaults(func=_cmd_compare)


def _cmd_export(args: argparse.Namespace) -> int:
    from bench.report.export import ExportError, export_text

    paths = _results_paths(args.results)
    try:
        out = AtomicFile(args.out)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    try:
        text = export_text(_load(paths), fmt=args.format, env_id=args.env)
    except (UsageError, ExportError) as exc:
        out.discard()
        raise UsageError(str(exc)) from None
    try:
        out.commit(text)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    print(f"exported: {out.path}")
    return 0


def add_export_parser(sub) -> None:
    from bench.report.defaults import EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help="export results to another tool's format (pytest-benchmark JSON)",
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.jsonl) or folders of them")
    p.add_argument("--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--env", help="environment id to export when the results mix environments (see the report)")
    p.set_defaults(func=_cmd_export)
