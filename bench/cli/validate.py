"""``attnbench validate``: tests, sweep, crosscheck and report on a GPU machine (``bench.measure.validate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.cli.common import EXIT_USAGE, HelpWithDefaults, UsageError
from bench.outputs import OutputDir, OutputError


def _cmd_validate(args: argparse.Namespace) -> int:
    from bench.measure import validate

    try:
        gpu_name = validate.cuda_gpu_name()
    except validate.NoCuda as exc:
        print(exc, file=sys.stderr)  # the line names the command already
        return EXIT_USAGE
    default_out, default_report = validate.default_dirs(gpu_name)
    out_dir = args.out or default_out
    report_dir = args.report_dir or default_report
    try:
        out = OutputDir(out_dir)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    try:
        report = OutputDir(report_dir)
    except OutputError as exc:
        out.discard()
        raise UsageError(str(exc)) from None
    steps = validate.plan_steps(gpu_name, out.path, report.path, skip_tests=args.skip_tests, quick=args.quick)
    print(f"attnbench validate: {gpu_name}; results in {out.path}, report in {report.path}")
    for number, step in enumerate(steps, 1):
        print(f"  {number}. {step.name}: {step.title}")
    outcomes = validate.run_steps(steps)
    if not (report.path / "README.md").is_file():
        report.discard()  # leaves nothing this command created where no report was written
    print()
    for line in validate.summary(outcomes, gpu_name=gpu_name, skip_tests=args.skip_tests):
        print(line)
    return validate.exit_code(outcomes)


def add_validate_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="validate a CUDA machine: the CUDA tests, a sweep of every implementation, the crosscheck, the report",
        formatter_class=HelpWithDefaults,
    )
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="folder of the outputs (default: results/gpu/<the GPU's name>)"
    )
    p.add_argument(
        "--report-dir", type=Path, metavar="DIR", help="folder of the report (default: reports/gpu/<the GPU's name>)"
    )
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    p.add_argument("--quick", action="store_true", help="a smoke run: sweep 1024 to 4096 tokens, crosscheck at 4096")
    p.set_defaults(func=_cmd_validate)
