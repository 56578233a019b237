"""attnbench's harness: the grid of cases, the isolated worker, the sweep runner, analysis and reports.

``bench/measure/`` imports torch, ``bench/report/`` never does; docs/ARCHITECTURE.md has the module map.
"""

__version__ = "0.1.0"
