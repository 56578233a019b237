"""The ``attnbench`` command: ``list | run | report | compare | export``.

The CLI only parses and checks: the grid is planned by ``bench.measure.plan``, options are checked by
``bench.options``, outputs are claimed by ``bench.outputs``. Heavy imports (torch, pandas, seaborn)
happen inside the subcommand that needs them, so ``attnbench --help`` is instant. Every error a user
can cause ends in one line on stderr and exit code 2, never a traceback, and leaves no file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench import cases as grid
from bench.options import MeasureOptions, OptionsError, SweepOptions, cli_fields
from bench.outputs import AtomicFile, OutputDir, OutputError
from bench.results import ResultsError, summarize_problems

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default (options without one say in words what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == [] or default is argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _warn(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# ---------------------------------------------------------------- list


def _cmd_list(args: argparse.Namespace) -> int:
    from attention_impls import registry

    try:
        specs = [registry.get(name) for name in registry.list_impls(args.pattern or "*")]
    except registry.RegistryError as exc:
        raise UsageError(str(exc)) from None
    _warn(f"warning: {message}" for message in registry.load_errors())
    if not specs:
        raise UsageError(f"no implementation matches {args.pattern!r} (registered: {', '.join(registry.list_impls())})")
    rows = [spec.describe() for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    header = ("name", "family", "time", "memory", "kind", "causal", "source")
    table = [
        (
            row["name"],
            row["family"],
            row["time_complexity"],
            row["memory_complexity"],
            "exact" if row["exact"] else "approximate",
            "yes" if row["causal"] else "no",
            row["source"],
        )
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table, strict=True)]
    for line in (header, *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


# ---------------------------------------------------------------- run


def _grid_request(args: argparse.Namespace) -> grid.GridRequest:
    """The grid flags, parsed (GridError on malformed text); checked against the registry later."""
    for flag, value in (("--batch", args.batch), ("--heads", args.heads), ("--head-dim", args.head_dim)):
        if value < 1:
            raise grid.GridError(f"{flag} must be at least 1, got {value}")
    depths = tuple(grid.parse_int(d, what="a depth") for d in args.depths.split(",") if d.strip())
    if not depths or min(depths) < 1:
        raise grid.GridError(f"--depths must be positive integers, got {args.depths!r}")
    return grid.GridRequest(
        impls=tuple(item.strip() for item in args.impls.split(",") if item.strip()) or ("*",),
        seq_lens=tuple(grid.parse_seq_lens(args.seq_lens)),
        dtypes=tuple(grid.parse_list(args.dtypes, allowed=grid.DTYPES, what="dtype")),
        modes=tuple(grid.parse_list(args.modes, allowed=grid.MODES, what="mode")),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        scope=args.scope,
        depths=depths,
        params=grid.parse_param_overrides(args.param),
        devices=tuple(grid.parse_devices(args.devices)) if args.devices else None,
        residuals=(
            tuple(grid.parse_list(args.residual, allowed=grid.RESIDUALS, what="residual")) if args.residual else None
        ),
    )


def _options(cls: type, args: argparse.Namespace, **extra):
    """An options dataclass from the flags its fields declare (OptionsError when a value is out of range)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)}, **extra)


