"""The ``attnbench`` command: ``list | run | report | compare | export``.

Heavy imports (torch, pandas, seaborn) happen inside the subcommand that needs
them, so ``attnbench --help`` is instant. Errors a user can cause end in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench", description="Benchmark how attention implementations scale with sequence length."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list the registered attention implementations")
    p_list.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'lin*'")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)
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
