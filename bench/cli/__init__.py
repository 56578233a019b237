"""The ``attnbench`` command: ``list | run | report | compare | export | crosscheck | validate``.

The CLI only parses and checks: the grid is planned by ``bench.measure.plan``, options are checked by
``bench.options``, outputs are claimed by ``bench.outputs``. Heavy imports (torch, pandas, seaborn)
happen inside the subcommand that needs them, so ``attnbench --help`` is instant. Every error a user
can cause ends in one line on stderr and exit code 2, never a traceback, and leaves no file behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.cli.common import EXIT_USAGE, Parser, UsageError
from bench.cli.crosscheck import add_crosscheck_parser
from bench.cli.measure import add_run_parser, cmd_list
from bench.cli.read import add_compare_parser, add_export_parser, add_report_parser
from bench.cli.validate import add_validate_parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="attnbench", description="Benchmark how attention implementations scale with sequence length.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the registered attention implementations")
    p_list.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'lin*'")
    p_list.add_argument("--json", action="store_true", help="machine-readable output, hyperparameters included")
    p_list.set_defaults(func=cmd_list)
    add_run_parser(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_export_parser(sub)
    add_crosscheck_parser(sub)
    add_validate_parser(sub)
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
