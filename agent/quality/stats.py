"""Small-sample statistics for golden-set comparisons, in pure Python.

Exact binomial tails with ``math.comb`` rather than scipy, so the agent's
pre-flight can judge a candidate on the device; the tests pin every figure
against ``scipy.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial proportion (sane at 0 and n, unlike Wald)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    if n == 0:
        return Interval(0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp the float fuzz at the ends: with 0 successes the lower bound is exactly 0.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(low, high)


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.5:  # exact integer arithmetic for the case McNemar needs
        return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired pass/fail outcomes.

    ``worse`` counts items that passed on the baseline and fail on the
    candidate, ``better`` the opposite. Items that agree carry no information
    about a difference and do not enter the test.
    """

    worse: int
    better: int
    p_two_sided: float
    p_worse: float  # one-sided: evidence that the candidate fails more often

    @property
    def discordant(self) -> int:
        return self.worse + self.better


def mcnemar_exact(worse: int, better: int) -> McNemar:
    """Exact (binomial) McNemar test; equals scipy's ``binomtest(worse, worse+better)``."""
    if worse < 0 or better < 0:
        raise ValueError("flip counts cannot be negative")
    n = worse + better
    if n == 0:
        return McNemar(worse, better, 1.0, 1.0)
    two = min(1.0, 2 * binom_cdf(min(worse, better), n))
    # P(X >= worse) = 1 - P(X <= worse - 1)
    one = 1.0 - binom_cdf(worse - 1, n)
    return McNemar(worse, better, two, max(0.0, min(1.0, one)))
