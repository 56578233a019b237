"""What every subcommand shares: the one-line usage error, the parser class, help that shows defaults."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default (options without one say in words what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == [] or default is argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def warn(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)
