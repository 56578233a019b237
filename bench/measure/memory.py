"""Peak memory of one call, per device.

* CUDA: the caching allocator's peak (``max_memory_allocated`` after
  ``reset_peak_memory_stats``) minus what was allocated before the call.
* CPU: PyTorch has no allocator statistics API for the CPU, so we take the
  allocator's own events: the profiler with ``profile_memory=True`` records
  every c10 allocation and free with its size and time; the running sum of
  those events, in time order, peaks at the most bytes the call held at once
  above what was resident before it. Beside it we read the process RSS
  high-water mark (``VmHWM``), reset before the call through
  ``/proc/self/clear_refs``: it sees everything (Python objects, library
  workspaces) but also allocator caching and page granularity.
* MPS: ``torch.mps.driver_allocated_memory`` before and after (no peak API).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    peak_bytes: int | None  # allocator-level peak above what was resident before the call
    rss_peak_bytes: int | None  # process RSS high-water mark during the call (absolute)
    rss_before_bytes: int | None  # process RSS before the call
    method: str  # how peak_bytes was measured


def _read_status_kib(field: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native layer prints start/stop lines on fd 2; keep them out of the logs."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_allocator_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, held)
    return peak


def measure_peak(fn: Callable[[], object], *, device: str) -> MemoryStats:
    """Run ``fn()`` once and report its peak memory on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return MemoryStats(
            peak_bytes=int(peak), rss_peak_bytes=None, rss_before_bytes=rss_bytes(), method="cuda-allocator"
        )
    if dev.type == "mps":
        torch.mps.synchronize()
        before = torch.mps.driver_allocated_memory()
        fn()
        torch.mps.synchronize()
        after = torch.mps.driver_allocated_memory()
        return MemoryStats(
            peak_bytes=max(0, int(after - before)),
            rss_peak_bytes=None,
            rss_before_bytes=rss_bytes(),
            method="mps-driver",
        )
    rss_before = rss_bytes()
    can_reset = reset_rss_high_water()
    peak = _cpu_allocator_peak(fn)
    rss_peak = _read_status_kib("VmHWM") if can_reset else None
    return MemoryStats(
        peak_bytes=int(peak), rss_peak_bytes=rss_peak, rss_before_bytes=rss_before, method="cpu-profiler"
    )
