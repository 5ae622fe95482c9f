"""Canary-versus-control statistics for rollout gates: pure functions over samples.

Rates: the difference of two proportions with Newcombe's hybrid score
interval (built from the two Wilson intervals — sane at 0 % and with a few
dozen samples, unlike the Wald interval) and Fisher's exact test.
Latency and cost: the one-sided Mann–Whitney U test on the raw samples, and an
interval for the ratio of a percentile (order statistics) or of the mean
(normal) of canary to control. Every function is tested against scipy or a
published value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from quantfleet.fleet.evaluation.stats import wilson_interval


@dataclass(frozen=True)
class RateDiff:
    """Canary rate minus control rate, with a confidence interval and an exact p-value."""

    canary_k: int
    canary_n: int
    control_k: int
    control_n: int
    diff: float
    low: float
    high: float
    p_greater: float  # H1: the canary's rate is higher
    p_less: float  # H1: the canary's rate is lower

    @property
    def canary_rate(self) -> float:
        return self.canary_k / self.canary_n if self.canary_n else math.nan

    @property
    def control_rate(self) -> float:
        return self.control_k / self.control_n if self.control_n else math.nan


def newcombe_interval(k1: int, n1: int, k2: int, n2: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe (1998, method 10) interval for p1 - p2 from the two Wilson intervals."""
    if n1 == 0 or n2 == 0:
        return (-1.0, 1.0)
    p1, p2 = k1 / n1, k2 / n2
    a = wilson_interval(k1, n1, confidence)
    b = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - a.low) ** 2 + (b.high - p2) ** 2)
    high = d + math.sqrt((a.high - p1) ** 2 + (p2 - b.low) ** 2)
    return (max(-1.0, low), min(1.0, high))


def rate_difference(canary_k: int, canary_n: int, control_k: int, control_n: int,
                    confidence: float = 0.95) -> RateDiff:
    from scipy.stats import fisher_exact

    for k, n, who in ((canary_k, canary_n, "canary"), (control_k, control_n, "control")):
        if n < 0 or not 0 <= k <= n:
            raise ValueError(f"{who}: need 0 <= k <= n, got {k} of {n}")
    low, high = newcombe_interval(canary_k, canary_n, control_k, control_n, confidence)
    table = [[canary_k, canary_n - canary_k], [control_k, control_n - control_k]]
    if canary_n and control_n:
        p_greater = float(fisher_exact(table, alternative="greater").pvalue)
        p_less = float(fisher_exact(table, alternative="less").pvalue)
        diff = canary_k / canary_n - control_k / control_n
    else:
        p_greater = p_less = 1.0
        diff = math.nan
    return RateDiff(canary_k, canary_n, control_k, control_n, diff, low, high,
                    p_greater, p_less)


@dataclass(frozen=True)
class RatioEstimate:
    """A statistic of the canary over the same statistic of the control."""

    statistic: str  # "p95", "p99", "mean"
    canary: float
    control: float
    ratio: float
    low: float
    high: float
    p_greater: float  # Mann-Whitney U, H1: canary values tend to be larger
    canary_n: int
    control_n: int


def quantile_interval(x: np.ndarray, q: float, confidence: float) -> tuple[float, float, float]:
    """The q-quantile of ``x`` with a distribution-free interval from order statistics.

    The number of samples below the true quantile is Binomial(n, q); the ranks at
    its tails bound the quantile with at least the stated confidence.
    """
    from scipy.stats import binom

    s = np.sort(x)
    n = s.size
    alpha = 1 - confidence
    lo_rank = int(binom.ppf(alpha / 2, n, q))  # 0-based index below the quantile
    hi_rank = int(binom.ppf(1 - alpha / 2, n, q))
    point = float(np.percentile(s, q * 100))
    low = float(s[max(0, lo_rank - 1)])
    high = float(s[min(n - 1, hi_rank)])
    return point, low, high


def mean_interval(x: np.ndarray, confidence: float) -> tuple[float, float, float]:
    m = float(x.mean())
    if x.size < 2:
        return m, -math.inf, math.inf
    half = z_for(confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def ratio_estimate(canary: np.ndarray | list[float], control: np.ndarray | list[float],
                   statistic: str = "p95", *, confidence: float = 0.95) -> RatioEstimate:
    """Ratio of a percentile (or the mean) of canary over control, with an interval.

    Each side gets its own interval at a level that makes the pair hold jointly
    at ``confidence`` (Bonferroni); the ratio's interval divides their ends.
    Percentiles use order-statistic intervals (no distribution assumed), the
    mean a normal interval. Mann–Whitney's one-sided test says whether canary
    values tend to be larger. Sorting, not resampling: 10,000 devices' worth
    of samples is judged in milliseconds.
    """
    from scipy.stats import mannwhitneyu

    a = np.asarray(canary, dtype=float)
    b = np.asarray(control, dtype=float)
    if a.size == 0 or b.size == 0:
        return RatioEstimate(statistic, math.nan, math.nan, math.nan, 0.0, math.inf, 1.0,
                             int(a.size), int(b.size))
    each = 1 - (1 - confidence) / 2
    if statistic == "mean":
        pa, la, ha = mean_interval(a, each)
        pb, lb, hb = mean_interval(b, each)
    else:
        q = float(statistic.lstrip("p")) / 100
        pa, la, ha = quantile_interval(a, q, each)
        pb, lb, hb = quantile_interval(b, q, each)
    ratio = pa / pb if pb > 0 else math.inf
    low = la / hb if hb > 0 else 0.0
    high = ha / lb if lb > 0 else math.inf
    p = float(mannwhitneyu(a, b, alternative="greater").pvalue)
    return RatioEstimate(statistic, pa, pb, ratio, max(0.0, low), high, p,
                         int(a.size), int(b.size))


def z_for(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)
