"""Two runs side by side: ``attnbench compare BASE NEW [--fail-above 1.10]`` (never imports torch).

Cases are matched by their key (every field of the case) within comparable environments (the same
:func:`bench.results.env_identity`); ``any_env`` matches across environments. For each matched case:
the ratio of medians (new / base), a two-sided Mann–Whitney U test on the raw timing samples, and the
ratio of peak memory. A summary gives geometric means and counts the cases that *changed*: a p-value below
``alpha`` and a ratio of medians outside 1 ± ``min_change``. With hundreds of samples the test detects
drifts of 1% between two runs on a shared machine; ``min_change`` keeps those apart ("within ±5%") from
changes worth reading. A *significant regression* is a case whose new median is above ``fail_above``
times the base median with a p-value below ``alpha``.

Each run measures a large matmul when it starts (``env.peak_flops_per_s``, the roofline's ceiling):
the ratio of its time new / base says how much the machine itself changed speed between the runs
(on a shared VM, by 30% and more between two back-to-back sweeps). The summary prints it; where it
is beyond ``min_change``, a change of that size in the cases is not the code's.

The statistics (the Mann–Whitney test, geometric means) come from :mod:`bench.report.stats`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench.report.defaults import DEFAULT_ALPHA, DEFAULT_MIN_CHANGE
from bench.report.load import CURVE_COLUMNS, Results, curve_label, load_results
from bench.report.stats import geometric_mean, mann_whitney_u

_CASE_COLUMNS = (*(c for c in CURVE_COLUMNS if c != "env_id"), "seq_len")


class CompareError(ValueError):
    """Nothing to compare (one line for the user)."""


# ---------------------------------------------------------------- matching


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Matched cases and what did not match."""

    rows: pd.DataFrame  # one per matched case
    only_base: pd.DataFrame  # cases of BASE with no match in NEW
    only_new: pd.DataFrame
    alpha: float
    any_env: bool
    min_change: float = DEFAULT_MIN_CHANGE

    @property
    def both_ok(self) -> pd.DataFrame:
        return self.rows[(self.rows["base_status"] == "ok") & (self.rows["new_status"] == "ok")]

    def geomean_time_ratio(self) -> float:
        return geometric_mean(self.both_ok["time_ratio"])

    def geomean_memory_ratio(self) -> float:
        return geometric_mean(self.both_ok["memory_ratio"])

    def machine_time_ratio(self) -> float:
        """The time of the start-of-run matmul, new / base, over the cases both ok (geometric mean; NaN: unknown)."""
        return geometric_mean(self.both_ok["base_peak_flops_per_s"] / self.both_ok["new_peak_flops_per_s"])

    def regressions(self, *, fail_above: float) -> pd.DataFrame:
        """Cases significantly slower by more than ``fail_above`` (new median / base median)."""
        ok = self.both_ok
        return ok[ok["significant"] & (ok["time_ratio"] > fail_above)]

    def changed(self) -> pd.DataFrame:
        """Cases both ok, significant, and with a ratio of medians outside 1 ± ``min_change``."""
        ok = self.both_ok
        return ok[ok["verdict"].isin(("slower", "faster"))]

    def status_changes(self) -> pd.DataFrame:
        return self.rows[self.rows["base_status"] != self.rows["new_status"]]


def _match_key(frame: pd.DataFrame, *, any_env: bool) -> pd.Series:
    return frame["case_key"] if any_env else frame["env_id"] + "|" + frame["case_key"]


def _verdict(row: dict, *, min_change: float) -> str:
    if row["base_status"] != "ok" or row["new_status"] != "ok":
        return f"{row['base_status']} → {row['new_status']}"
    if not row["significant"]:
        return "no significant change"
    if abs(row["time_ratio"] - 1.0) <= min_change:
        return f"within ±{min_change:.0%}"
    return "slower" if row["time_ratio"] > 1 else "faster"


def _processes(row: dict) -> int:
    """The processes whose best round is the case's time (records of one process: 1)."""
    value = row.get("processes")
    return int(value) if isinstance(value, int | float) and math.isfinite(value) and value >= 1 else 1


def _peak(row: dict) -> float:
    value = row.get("peak_flops_per_s")
    return float(value) if isinstance(value, int | float) and value > 0 else math.nan


