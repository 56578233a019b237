"""How values are written in a report: numbers, markdown tables, the columns that name a curve, CSV files.

Fixed formats only, so that the same results give byte-identical markdown and CSV.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

MIB = 2**20
GIB = 2**30
CSV_FLOAT_FORMAT = "%.6g"
# columns of a table that name a curve besides its label and mode: shown only when they vary
_SHOWN_WHEN_VARYING = ("env_id", "device", "dtype", "causal", "batch", "heads", "kv_heads", "q_len", "head_dim")
COLUMN_HEADERS = {
    "env_id": "env",
    "device": "device",
    "dtype": "dtype",
    "causal": "causal",
    "batch": "batch",
    "heads": "heads",
    "kv_heads": "kv heads",
    "q_len": "queries",
    "head_dim": "head dim",
    "label": "impl",
    "mode": "mode",
    "depth": "depth",
    "residual": "residual",
}


# ---------------------------------------------------------------- numbers and markdown tables


def fmt_sig(value: Any, *, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, without exponent between 1e-3 and 10**digits; ``–`` for none."""
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits:
        return f"{value:,.0f}"
    if magnitude < -3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def fmt_fixed(value: Any, *, decimals: int = 2, suffix: str = "") -> str:
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    return f"{value:.{decimals}f}{suffix}"


def fmt_int(value: Any) -> str:
    if value is None or isinstance(value, str) or not math.isfinite(value):
        return "–"
    return f"{round(value)}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align_right: Sequence[bool] = ()) -> str:
    """A GitHub markdown table; pipes in cells are escaped."""
    rows = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    align = list(align_right) + [False] * (len(headers) - len(align_right))
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if right else "---" for right in align) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_sci(value: Any) -> str:
    """Scientific notation with three significant digits; ``–`` for none."""
    return f"{value:.2e}" if isinstance(value, float) and math.isfinite(value) else "–"


# ---------------------------------------------------------------- naming curves, CSV


def _varying_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Those of ``columns`` that take more than one value in ``frame``."""
    return [c for c in columns if c in frame and frame[c].nunique(dropna=False) > 1]


def curve_name_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that name a curve in a table of ``frame``: the varying setup fields, the label and the mode."""
    return [*_varying_columns(frame, _SHOWN_WHEN_VARYING), "label", "mode"]


def cell_text(row: Mapping[str, Any], column: str) -> str:
    value = row[column]
    if column == "causal":
        return "yes" if value else "no"
    if column == "q_len":
        return str(value) if value else "self"
    return str(value)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n")
    return path
