"""One case measured in several worker processes: the statistics of samples, and the records pooled into one.

A sweep measures each case in ``processes`` worker processes, one round of the sweep per process
(``bench.measure.runner``). A process takes its samples of a case within a fraction of a second, in
one state of the machine and of the process (what the host's other tenants do to the shared cores,
caches and memory; allocator, page placement, what ran before), so its spread can not show how much
that state moves a median; the spread between processes, rounds minutes apart, can. Each process
writes a record of its own (``process`` = 0, 1, ...); readers pool them here into the one record:

* the case's ``median_s`` is the lowest of the processes' medians: the best of its rounds, as
  ``timeit`` reports the best of its repeats. On a shared host the machine's speed for a kernel
  changes for seconds to minutes at a time (on a 2-core cloud VM, by up to 2.5x), so the medians of
  one round are one draw of that state; the fastest of several draws is the least disturbed, and
  repeats from sweep to sweep where a median of draws does not. ``pooled_median_s`` keeps the
  median of every sample;
* the samples of every process that finished ``ok`` are pooled: ``samples``, IQR, min and mean of all
  (the spread a user of this machine would see; ``bench.report.compare`` tests them);
* ``process_medians_s`` lists each process's median; ``process_spread`` is their range over the
  case's median (the spread between processes), ``within_spread`` the median of each process's
  IQR over its median (the spread within one);
* ``unstable`` flags a case whose processes disagree: medians more than ``DISAGREE_RATIO`` apart
  and more than ``DISAGREE_OVER_WITHIN`` times the spread within a process, or a process that did
  not finish (its status and message are kept in ``message``);
* memory, FLOPs and the approximation error come from process 0, which alone measures them.

Records without ``process`` (older files, other producers) are process 0 of a case of their own.
Torch-free: reports pool without torch, and ``bench.measure.timing`` takes its statistics from here.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

NOISY_IQR_RATIO = 0.1  # IQR / median above this flags a measurement as noisy
DISAGREE_RATIO = 0.05
DISAGREE_OVER_WITHIN = 2.0


def sample_stats(samples: list[float]) -> dict[str, float]:
    """Median, interquartile range, min and mean of per-call times (seconds)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = quartiles[2] - quartiles[0]
    else:
        iqr = 0.0
    return {
        "median_s": statistics.median(ordered),
        "iqr_s": iqr,
        "min_s": ordered[0],
        "mean_s": statistics.fmean(ordered),
    }


def is_noisy(median_s: float, iqr_s: float) -> bool:
    return median_s > 0 and iqr_s / median_s > NOISY_IQR_RATIO


def pool(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The one record of a case from its per-process records (process 0 first)."""
    first = records[0]
    if len(records) == 1 or first.get("status") != "ok":
        return first
    ok = [r for r in records if r.get("status") == "ok" and r.get("samples")]
    failed = [r for r in records if r.get("status") != "ok"]
    samples = [float(s) for r in ok for s in r["samples"]]
    pooled = sample_stats(samples)
    medians = [float(r["median_s"]) for r in ok]
    best = min(medians)
    within = statistics.median(r["iqr_s"] / r["median_s"] for r in ok if r.get("median_s"))
    spread = (max(medians) - best) / best if best > 0 else 0.0
    merged = {
        **first,
        **pooled,
        "median_s": best,
        "pooled_median_s": pooled["median_s"],
        "samples": samples,
        "n_samples": len(samples),
        "noisy": is_noisy(pooled["median_s"], pooled["iqr_s"]),
        "measured_s": sum(r.get("measured_s") or 0.0 for r in records),
        "wall_s": sum(r.get("wall_s") or 0.0 for r in records),
        "processes": len(ok),
        "process_medians_s": medians,
        "process_spread": spread,
        "within_spread": within,
        "unstable": bool(failed) or (spread > DISAGREE_RATIO and spread > DISAGREE_OVER_WITHIN * within),
    }
    flops = first.get("flops")
    if flops and best > 0:
        merged["achieved_flops_per_s"] = flops / best
        if first.get("roofline") is not None and first.get("achieved_flops_per_s"):
            merged["roofline"] = first["roofline"] * merged["achieved_flops_per_s"] / first["achieved_flops_per_s"]
    if failed:
        merged["message"] = "; ".join(f"process {r.get('process')}: {r['status']}: {r.get('message')}" for r in failed)
    return merged


class CaseGroups:
    """The records of each case, in the order read: a process-0 record starts its case anew.

    ``add`` them in file order (files in the order given); a later process-0 record of the same key
    (a ``--force`` or ``--retry-failed`` run) replaces the whole group, a later record of the same
    process replaces that process's record. ``superseded`` counts the records replaced.
    """

    def __init__(self) -> None:
        self._groups: dict[Any, dict[int, dict[str, Any]]] = {}
        self._extra: dict[Any, Any] = {}
        self.superseded = 0

    def add(self, key: Any, record: dict[str, Any], extra: Any = None) -> str | None:
        """Add a record; returns why it was skipped (a later process with no process 0 before it), else None."""
        process = record.get("process") or 0
        group = self._groups.get(key)
        if process == 0:
            if group is not None:
                self.superseded += len(group)
                del self._groups[key]  # a case measured again moves to where it was measured last
            self._groups[key] = {0: record}
            self._extra[key] = extra
            return None
        if group is None:
            return f"process {process} of a case with no process-0 record before it"
        if process in group:
            self.superseded += 1
        group[process] = record
        return None

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any], Any]]:
        """(key, pooled record, the extra given with its process-0 record), in the order the cases were last started."""
        for key, group in self._groups.items():
            yield key, pool([group[p] for p in sorted(group)]), self._extra[key]
