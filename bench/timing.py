"""Time one callable: warm-up, repetition until a minimum time and sample count, statistics.

Each sample is taken with ``torch.utils.benchmark.Timer.timeit`` (which
synchronizes CUDA around the timed region and sets the thread count); the
sample policy is ours: warm up (the first call includes any compilation and
allocator growth), pick how many calls make one sample so that a sample lasts
at least ``MIN_SAMPLE_S`` (timer resolution), then take samples until both
``min_time_s`` has passed and ``min_samples`` are in.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from torch.utils import benchmark

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


def time_callable(
    fn: Callable[[], object],
    *,
    min_time_s: float = 0.5,
    min_samples: int = 5,
    num_threads: int = 1,
    warmup_calls: int = 1,
) -> TimingStats:
    """Time ``fn()``; see the module docstring for the policy."""
    if min_samples < 1:
        raise ValueError("min_samples must be >= 1")
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads)
    started = time.perf_counter()
    warm = timer.timeit(number=warmup_calls)
    per_call_s = warm.mean
    calls_per_sample = max(1, math.ceil(MIN_SAMPLE_S / per_call_s)) if per_call_s > 0 else 1000
    samples: list[float] = []
    timed_s = 0.0
    while len(samples) < MAX_SAMPLES and (len(samples) < min_samples or timed_s < min_time_s):
        measurement = timer.timeit(number=calls_per_sample)
        samples.append(measurement.mean)
        timed_s += measurement.mean * calls_per_sample
    measured_s = time.perf_counter() - started
    return summarize(samples, calls_per_sample=calls_per_sample, measured_s=measured_s)
