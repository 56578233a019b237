"""Time one callable on its device: warm-up, calibration, repetition until a minimum time and sample count.

Policy (``docs/ARCHITECTURE.md``, measurement method):

1. Warm up: ``warmup_calls`` calls (``WARMUP_CALLS``), not timed for the result (the first call
   includes lazy initialisation, compilation and allocator growth; on a GPU it can be a thousand
   times slower).
2. Calibrate on the warm function: time one call; if it lasts at least ``MIN_SAMPLE_S`` it is
   the first sample and one call makes a sample; otherwise double the calls until a batch lasts
   ``MIN_SAMPLE_S`` (timer resolution and launch latency), as ``timeit``'s autorange does.
3. Take samples of ``calls_per_sample`` calls until both ``min_time_s`` has passed and
   ``min_samples`` are in. Every call the function receives is warm-up, calibration or sample.

Timers (``bench.options.TIMERS``), named in each record:

* ``clock``: ``perf_counter`` read after synchronizing the case's own device (CUDA, MPS), as
  ``torch.utils.benchmark`` does, so queued kernels are inside the timed region.
* ``cuda-events``: CUDA events recorded on the case's device's current stream around the calls;
  the host syncs once per sample, after the end event.

With ``flush_cache`` a buffer larger than the last-level cache is overwritten before every call
and each call is timed on its own (the flush stays outside the timed region), as Triton's
``do_bench`` does: the calls then start cold instead of finding their inputs in cache.

We do not call ``torch.utils.benchmark.Timer.timeit`` per sample: it runs extra warm-up calls
before every measurement, which tripled the cost of a sweep's slow cases without changing what is
measured; ``blocked_autorange`` has no minimum sample count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.options import TIMERS
from bench.pooling import is_noisy, sample_stats

MIN_SAMPLE_S = 1e-3  # a sample shorter than this is dominated by timer overhead and launch latency
WARMUP_CALLS = 1  # calls before calibration, not timed
MAX_SAMPLES = 200
# bytes overwritten before each call with flush_cache: more than any last-level cache we know
# (H100: 50 MiB L2; EPYC: 32 MiB L3 per CCD); on the CPU twice the L3 that sysfs reports, when larger
FLUSH_BYTES = 256 * 2**20
FLUSH_BYTES_CPU = 64 * 2**20
_L3_SIZE = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")


@dataclasses.dataclass(frozen=True)
class TimingStats:
    median_s: float
    iqr_s: float
    min_s: float
    mean_s: float
    samples: list[float]  # seconds per call, one value per sample
    calls_per_sample: int
    measured_s: float  # wall time spent timing (warm-up and calibration included)
    timer: str = "clock"

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def noisy(self) -> bool:
        return is_noisy(self.median_s, self.iqr_s)


def summarize(
    samples: list[float], *, calls_per_sample: int = 1, measured_s: float = 0.0, timer: str = "clock"
) -> TimingStats:
    """Median, interquartile range, min and mean of per-call times."""
    return TimingStats(
        **sample_stats(samples),
        samples=list(samples),
        calls_per_sample=calls_per_sample,
        measured_s=measured_s,
        timer=timer,
    )


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued work of ``device`` itself (not the current device's)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def resolve_timer(timer: str, device: str | torch.device) -> str:
    """The timer ``timer`` means on ``device``; ValueError for one that can not time it."""
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r} (choose from {', '.join(TIMERS)})")
    is_cuda = torch.device(device).type == "cuda"
    if timer == "auto":
        return "cuda-events" if is_cuda else "clock"
    if timer == "cuda-events" and not is_cuda:
        raise ValueError(f"the cuda-events timer needs a CUDA device, not {device}")
    return timer


def flush_bytes(device: str | torch.device) -> int:
    if torch.device(device).type != "cpu":
        return FLUSH_BYTES
    try:
        text = _L3_SIZE.read_text().strip().upper()
        l3 = int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text.rstrip("M")) * 2**20
    except (OSError, ValueError):
        l3 = 0
    return max(FLUSH_BYTES_CPU, 2 * l3)


class _Clock:
    """perf_counter around ``number`` calls, after synchronizing the case's device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def per_call(self, fn: Callable[[], object], number: int, flush: Callable[[], object] | None) -> float:
        if flush is None:
            start = self.now()
            for _ in range(number):
                fn()
            return max(self.now() - start, 1e-9) / number
        total = 0.0
        for _ in range(number):
            flush()
            start = self.now()
            fn()
            total += self.now() - start
        return max(total, 1e-9) / number


class _CudaEvents:
    """CUDA events on the device's current stream; one host sync per sample."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def per_call(self, fn: Callable[[], object], number: int, flush: Callable[[], object] | None) -> float:
        with torch.cuda.device(self.device):
            pairs = []
            if flush is None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(number):
                    fn()
                end.record()
                pairs.append((start, end))
            else:
                for _ in range(number):
                    flush()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    pairs.append((start, end))
            pairs[-1][1].synchronize()
            total_ms = sum(start.elapsed_time(end) for start, end in pairs)
        return max(total_ms / 1e3, 1e-9) / number


def time_callable(
    fn: Callable[[], object],
    *,
    min_time_s: float,
    min_samples: int,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    warmup_calls: int = WARMUP_CALLS,
    timer: str = "auto",
    flush_cache: bool = False,
) -> TimingStats:
    """Time ``fn()`` on ``device``; see the module docstring for the policy."""
    if min_samples < 1:
        raise ValueError("min_samples must be >= 1")
    dev = torch.device(device)
    timer = resolve_timer(timer, dev)
    clock = _CudaEvents(dev) if timer == "cuda-events" else _Clock(dev)
    flush = None
    if flush_cache:
        buffer = torch.empty(flush_bytes(dev) // 4, dtype=torch.int32, device=dev)
        flush = buffer.zero_
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        started = time.perf_counter()
        for _ in range(warmup_calls):
            clock.per_call(fn, 1, flush)
        samples: list[float] = []
        calls_per_sample = 1
        first_s = clock.per_call(fn, 1, flush)
        if first_s >= MIN_SAMPLE_S:
            samples.append(first_s)
        else:
            while True:  # autorange on the warm function; these calls are not samples
                calls_per_sample *= 2
                if clock.per_call(fn, calls_per_sample, flush) * calls_per_sample >= MIN_SAMPLE_S:
                    break
        timed_s = sum(samples) * calls_per_sample
        while len(samples) < MAX_SAMPLES and (len(samples) < min_samples or timed_s < min_time_s):
            sample_s = clock.per_call(fn, calls_per_sample, flush)
            samples.append(sample_s)
            timed_s += sample_s * calls_per_sample
        measured_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    return summarize(samples, calls_per_sample=calls_per_sample, measured_s=measured_s, timer=timer)
