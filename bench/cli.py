"""The ``attnbench`` command: ``list | run | report | compare | export``.

Heavy imports (torch, pandas, seaborn) happen inside the subcommand that needs
them, so ``attnbench --help`` is instant. Errors a user can cause end in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


def _cmd_list(args: argparse.Namespace) -> int:
    from attention_impls import registry

    try:
        names = registry.list_impls(args.pattern or "*")
        specs = [registry.get(name) for name in names]
    except registry.RegistryError as exc:
        raise UsageError(str(exc)) from None
    for message in registry.load_errors():
        print(f"warning: {message}", file=sys.stderr)
    rows = [spec.describe() for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print(f"no implementation matches {args.pattern!r}", file=sys.stderr)
        return 1
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


def _resolve_impls(patterns: list[str]) -> list[str]:
    from attention_impls import registry

    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = registry.list_impls(pattern)
            if not matched:
                raise UsageError(
                    f"no implementation matches {pattern!r} (registered: {', '.join(registry.list_impls())})"
                )
            names.extend(matched)
        else:
            names.append(registry.get(pattern).name)  # raises UnknownImplError with suggestions
    return list(dict.fromkeys(names))


def _check_writable(path: Path) -> None:
    """The output file (or the nearest existing folder above it) must be writable; nothing is created."""
    if path.exists():
        if path.is_dir():
            raise UsageError(f"output path {path} is a directory")
        if not os.access(path, os.W_OK):
            raise UsageError(f"output file {path} is not writable")
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot write {path}: {ancestor} is not a writable directory")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import psutil

    from attention_impls import registry
    from bench import cases as grid
    from bench.results import ResultsError, iter_records
    from bench.measure.runner import Sweep, SweepOptions

    try:
        seq_lens = grid.parse_seq_lens(args.seq_lens)
        devices = grid.parse_devices(args.devices or _default_device())
        dtypes = grid.parse_list(args.dtypes, allowed=grid.DTYPES, what="dtype")
        modes = grid.parse_list(args.modes, allowed=grid.MODES, what="mode")
        residuals = grid.parse_list(args.residual, allowed=grid.RESIDUALS, what="residual") if args.residual else None
        depths = [grid.parse_int(d, what="a depth") for d in args.depths.split(",") if d.strip()]
        overrides = grid.parse_param_overrides(args.param)
        for name, value in (("--batch", args.batch), ("--heads", args.heads), ("--head-dim", args.head_dim)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if not depths or min(depths) < 1:
            raise UsageError(f"--depths must be positive integers, got {args.depths!r}")
        if args.timeout <= 0 or args.min_time < 0:
            raise UsageError("--timeout must be positive and --min-time not negative")
        if args.budget_gb is not None and args.budget_gb <= 0:
            raise UsageError(f"--budget-gb must be positive, got {args.budget_gb}")
        names = _resolve_impls(args.impls.split(",") if args.impls else ["*"])
        impl_params: dict[str, dict] = {}
        for impl, params in overrides.items():
            spec = registry.get(impl)
            if impl not in names:
                raise UsageError(f"--param names {impl!r}, which is not among the implementations to run")
            # only what differs from the defaults: the case key and the report label stay short, and a
            # default passed explicitly names the same case as no --param at all
            defaults = spec.params()
            chosen = spec.with_params(**params).params()
            impl_params[impl] = {key: value for key, value in chosen.items() if value != defaults[key]}
        impls = {name: impl_params.get(name, {}) for name in names}
        cases = []
        for name, params in impls.items():
            # without --residual each implementation gets its own default (the Reformer: reversible)
            impl_residuals = residuals or [registry.get(name).module_cls.default_residual]
            cases += grid.expand_grid(
                impls={name: params},
                seq_lens=seq_lens,
                devices=devices,
                dtypes=dtypes,
                modes=modes,
                batch=args.batch,
                heads=args.heads,
                head_dim=args.head_dim,
                causal=args.causal,
                scope=args.scope,
                depths=depths,
                residuals=impl_residuals,
            )
    except (grid.GridError, registry.RegistryError) as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    _check_writable(out)
    if out.exists():
        try:
            for _ in iter_records(out):
                pass
        except ResultsError as exc:
            raise UsageError(str(exc)) from None
    options = SweepOptions(
        out=out,
        threads=args.threads or psutil.cpu_count(logical=False) or 1,
        timeout_s=args.timeout,
        min_time_s=args.min_time,
        min_samples=args.min_samples,
        seed=args.seed,
        budget_bytes=args.budget_gb * 2**30 if args.budget_gb is not None else None,
        force=args.force,
        retry_failed=args.retry_failed,
        quiet=args.quiet,
        error_max_len=args.error_max_len,
    )
    sweep = Sweep(cases, options, log=lambda line: print(line, file=sys.stderr))
    try:
        probe = sweep.probe_env(devices, dtypes)
        if probe["problems"]:
            raise UsageError("; ".join(probe["problems"]))
        summary = sweep.run(probe["env"], started=started)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    finally:
        sweep.close()
    for line in summary.lines():
        print(line)
    print(f"results: {out}")
    return 0


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a sweep of cases and append the results to a JSONL file")
    p.add_argument("--impls", help="names or wildcards, comma-separated (default: all registered)")
    p.add_argument(
        "--seq-lens", default="256:16384:x2", help="list and/or ranges: 256,512 or 256:16384:x2 or 1024:8192:+1024"
    )
    p.add_argument("--devices", help="cpu, cuda, cuda:1, mps (comma-separated; default: cuda when present, else cpu)")
    p.add_argument("--dtypes", default="float32", help="float32, float64, float16, bfloat16 (comma-separated)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument(
        "--scope", choices=("attention", "layers"), default="attention", help="the kernel alone, or a layer stack"
    )
    p.add_argument("--depths", default="1", help="layer-stack depths, comma-separated (--scope layers)")
    p.add_argument("--residual", help="standard and/or reversible (--scope layers; default: the implementation's own)")
    p.add_argument("--budget-gb", type=float, help="skip cases estimated above this (default: 60%% of free memory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case before its worker is killed")
    p.add_argument("--min-time", type=float, default=0.5, help="minimum timed seconds per case")
    p.add_argument("--min-samples", type=int, default=5, help="minimum timing samples per case (at least 5)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--error-max-len", type=int, default=4096, help="compute rel_error up to this length")
    p.add_argument("--out", default="results/sweep.jsonl", help="results file (appended; a run resumes)")
    p.add_argument("--force", action="store_true", help="run again cases already in the results file")
    p.add_argument(
        "--retry-failed", action="store_true", help="run again cases that ended in error/timeout/oom/crashed"
    )
    p.add_argument("--param", action="append", default=[], metavar="IMPL.NAME=VALUE", help="hyperparameter override")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for CI logs)")
    p.set_defaults(func=_cmd_run)


# ---------------------------------------------------------------- report, compare, export


def _results_paths(items: Sequence[str]) -> list[Path]:
    """The results files named: a file as given, a directory as its ``*.jsonl`` files (sorted)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise UsageError(f"no .jsonl results files in directory {path}")
            paths.extend(found)
        elif not path.exists():
            raise UsageError(f"results file {path} does not exist")
        else:
            paths.append(path)
    return paths


