"""Canary-versus-control statistics for rollout gates: pure functions over samples.

Rates: the difference of two proportions with Newcombe's hybrid score
interval (built from the two Wilson intervals — sane at 0 % and with a few
dozen samples, unlike the Wald interval) and Fisher's exact test.
Latency and cost: a one-sided Mann–Whitney (rank-sum) test, and an interval
for the ratio of a percentile (order statistics) or of the mean (normal) of
canary to control — all computed from a ``Binned`` distribution (counts per
ordered bin with the smallest and largest value in each), which the store can
aggregate in SQL instead of handing over every sample. Exact values (token
counts) are bins of their own, and every statistic on them equals the one on
the raw samples; latency is binned 1 % wide on a log scale (``latency_bin``),
and its intervals are widened to the bins' edges so they never claim more
than the raw samples would. Every function is tested against scipy or a
published value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from quantfleet.agent.quality.stats import wilson_interval


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


#: Latency bins: bin 0 holds everything under ``LATENCY_BIN_FLOOR_S``, bin ``i``
#: (i >= 1) holds ``[floor * growth**(i-1), floor * growth**i)``. One percent is
#: far below any latency tolerance a gate sets, and a group's latencies fill a
#: few hundred bins whatever its size.
LATENCY_BIN_FLOOR_S = 1e-4
LATENCY_BIN_GROWTH = 1.01
LN_LATENCY_BIN_GROWTH = math.log(LATENCY_BIN_GROWTH)


def latency_bin(latency_s: np.ndarray | list[float]) -> np.ndarray:
    """The bin of each latency, as the store's SQL computes it (``samples.py``)."""
    x = np.asarray(latency_s, dtype=float)
    out = np.zeros(x.shape, dtype=np.int64)
    above = x >= LATENCY_BIN_FLOOR_S
    out[above] = 1 + np.floor(np.log(x[above] / LATENCY_BIN_FLOOR_S)
                              / LN_LATENCY_BIN_GROWTH).astype(np.int64)
    return out


