"""attnbench's harness: the grid of cases, the isolated worker, the sweep runner, analysis and reports."""

__version__ = "0.1.0"