def _check_writable_dir(path: Path) -> None:
    """The output folder (or the nearest existing folder above it) must be a writable directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot write {path}: {ancestor} is not a writable directory")


def _positive_gb(value: float, *, name: str) -> float:
    if not value > 0:
        raise UsageError(f"{name} must be positive, got {value}")
    return value * 2**30


def _cmd_report(args: argparse.Namespace) -> int:
    from bench.report.markdown import ReportOptions, write_report
    from bench.results import ResultsError

    paths = _results_paths(args.results)
    if args.fit_min_seq_len < 1:
        raise UsageError(f"--fit-min-seq-len must be at least 1, got {args.fit_min_seq_len}")
    if args.fit_max_seq_len is not None and args.fit_max_seq_len < args.fit_min_seq_len:
        raise UsageError("--fit-max-seq-len must not be below --fit-min-seq-len")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be between 0 and 1, got {args.confidence}")
    baselines = tuple(name.strip() for name in args.baselines.split(",") if name.strip())
    options = ReportOptions(
        min_fit_seq_len=args.fit_min_seq_len,
        max_fit_seq_len=args.fit_max_seq_len,
        confidence=args.confidence,
        budget_bytes=_positive_gb(args.budget_gb, name="--budget-gb"),
        baselines=baselines,
        figures=not args.no_figures,
    )
    out = Path(args.out)
    _check_writable_dir(out)
    try:
        files = write_report(paths, out_dir=out, options=options)
    except ResultsError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for problem in files.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"report: {files.readme} ({len(files.tables)} tables, {len(files.figures) // 2} figures)")
    return 0


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="write a markdown report with tables and figures from results files")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.jsonl) or folders of them")
    p.add_argument("--out", default="reports", help="output folder (README.md, tables/, figures/)")
    p.add_argument(
        "--fit-min-seq-len", type=int, default=1024, help="shortest length entering the exponent fits (default 1024)"
    )
    p.add_argument("--fit-max-seq-len", type=int, help="longest length entering the exponent fits (default: all)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the exponent intervals")
    p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for 'longest length that fits'")
    p.add_argument(
        "--baselines", default="full,sdpa", help="implementations to compute speedups and crossovers against"
    )
    p.add_argument("--no-figures", action="store_true", help="tables and markdown only")
    p.set_defaults(func=_cmd_report)


def _cmd_compare(args: argparse.Namespace) -> int:
    from bench.report.compare import CompareError, compare_files, format_comparison
    from bench.results import ResultsError

    base, new = _results_paths([args.base]), _results_paths([args.new])
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.fail_above is not None and not args.fail_above > 0:
        raise UsageError(f"--fail-above must be a positive ratio, got {args.fail_above}")
    if not 0 <= args.min_change < 1:
        raise UsageError(f"--min-change must be between 0 and 1, got {args.min_change}")
    if args.csv:
        _check_writable(Path(args.csv))
    try:
        comparison = compare_files(base, new, alpha=args.alpha, any_env=args.any_env, min_change=args.min_change)
    except (ResultsError, CompareError) as exc:
        raise UsageError(str(exc)) from None
    print(format_comparison(comparison, fail_above=args.fail_above))
    if args.csv:
        comparison.rows.to_csv(args.csv, index=False, float_format="%.6g", lineterminator="\n")
        print(f"table: {args.csv}")
    if args.fail_above is not None and len(comparison.regressions(fail_above=args.fail_above)):
        return 1
    return 0


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare two runs case by case, with a significance test")
    p.add_argument("base", metavar="BASE", help="results file (or folder) of the reference run")
    p.add_argument("new", metavar="NEW", help="results file (or folder) of the run to judge")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the Mann-Whitney U test")
    p.add_argument(
        "--min-change",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="a significant change of the median within 1 +- FRACTION is reported as 'within' (default 0.05)",
    )
    p.add_argument(
        "--fail-above",
        type=float,
        metavar="RATIO",
        help="exit 1 if a case is significantly slower than RATIO x base (e.g. 1.10)",
    )
    p.add_argument("--any-env", action="store_true", help="match cases across environments that are not comparable")
    p.add_argument("--csv", help="also write the per-case table to this CSV file")
    p.set_defaults(func=_cmd_compare)


def _cmd_export(args: argparse.Namespace) -> int:
    from bench.report.analysis import load_results
    from bench.report.export import ExportError, write_export
    from bench.results import ResultsError

    paths = _results_paths(args.results)
    out = Path(args.out)
    _check_writable(out)
    try:
        written = write_export(load_results(paths), out=out, fmt=args.format, env_id=args.env)
    except (ResultsError, ExportError) as exc:
        raise UsageError(str(exc)) from None
    print(f"exported: {written}")
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export results to another tool's format (pytest-benchmark JSON)")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.jsonl) or folders of them")
    p.add_argument("--format", default="pytest-benchmark", choices=("pytest-benchmark",), help="output format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--env", help="environment id to export when the results mix environments (see the report)")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench", description="Benchmark how attention implementations scale with sequence length."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list the registered attention implementations")
    p_list.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'lin*'")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
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
