"""Time one callable: warm-up, repetition until a minimum time and sample count, statistics.

Policy: warm up (the first call includes any compilation and allocator
growth), pick how many calls make one sample so that a sample lasts at least
``MIN_SAMPLE_S`` (timer resolution), then take samples until both
``min_time_s`` has passed and ``min_samples`` are in. Every call the
function receives is either the warm-up or inside a sample.

The clock synchronizes the accelerator (CUDA, MPS) before reading
``perf_counter``, as ``torch.utils.benchmark``'s does, so queued kernels are
inside the timed region. We do not call ``torch.utils.benchmark.Timer.timeit``
per sample: it runs at least two extra warm-up calls before every
measurement, which tripled the cost of a sweep's slow cases (a 3 s call
took 9 s per sample) without changing what is measured;
``blocked_autorange`` has no minimum sample count.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch

MIN_SAMPLE_S = 1e-3  # a sample shorter than this is dominated by timer overhead
MAX_SAMPLES = 200
NOISY_IQR_RATIO = 0.1  # IQR / median above this flags the measurement as noisy


@dataclasses.dataclass(frozen=True)
class TimingStats:
    median_s: float
    iqr_s: float
    min_s: float
    mean_s: float
    samples: list[float]  # seconds per call, one value per sample
    calls_per_sample: int
    measured_s: float  # wall time spent inside timed calls (warm-up included)

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def noisy(self) -> bool:
        return self.median_s > 0 and self.iqr_s / self.median_s > NOISY_IQR_RATIO


def summarize(samples: list[float], *, calls_per_sample: int = 1, measured_s: float = 0.0) -> TimingStats:
    """Median, interquartile range, min and mean of per-call times."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = quartiles[2] - quartiles[0]
    else:
        iqr = 0.0
    return TimingStats(
        median_s=statistics.median(ordered),
        iqr_s=iqr,
        min_s=ordered[0],
        mean_s=statistics.fmean(ordered),
        samples=list(samples),
        calls_per_sample=calls_per_sample,
        measured_s=measured_s,
    )


def synchronized_clock() -> float:
    """``perf_counter`` after the accelerator's queued work has finished."""
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    return time.perf_counter()


def _time_calls(fn: Callable[[], object], number: int) -> float:
    """Seconds per call over ``number`` back-to-back calls."""
    start = synchronized_clock()
    for _ in range(number):
        fn()
    return max(synchronized_clock() - start, 1e-9) / number


def time_callable(
    fn: Callable[[], object],
    *,
    min_time_s: float,
    min_samples: int,
    num_threads: int = 1,
    warmup_calls: int = 1,
) -> TimingStats:
    """Time ``fn()``; see the module docstring for the policy."""
    if min_samples < 1:
        raise ValueError("min_samples must be >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        started = time.perf_counter()
        per_call_s = _time_calls(fn, warmup_calls)
        calls_per_sample = max(1, math.ceil(MIN_SAMPLE_S / per_call_s))
        samples: list[float] = []
        timed_s = 0.0
        while len(samples) < MAX_SAMPLES and (len(samples) < min_samples or timed_s < min_time_s):
            sample_s = _time_calls(fn, calls_per_sample)
            samples.append(sample_s)
            timed_s += sample_s * calls_per_sample
        measured_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    return summarize(samples, calls_per_sample=calls_per_sample, measured_s=measured_s)
