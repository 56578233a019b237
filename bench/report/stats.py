"""The statistics of the report and of compare, computed here without scipy (it is not a runtime dependency).

Student's t distribution, least-squares power-law fits with their confidence interval, the two-sided
Mann–Whitney U test (normal approximation with tie and continuity corrections, as
``scipy.stats.mannwhitneyu(method="asymptotic")``), the standard normal tail, geometric means and Pareto fronts.
Plain numbers in and out: nothing here knows about results files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from bench.report.defaults import DEFAULT_CONFIDENCE

# ---------------------------------------------------------------- Student's t and power-law fits


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, 1.0
        if df > 1:
            series = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= cos2 * (2 * k) / (2 * k + 1)
                series += term
        two_sided = 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:
        series, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        two_sided = math.sin(theta) * series
    two_sided = min(1.0, max(0.0, two_sided))
    return 0.5 + 0.5 * two_sided if t >= 0 else 0.5 - 0.5 * two_sided


def student_t_ppf(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`student_t_cdf`)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    if probability < 0.5:
        return -student_t_ppf(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class PowerFit:
    """``value = exp(intercept) * seq_len ** exponent``, fitted by least squares in log-log space."""

    exponent: float
    low: float  # confidence interval of the exponent (NaN with only two points)
    high: float
    intercept: float  # natural log of the prefactor
    n_points: int
    min_seq_len: int
    max_seq_len: int

    def predict(self, seq_len: float) -> float:
        return math.exp(self.intercept + self.exponent * math.log(seq_len))

    def solve(self, value: float) -> float:
        """The length at which the fitted curve reaches ``value`` (NaN for a flat fit)."""
        if self.exponent <= 0:
            return math.nan
        return math.exp((math.log(value) - self.intercept) / self.exponent)


def fit_power_law(
    seq_lens: Sequence[float], values: Sequence[float], *, confidence: float = DEFAULT_CONFIDENCE
) -> PowerFit | None:
    """Fit ``log value = a + k log seq_len``; the interval of ``k`` is its standard error times a t-quantile.

    Points with a non-positive value are dropped. None when fewer than two distinct lengths remain.
    """
    pairs = sorted((float(n), float(v)) for n, v in zip(seq_lens, values, strict=True) if n > 0 and v > 0)
    if len({n for n, _ in pairs}) < 2:
        return None
    x = np.log([n for n, _ in pairs])
    y = np.log([v for _, v in pairs])
    x_mean = x.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x_mean)
    dof = len(pairs) - 2
    if dof >= 1:
        residuals = y - (intercept + slope * x)
        stderr = math.sqrt(float((residuals**2).sum()) / dof / sxx)
        half = student_t_ppf(0.5 + confidence / 2.0, dof) * stderr
        low, high = slope - half, slope + half
    else:
        low = high = math.nan
    return PowerFit(
        exponent=slope,
        low=low,
        high=high,
        intercept=intercept,
        n_points=len(pairs),
        min_seq_len=int(pairs[0][0]),
        max_seq_len=int(pairs[-1][0]),
    )


# ---------------------------------------------------------------- Mann–Whitney U and the normal tail


@dataclasses.dataclass(frozen=True)
class MannWhitney:
    """The U statistic of the first sample and the two-sided p-value."""

    u: float
    p_value: float


def _ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Mid-ranks (1-based; ties share their average rank) and the size of each group of ties."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties = []
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            ranks[order[position]] = (start + stop) / 2.0 + 1.0
        ties.append(stop - start + 1)
        start = stop + 1
    return ranks, ties


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> MannWhitney:
    """Two-sided Mann–Whitney U test, normal approximation with tie and continuity corrections."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    ranks, ties = _ranks([*x, *y])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2.0
    u2 = n1 * n2 - u1
    u = max(u1, u2)
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties)
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return MannWhitney(u=u1, p_value=1.0)
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return MannWhitney(u=u1, p_value=min(1.0, max(0.0, 2.0 * normal_sf(z))))


# ---------------------------------------------------------------- summaries


def geometric_mean(ratios: Iterable[float]) -> float:
    """exp(mean(log r)) over the finite positive ratios (NaN when there are none)."""
    valid = [r for r in ratios if isinstance(r, float | int) and math.isfinite(r) and r > 0]
    if not valid:
        return math.nan
    return math.exp(sum(math.log(r) for r in valid) / len(valid))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (error, time) points no other point beats on both (sorted by error)."""
    front, best_time = [], math.inf
    for error, time_s in sorted(points):
        if time_s < best_time:
            front.append((error, time_s))
            best_time = time_s
    return front