def _compare_row(base: dict, new: dict, *, alpha: float, min_change: float) -> dict:
    row = {c: new[c] for c in _CASE_COLUMNS}
    row["label"] = curve_label(new["impl"], new["params"])
    row["base_env_id"], row["new_env_id"] = base["env_id"], new["env_id"]
    row["base_status"], row["new_status"] = base["status"], new["status"]
    row["base_median_s"], row["new_median_s"] = base["median_s"], new["median_s"]
    row["time_ratio"] = new["median_s"] / base["median_s"] if base["status"] == new["status"] == "ok" else math.nan
    row["base_n_samples"], row["new_n_samples"] = len(base["samples"]), len(new["samples"])
    if base["samples"] and new["samples"] and base["status"] == new["status"] == "ok":
        test = mann_whitney_u(base["samples"], new["samples"])
        row["u_statistic"], row["p_value"] = test.u, test.p_value
    else:
        row["u_statistic"], row["p_value"] = math.nan, math.nan
    row["significant"] = bool(row["p_value"] < alpha)  # NaN compares False: no samples, no significance
    row["base_peak_flops_per_s"], row["new_peak_flops_per_s"] = _peak(base), _peak(new)
    row["base_processes"], row["new_processes"] = _processes(base), _processes(new)
    row["base_peak_bytes"], row["new_peak_bytes"] = base["peak_bytes"], new["peak_bytes"]
    positive = base["peak_bytes"] > 0 and new["peak_bytes"] > 0
    row["memory_ratio"] = new["peak_bytes"] / base["peak_bytes"] if positive else math.nan
    row["verdict"] = _verdict(row, min_change=min_change)
    return row


def compare_results(
    base: Results,
    new: Results,
    *,
    alpha: float = DEFAULT_ALPHA,
    any_env: bool = False,
    min_change: float = DEFAULT_MIN_CHANGE,
) -> Comparison:
    """Match the cases of ``new`` to those of ``base`` and compare each pair; ``CompareError`` if none match."""
    base_frame = base.frame.assign(match=_match_key(base.frame, any_env=any_env))
    new_frame = new.frame.assign(match=_match_key(new.frame, any_env=any_env))
    if any_env:  # one record per case key: the last one (environments sorted by id)
        base_frame = base_frame.drop_duplicates("match", keep="last")
        new_frame = new_frame.drop_duplicates("match", keep="last")
    base_by_key = {row["match"]: row for row in base_frame.to_dict("records")}
    rows = [
        _compare_row(base_by_key[row["match"]], row, alpha=alpha, min_change=min_change)
        for row in new_frame.to_dict("records")
        if row["match"] in base_by_key
    ]
    columns = [*_CASE_COLUMNS, "label", "status", "median_s", "env_id"]
    only_base = base_frame[~base_frame["match"].isin(new_frame["match"])][columns]
    only_new = new_frame[~new_frame["match"].isin(base_frame["match"])][columns]
    if not rows:
        hint = "" if any_env else " in a comparable environment (--any-env matches across environments)"
        raise CompareError(f"no case of NEW matches a case of BASE{hint}")
    table = pd.DataFrame(rows).sort_values([*_CASE_COLUMNS, "new_env_id"], kind="stable").reset_index(drop=True)
    return Comparison(
        rows=table,
        only_base=only_base.reset_index(drop=True),
        only_new=only_new.reset_index(drop=True),
        alpha=alpha,
        any_env=any_env,
        min_change=min_change,
    )


def compare_files(
    base_paths: Sequence[str | Path],
    new_paths: Sequence[str | Path],
    *,
    alpha: float = DEFAULT_ALPHA,
    any_env: bool = False,
    min_change: float = DEFAULT_MIN_CHANGE,
) -> Comparison:
    """Load both sides and compare them; raises ``ResultsError`` for bad files, ``CompareError`` if nothing matches."""
    return compare_results(
        load_results(base_paths), load_results(new_paths), alpha=alpha, any_env=any_env, min_change=min_change
    )


# ---------------------------------------------------------------- text


def _ratio(value: float) -> str:
    return f"{value:.3f}×" if math.isfinite(value) else "–"


def _ms(value: float) -> str:
    return f"{value * 1e3:.4g}" if isinstance(value, float) and math.isfinite(value) else "–"


_SCOPE_COLUMNS = ("scope", "depth", "residual")  # said by "layers RESIDUAL depth=N" for layer stacks


def _describe(row: dict, *, varying: Sequence[str]) -> str:
    """``label mode [layers residual x depth] [the setup fields that vary]``."""
    parts = [row["label"], row["mode"]]
    if row["scope"] == "layers":
        parts.append(f"layers {row['residual']} depth={row['depth']}")
    parts += [f"{column}={row[column]}" for column in varying if column not in _SCOPE_COLUMNS]
    return " ".join(str(part) for part in parts)