@dataclass(frozen=True)
class Binned:
    """Observations in ordered, disjoint bins: each bin's count and its smallest and
    largest value.

    ``key`` orders the bins and says which bins of two groups are the same (a
    latency bin number, or the value itself); a bin holding a single distinct
    value has ``low == high``, and then every statistic is the raw samples' own.
    """

    key: np.ndarray  # float, strictly ascending
    count: np.ndarray  # int, > 0
    low: np.ndarray  # float: the smallest value in the bin
    high: np.ndarray  # float: the largest

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def exact(self) -> bool:
        return bool(np.array_equal(self.low, self.high))

    @classmethod
    def empty(cls) -> Binned:
        f = np.zeros(0, dtype=float)
        return cls(f, np.zeros(0, dtype=np.int64), f, f)

    @classmethod
    def of(cls, values: np.ndarray | list[float],
           keys: np.ndarray | list[float] | None = None) -> Binned:
        """Bin raw values: by ``keys`` when given (e.g. ``latency_bin(values)``),
        else one bin per distinct value."""
        x = np.asarray(values, dtype=float)
        k = x if keys is None else np.asarray(keys, dtype=float)
        if x.size == 0:
            return cls.empty()
        uniq, inverse = np.unique(k, return_inverse=True)
        count = np.bincount(inverse, minlength=uniq.size)
        low = np.full(uniq.size, np.inf)
        high = np.full(uniq.size, -np.inf)
        np.minimum.at(low, inverse, x)
        np.maximum.at(high, inverse, x)
        return cls(uniq, count.astype(np.int64), low, high)

    @classmethod
    def from_rows(cls, rows: list[tuple[float, int, float, float]]) -> Binned:
        """(key, count, low, high) rows, in any order, keys possibly repeated (merged)."""
        if not rows:
            return cls.empty()
        key, count, low, high = (np.asarray(c, dtype=float) for c in zip(*rows, strict=True))
        return cls._grouped(key, count, low, high)

    @classmethod
    def _grouped(cls, key: np.ndarray, count: np.ndarray, low: np.ndarray,
                 high: np.ndarray) -> Binned:
        uniq, inverse = np.unique(key, return_inverse=True)
        n = np.bincount(inverse, weights=count, minlength=uniq.size).astype(np.int64)
        lo = np.full(uniq.size, np.inf)
        hi = np.full(uniq.size, -np.inf)
        np.minimum.at(lo, inverse, low)
        np.maximum.at(hi, inverse, high)
        return cls(uniq, n, lo, hi)

    @classmethod
    def concat(cls, parts: Iterable[Binned]) -> Binned:
        """Several groups' observations together, in one pass (bins of the same key
        are one bin): a hardware class from its strata, the pool from every group."""
        nonempty = [p for p in parts if p.key.size]
        if not nonempty:
            return cls.empty()
        if len(nonempty) == 1:
            return nonempty[0]
        return cls._grouped(*(np.concatenate([getattr(p, f) for p in nonempty])
                              for f in ("key", "count", "low", "high")))

    def merge(self, other: Binned) -> Binned:
        return Binned.concat([self, other])

    def scaled(self, factor: float) -> Binned:
        """Every value times ``factor`` (> 0): cost per success from tokens per request."""
        if not factor > 0:
            raise ValueError(f"scale factor must be positive, got {factor}")
        return Binned(self.key * factor, self.count, self.low * factor, self.high * factor)

    def order_statistic(self, rank: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds (low, high) of the value of 0-based ``rank`` in the sorted sample."""
        i = np.searchsorted(np.cumsum(self.count), np.asarray(rank), side="right")
        return self.low[i], self.high[i]

    def value_at(self, rank: np.ndarray) -> np.ndarray:
        """The value of each 0-based rank, exact in single-value bins, else spread evenly
        between the bin's smallest and largest value."""
        ends = np.cumsum(self.count)
        i = np.searchsorted(ends, rank, side="right")
        start = ends[i] - self.count[i]
        span = np.maximum(self.count[i] - 1, 1)
        return np.asarray(self.low[i] + (self.high[i] - self.low[i]) * (rank - start) / span,
                          dtype=float)


def rank_sum_greater(canary: Binned, control: Binned) -> float:
    """One-sided Mann–Whitney U test (H1: canary values tend to be larger).

    Values in the same bin are ties. Normal approximation with the tie and
    continuity corrections — what ``scipy.stats.mannwhitneyu(method="asymptotic")``
    computes on the expanded samples (tested), from a few hundred bins.
    """
    from scipy.special import ndtr

    keys = np.union1d(canary.key, control.key)
    a = np.zeros(keys.size)
    b = np.zeros(keys.size)
    a[np.searchsorted(keys, canary.key)] = canary.count
    b[np.searchsorted(keys, control.key)] = control.count
    n1, n2 = a.sum(), b.sum()
    if n1 == 0 or n2 == 0:
        return 1.0
    t = a + b
    n = n1 + n2
    midrank = np.cumsum(t) - (t - 1) / 2
    u1 = float((a * midrank).sum() - n1 * (n1 + 1) / 2)
    tie_term = float((t**3 - t).sum())
    s = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    if s == 0:  # every value tied: no evidence either way
        return 1.0
    z = (u1 - n1 * n2 / 2 - 0.5) / s
    return float(ndtr(-z))


def quantile_interval(b: Binned, q: float, confidence: float) -> tuple[float, float, float]:
    """The q-quantile with a distribution-free interval from order statistics.

    The number of samples below the true quantile is Binomial(n, q); the ranks at
    its tails bound the quantile with at least the stated confidence. The point
    is numpy's default (linear) percentile; the interval's ends are the smallest
    and largest value of the bins that hold those ranks, so binning only widens it.
    """
    from scipy.stats import binom

    n = b.n
    alpha = 1 - confidence
    lo_rank = int(binom.ppf(alpha / 2, n, q))  # 0-based index below the quantile
    hi_rank = int(binom.ppf(1 - alpha / 2, n, q))
    h = (n - 1) * q
    below = math.floor(h)
    v = b.value_at(np.asarray([below, min(below + 1, n - 1)]))
    point = float(v[0] + (h - below) * (v[1] - v[0]))
    low = float(b.order_statistic(max(0, lo_rank - 1))[0])
    high = float(b.order_statistic(min(n - 1, hi_rank))[1])
    return point, low, high


def mean_interval(b: Binned, confidence: float) -> tuple[float, float, float]:
    """The mean with a normal interval; needs exact values (one value per bin)."""
    if not b.exact:
        raise ValueError("a mean needs exact values, not bins of a range")
    n = b.n
    m = float((b.low * b.count).sum() / n)
    if not math.isfinite(m):  # a group without successes: infinite cost per success
        return m, m, m
    if n < 2:
        return m, -math.inf, math.inf
    sd = math.sqrt(float((b.count * (b.low - m) ** 2).sum()) / (n - 1))
    half = z_for(confidence) * sd / math.sqrt(n)
    return m, m - half, m + half


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


def ratio_estimate(canary: Binned, control: Binned, statistic: str = "p95", *,
                   confidence: float = 0.95) -> RatioEstimate:
    """Ratio of a percentile (or the mean) of canary over control, with an interval.

    Each side gets its own interval at a level that makes the pair hold jointly
    at ``confidence`` (Bonferroni); the ratio's interval divides their ends.
    Percentiles use order-statistic intervals (no distribution assumed), the
    mean a normal interval. Mann–Whitney's one-sided test says whether canary
    values tend to be larger.
    """
    if canary.n == 0 or control.n == 0:
        return RatioEstimate(statistic, math.nan, math.nan, math.nan, 0.0, math.inf, 1.0,
                             canary.n, control.n)
    each = 1 - (1 - confidence) / 2
    if statistic == "mean":
        pa, la, ha = mean_interval(canary, each)
        pb, lb, hb = mean_interval(control, each)
    else:
        q = float(statistic.lstrip("p")) / 100
        pa, la, ha = quantile_interval(canary, q, each)
        pb, lb, hb = quantile_interval(control, q, each)
    ratio = pa / pb if pb > 0 else math.inf
    low = la / hb if hb > 0 else 0.0
    high = ha / lb if lb > 0 else math.inf
    p = rank_sum_greater(canary, control)
    return RatioEstimate(statistic, pa, pb, ratio, max(0.0, low), high, p,
                         canary.n, control.n)


def z_for(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)
