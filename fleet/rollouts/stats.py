"""Canary-versus-control statistics for rollout gates: pure functions over samples.

Rates: the difference of two proportions with Newcombe's hybrid score
interval (built from the two Wilson intervals — sane at 0 % and with a few
dozen samples, unlike the Wald interval) and Fisher's exact test.
Latency and cost: the one-sided Mann–Whitney U test on the raw samples, and a
seeded bootstrap interval for the ratio of a percentile (or mean) of canary
to control. Every function is tested against scipy's values.
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


def _stat(x: np.ndarray, statistic: str, axis: int | None = None) -> np.ndarray:
    if statistic == "mean":
        return np.asarray(np.mean(x, axis=axis))
    q = float(statistic.lstrip("p"))
    return np.asarray(np.percentile(x, q, axis=axis))


def ratio_estimate(canary: np.ndarray | list[float], control: np.ndarray | list[float],
                   statistic: str = "p95", *, confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> RatioEstimate:
    """Ratio of a statistic with a seeded percentile-bootstrap interval, plus Mann–Whitney."""
    from scipy.stats import mannwhitneyu

    a = np.asarray(canary, dtype=float)
    b = np.asarray(control, dtype=float)
    if a.size == 0 or b.size == 0:
        return RatioEstimate(statistic, math.nan, math.nan, math.nan, 0.0, math.inf, 1.0,
                             int(a.size), int(b.size))
    point_a = float(_stat(a, statistic))
    point_b = float(_stat(b, statistic))
    ratio = point_a / point_b if point_b > 0 else math.inf
    rng = np.random.default_rng(seed)
    # Resample in chunks so 10,000-sample inputs stay within a few MB.
    ratios = []
    chunk = max(1, 2_000_000 // max(a.size, b.size))
    done = 0
    while done < resamples:
        m = min(chunk, resamples - done)
        ra = _stat(a[rng.integers(0, a.size, (m, a.size))], statistic, axis=1)
        rb = _stat(b[rng.integers(0, b.size, (m, b.size))], statistic, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(rb > 0, ra / rb, np.inf))
        done += m
    all_r = np.concatenate(ratios)
    alpha = 1 - confidence
    low, high = np.quantile(all_r, [alpha / 2, 1 - alpha / 2])
    p = float(mannwhitneyu(a, b, alternative="greater").pvalue)
    return RatioEstimate(statistic, point_a, point_b, ratio, float(low), float(high), p,
                         int(a.size), int(b.size))


def z_for(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)