def _changed_line(comparison: Comparison) -> str:
    changed = comparison.changed()
    slower = int((changed["verdict"] == "slower").sum())
    verdicts = comparison.both_ok["verdict"]
    small = int(verdicts.str.startswith("within").sum())
    return (
        f"changed (p < {comparison.alpha:g} and beyond ±{comparison.min_change:.0%}): {len(changed)} of "
        f"{len(comparison.both_ok)} ({slower} slower, {len(changed) - slower} faster); "
        f"significant but within ±{comparison.min_change:.0%}: {small}"
    )


def format_comparison(comparison: Comparison, *, fail_above: float | None = None) -> str:
    """A plain-text summary and per-case table (what ``attnbench compare`` prints)."""
    rows = comparison.rows
    lines = [
        f"matched cases: {len(rows)} (both ok: {len(comparison.both_ok)}); "
        f"only in BASE: {len(comparison.only_base)}; only in NEW: {len(comparison.only_new)}",
        f"geometric mean new/base: time {_ratio(comparison.geomean_time_ratio())}, "
        f"peak memory {_ratio(comparison.geomean_memory_ratio())}",
        _changed_line(comparison),
    ]
    machine = comparison.machine_time_ratio()
    if math.isfinite(machine):
        line = f"the machine: a large matmul timed as each run started, new/base: {_ratio(machine)}"
        if abs(machine - 1.0) > comparison.min_change:
            line += f" (beyond ±{comparison.min_change:.0%}: the machine's own speed changed between the runs)"
        lines.append(line)
    rounds = {side: sorted(set(comparison.both_ok[f"{side}_processes"])) for side in ("base", "new")}
    if rounds["base"] != rounds["new"]:
        lines.append(
            f"warning: BASE was timed in {'/'.join(map(str, rounds['base']))} processes a case, NEW in "
            f"{'/'.join(map(str, rounds['new']))}: a case's time is its best round, and the best of more rounds "
            "reads faster"
        )
    if comparison.any_env:
        lines.append("warning: --any-env: cases were matched across environments that may not be comparable")
    varying = [
        c
        for c in ("scope", "device", "dtype", "causal", "batch", "heads", "head_dim", "depth", "residual")
        if rows[c].nunique() > 1
    ]
    for (label, mode, scope), group in comparison.both_ok.groupby(["label", "mode", "scope"], sort=True):
        lines.append(
            f"  {label} {mode} {scope}: time {_ratio(geometric_mean(group['time_ratio']))}, "
            f"memory {_ratio(geometric_mean(group['memory_ratio']))} over {len(group)} lengths"
        )
    header = ("case", "n", "base ms", "new ms", "time", "p", "memory", "verdict")
    table = [header]
    for row in rows.to_dict("records"):
        case = _describe(row, varying=varying)
        p_value = f"{row['p_value']:.3g}" if math.isfinite(row["p_value"]) else "–"
        table.append(
            (
                case,
                str(row["seq_len"]),
                _ms(row["base_median_s"]),
                _ms(row["new_median_s"]),
                _ratio(row["time_ratio"]),
                p_value,
                _ratio(row["memory_ratio"]),
                row["verdict"],
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines.append("")
    for line in table:
        cells = [
            cell.ljust(w) if i in (0, 7) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    for title, frame in (("only in BASE", comparison.only_base), ("only in NEW", comparison.only_new)):
        if len(frame):
            lines += ["", f"{title}:"]
            lines += [
                f"  {_describe(r, varying=varying)} n={r['seq_len']} ({r['status']})" for r in frame.to_dict("records")
            ]
    if fail_above is not None:
        regressions = comparison.regressions(fail_above=fail_above)
        lines.append("")
        if len(regressions):
            lines.append(
                f"REGRESSION: {len(regressions)} cases significantly slower than {fail_above:g}× base "
                f"(p < {comparison.alpha:g}):"
            )
            lines += [
                f"  {_describe(r, varying=varying)} n={r['seq_len']}: {_ratio(r['time_ratio'])} (p={r['p_value']:.3g})"
                for r in regressions.to_dict("records")
            ]
        else:
            lines.append(f"no case is significantly slower than {fail_above:g}× base (p < {comparison.alpha:g})")
    return "\n".join(lines)
