"""The pure-Python statistics, pinned against scipy (which the device does not need)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest

from quantfleet.agent.quality.stats import binom_cdf, mcnemar_exact, wilson_interval


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_matches_scipy(kn: tuple[int, int], confidence: float) -> None:
    k, n = kn
    ours = wilson_interval(k, n, confidence)
    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert ours.low == pytest.approx(ref.low, abs=1e-9)
    assert ours.high == pytest.approx(ref.high, abs=1e-9)


def test_wilson_zero_failures_upper_bounds() -> None:
    # the "how many clean samples" figures operators quote
    assert wilson_interval(50, 50).low == pytest.approx(1 - 0.0713, abs=5e-4)
    assert wilson_interval(100, 100).low == pytest.approx(1 - 0.0370, abs=5e-4)
    assert wilson_interval(0, 200).high == pytest.approx(0.0188, abs=5e-4)
    assert wilson_interval(0, 0).low == 0.0 and wilson_interval(0, 0).high == 1.0


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(1, 4, confidence=1.0)


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_matches_scipy(worse: int, better: int) -> None:
    test = mcnemar_exact(worse, better)
    n = worse + better
    if n == 0:
        assert test.p_two_sided == 1.0 and test.p_worse == 1.0
        return
    assert test.p_two_sided == pytest.approx(binomtest(worse, n, 0.5).pvalue, rel=1e-9)
    assert test.p_worse == pytest.approx(
        binomtest(worse, n, 0.5, alternative="greater").pvalue, rel=1e-9, abs=1e-15)
    assert test.discordant == n


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(5, 0).p_two_sided == pytest.approx(0.0625)
    assert mcnemar_exact(5, 0).p_worse == pytest.approx(1 / 32)
    assert mcnemar_exact(3, 3).p_two_sided == 1.0
    assert mcnemar_exact(0, 4).p_worse == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


@given(st.integers(0, 80), st.integers(-2, 82), st.floats(0.01, 0.99))
def test_binom_cdf_matches_the_definition(n: int, k: int, p: float) -> None:
    expected = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))
    assert binom_cdf(k, n, p) == pytest.approx(expected if k >= 0 else 0.0, abs=1e-12)