def _cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        request = _grid_request(args)
        options = _options(SweepOptions, args, measure=_options(MeasureOptions, args))
    except (grid.GridError, OptionsError) as exc:
        raise UsageError(str(exc)) from None

    from attention_impls.registry import RegistryError
    from bench.measure.plan import plan_cases
    from bench.measure.runner import Sweep, SweepError

    try:
        cases = plan_cases(request)
    except (grid.GridError, RegistryError) as exc:
        raise UsageError(str(exc)) from None
    sweep = Sweep(cases, options, log=lambda line: print(line, file=sys.stderr))
    try:
        summary = sweep.run(started=started)
    except (SweepError, ResultsError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        sweep.close()
    for line in summary.lines():
        print(line)
    print(f"results: {options.out}")
    return 0


def _add_option_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per options field: its flag, default, help and type all come from the field."""
    types = {"float": float, "int": int, "float | None": float, "int | None": int, "Path": Path}
    for f in cli_fields(cls):
        meta = f.metadata
        help_text = meta["help"].replace("%", "%%")
        if f.type == "bool":
            p.add_argument(meta["flag"], dest=f.name, action="store_true", help=help_text)
        else:
            p.add_argument(
                meta["flag"],
                dest=f.name,
                type=types[f.type],
                default=f.default,
                metavar=meta["metavar"] or meta["flag"].lstrip("-").replace("-", "_").upper(),
                help=help_text,
            )


def _add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="run a sweep of cases and append the results to a JSONL file", formatter_class=_HelpWithDefaults
    )
    p.add_argument("--impls", default="*", help="names or wildcards, comma-separated")
    p.add_argument(
        "--seq-lens", default="256:16384:x2", help="list and/or ranges: 256,512 or 256:16384:x2 or 1024:8192:+1024"
    )
    p.add_argument("--devices", help="cpu, cuda, cuda:1, mps, comma-separated (default: cuda when present, else cpu)")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated, from {', '.join(grid.DTYPES)}")
    p.add_argument("--modes", default="fwd,fwd+bwd", help=f"comma-separated, from {', '.join(grid.MODES)}")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--head-dim", type=int, default=64, help="dimension of each head")
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--scope", choices=grid.SCOPES, default="attention", help="the kernel alone, or a layer stack")
    p.add_argument("--depths", default="1", help="layer-stack depths, comma-separated (--scope layers)")
    p.add_argument(
        "--residual",
        help=f"comma-separated, from {', '.join(grid.RESIDUALS)} (--scope layers; default: the implementation's own)",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="IMPL.NAME=VALUE", help="hyperparameter override, repeatable"
    )
    _add_option_flags(p, SweepOptions)
    _add_option_flags(p, MeasureOptions)
    p.set_defaults(func=_cmd_run)


# ---------------------------------------------------------------- report, compare, export


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
        elif not path.is_file():
            raise UsageError(f"{path} is not a regular file (a device, pipe or socket)")
        else:
            paths.append(path)
    return paths


def _load(paths: list[Path]):
    """Results files into pandas; their skipped lines are reported as warnings, as every reader does."""
    from bench.report.load import load_results

    try:
        results = load_results(paths)
    except ResultsError as exc:
        raise UsageError(str(exc)) from None
    _warn(summarize_problems(results.problems))
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
    _warn(summarize_problems(files.problems))
    print(f"report: {files.readme} ({len(files.tables)} tables, {len(files.figures) // 2} figures)")
    return 0


def _add_report_parser(sub) -> None:
    from bench.report import defaults

    p = sub.add_parser(
        "report",
        help="write a markdown report with tables and figures from results files",
        formatter_class=_HelpWithDefaults,
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


def _add_compare_parser(sub) -> None:
    from bench.report.defaults import DEFAULT_ALPHA, DEFAULT_MIN_CHANGE

    p = sub.add_parser(
        "compare", help="compare two runs case by case, with a significance test", formatter_class=_HelpWithDefaults
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


def _add_export_parser(sub) -> None:
    from bench.report.defaults import EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help="export results to another tool's format (pytest-benchmark JSON)",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.jsonl) or folders of them")
    p.add_argument("--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--env", help="environment id to export when the results mix environments (see the report)")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnbench", description="Benchmark how attention implementations scale with sequence length."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the registered attention implementations")
    p_list.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'lin*'")
    p_list.add_argument("--json", action="store_true", help="machine-readable output, hyperparameters included")
    p_list.set_defaults(func=_cmd_list)
    _add_run_parser(sub)
    _add_report_parser(sub)
    _add_compare_parser(sub)
    _add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"attnbench {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
