"""The defaults of the reading side, in one place: report, compare and export use these, and so does the CLI.

Imports nothing (not even pandas), so ``attnbench --help`` can show them at once.
"""

from __future__ import annotations

DEFAULT_MIN_FIT_SEQ_LEN = 1024  # shorter lengths are dominated by fixed overheads and would bend an exponent down
DEFAULT_CONFIDENCE = 0.95  # confidence level of the exponent intervals
DEFAULT_MEMORY_BUDGET_BYTES = 16 * 2**30  # the budget of "the longest length whose peak memory fits"
DEFAULT_BASELINES = ("full", "sdpa")  # what speedups and crossovers are computed against
DEFAULT_ALPHA = 0.05  # compare: significance level of the Mann–Whitney test
DEFAULT_MIN_CHANGE = 0.05  # compare: a significant ratio of medians within 1 ± this is reported as no real change
EXPORT_FORMATS = ("pytest-benchmark",)  # export: the formats written
