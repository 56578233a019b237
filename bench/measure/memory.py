"""Peak memory of one call, per device, and the operators it ran.

Before the baseline is read, ``reset()`` (when given) drops what the previous call left behind
that the next call frees and allocates again: the gradients of a training step. Without it the
old gradients would count in the baseline and the new ones would reuse their freed bytes inside
the call, so the peak would leave the gradients out.

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
* MPS: no peak API. The cache is emptied first, then the driver's allocation is read before and
  after the call while its output is still held: the pool grows to the call's working set, so
  the growth approximates the peak (``mps-driver-approx``: caching and fragmentation can make it
  larger than the true peak, reuse within the call can not make it smaller than the output).

The call runs under the profiler on every device (CPU-side operator events only, no memory
events off the CPU): ``ops`` names the aten operators it dispatched, e.g. which
``scaled_dot_product_attention`` backend ran.
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
    ops: frozenset[str] = frozenset()  # aten operators the call dispatched


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


def _profiled(fn: Callable[[], object], *, profile_memory: bool) -> tuple[object, list]:
    """Run ``fn()`` under the profiler (CPU activity): its result and the recorded events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=profile_memory) as prof:
        result = fn()
    return result, list(prof.profiler.kineto_results.events())


def _op_names(events: list) -> frozenset[str]:
    return frozenset(e.name() for e in events if e.name().startswith("aten::"))


def cpu_allocator_peak(events: list) -> int:
    """The most bytes held at once above the start, from the profiler's CPU ``[memory]`` events."""
    memory = [e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"]
    memory.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in memory:
        held += event.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, held)
    return peak


def measure_peak(fn: Callable[[], object], *, device: str, reset: Callable[[], object] | None = None) -> MemoryStats:
    """Run ``fn()`` once and report its peak memory on ``device`` (see the module docstring)."""
    dev = torch.device(device)
    if reset is not None:
        reset()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        _result, events = _profiled(fn, profile_memory=False)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return MemoryStats(
            peak_bytes=int(peak),
            rss_peak_bytes=None,
            rss_before_bytes=rss_bytes(),
            method="cuda-allocator",
            ops=_op_names(events),
        )
    if dev.type == "mps":
        torch.mps.synchronize()
        torch.mps.empty_cache()
        before = torch.mps.driver_allocated_memory()
        result, events = _profiled(fn, profile_memory=False)
        torch.mps.synchronize()
        after = torch.mps.driver_allocated_memory()
        del result
        return MemoryStats(
            peak_bytes=max(0, int(after - before)),
            rss_peak_bytes=None,
            rss_before_bytes=rss_bytes(),
            method="mps-driver-approx",
            ops=_op_names(events),
        )
    rss_before = rss_bytes()
    can_reset = reset_rss_high_water()
    _result, events = _profiled(fn, profile_memory=True)
    rss_peak = _read_status_kib("VmHWM") if can_reset else None
    return MemoryStats(
        peak_bytes=cpu_allocator_peak(events),
        rss_peak_bytes=rss_peak,
        rss_before_bytes=rss_before,
        method="cpu-profiler",
        ops=_op_names(events),
    )
