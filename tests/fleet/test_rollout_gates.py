"""Gate statistics against known values, and verdicts that cannot pass by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom, fisher_exact, mannwhitneyu

from quantfleet.fleet.rollouts.gates import Sample, combine, judge
from quantfleet.fleet.rollouts.spec import RolloutSpec, SpecError, load_spec, resolve_count
from quantfleet.fleet.rollouts.stats import (
    Binned,
    latency_bin,
    mean_interval,
    newcombe_interval,
    quantile_interval,
    rank_sum_greater,
    rate_difference,
    ratio_estimate,
)


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 vs 48/80, method 10.
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_rate_difference_uses_fishers_exact_test() -> None:
    d = rate_difference(12, 100, 3, 100)
    assert d.diff == pytest.approx(0.09)
    assert d.p_greater == pytest.approx(
        fisher_exact([[12, 88], [3, 97]], alternative="greater").pvalue)
    assert d.low < d.diff < d.high


@given(k1=st.integers(0, 60), n1=st.integers(1, 60), k2=st.integers(0, 60),
       n2=st.integers(1, 60))
def test_newcombe_interval_contains_the_estimate(k1: int, n1: int, k2: int, n2: int) -> None:
    k1, k2 = min(k1, n1), min(k2, n2)
    low, high = newcombe_interval(k1, n1, k2, n2)
    d = k1 / n1 - k2 / n2
    assert -1 <= low <= d + 1e-12 and d - 1e-12 <= high <= 1


def test_ratio_estimate_on_latency_bins() -> None:
    rng = np.random.default_rng(1)
    control = rng.lognormal(0, 0.3, 800)
    canary = control * 1.5
    r = ratio_estimate(latency(canary), latency(control), "p95")
    assert r.ratio == pytest.approx(1.5, rel=0.01)  # bins are 1 % wide
    assert r.low < 1.5 < r.high
    # The rank test is Mann–Whitney's on the binned values: ties within a bin.
    assert r.p_greater == pytest.approx(mannwhitneyu(
        latency_bin(canary), latency_bin(control), alternative="greater").pvalue, rel=1e-9)
    assert r.p_greater < 1e-50
    m = ratio_estimate(Binned.of(np.round(canary * 100)), Binned.of(np.round(control * 100)),
                       "mean")
    assert m.ratio == pytest.approx(1.5, rel=0.01) and m.low < 1.5 < m.high


def latency(x: np.ndarray) -> Binned:
    return Binned.of(x, latency_bin(x))


def test_latency_bins_are_one_percent_wide_from_a_tenth_of_a_millisecond() -> None:
    x = np.asarray([0.0, 9.99e-5, 1e-4, 1.0099e-4, 1.0101e-4, 0.5, 30.0])
    bins = latency_bin(x)
    assert list(bins[:5]) == [0, 0, 1, 1, 2]
    for value, i in zip(x[2:], bins[2:], strict=True):
        assert 1e-4 * 1.01 ** (i - 1) <= value < 1e-4 * 1.01 ** i


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(0, 30)),
                min_size=1, max_size=40))
def test_the_rank_sum_test_is_scipys_on_the_expanded_samples(
        bins: list[tuple[int, int, int]]) -> None:
    """Counts per bin on each side; the binned test equals scipy's on every sample."""
    keys = sorted({k for k, _, _ in bins})
    ca = dict.fromkeys(keys, 0)
    cb = dict.fromkeys(keys, 0)
    for k, a, b in bins:
        ca[k] += a
        cb[k] += b
    x = np.repeat(keys, [ca[k] for k in keys]).astype(float)
    y = np.repeat(keys, [cb[k] for k in keys]).astype(float)
    got = rank_sum_greater(Binned.of(x), Binned.of(y))
    if x.size == 0 or y.size == 0 or np.unique(np.concatenate([x, y])).size == 1:
        assert got == 1.0
        return
    want = mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_quantile_and_mean_of_exact_values_are_the_raw_samples_own() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(20, 400, 5000).astype(float)  # token counts: many ties
    b = Binned.of(x)
    point, low, high = quantile_interval(b, 0.95, 0.95)
    s = np.sort(x)
    lo_rank = int(binom.ppf(0.025, x.size, 0.95))
    hi_rank = int(binom.ppf(0.975, x.size, 0.95))
    assert point == pytest.approx(np.percentile(x, 95))
    assert (low, high) == (s[lo_rank - 1], s[hi_rank])
    m, mlow, mhigh = mean_interval(b, 0.95)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    assert m == pytest.approx(x.mean())
    assert (mlow, mhigh) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))
    with pytest.raises(ValueError, match="exact values"):
        mean_interval(latency(rng.lognormal(0, 0.3, 100)), 0.95)


def test_binned_latency_intervals_hold_the_raw_ones() -> None:
    """Binning moves the point by less than a bin and only widens the interval."""
    rng = np.random.default_rng(4)
    for n in (150, 1000, 20000):
        x = rng.lognormal(-0.7, 0.3, n)
        raw_point, raw_low, raw_high = quantile_interval(Binned.of(x), 0.95, 0.95)
        point, low, high = quantile_interval(latency(x), 0.95, 0.95)
        assert point == pytest.approx(raw_point, rel=0.01)
        assert low <= raw_low and high >= raw_high
        assert low >= raw_low / 1.01 and high <= raw_high * 1.01


def test_quantile_interval_covers_the_true_quantile() -> None:
    """Distribution-free: over many draws the interval holds the true p95 at least
    as often as its stated confidence."""
    rng = np.random.default_rng(5)
    true_p95 = float(np.exp(1.6448536 * 0.5))  # lognormal(0, 0.5)
    hits = 0
    for _ in range(400):
        _, low, high = quantile_interval(latency(rng.lognormal(0, 0.5, 300)), 0.95, 0.95)
        hits += low <= true_p95 <= high
    assert hits / 400 >= 0.93


def sample(n: int, *, fail_rate: float = 0.02, latency: float = 1.0, seed: int = 0,
           tool_ok: float = 0.95, refusals: float = 0.05) -> Sample:
    rng = np.random.default_rng(seed)
    vf = rng.random(n) < fail_rate
    tool = rng.random(n) < tool_ok
    return Sample.from_requests(
        status=[200] * n, latency_s=rng.lognormal(np.log(latency), 0.25, n),
        attempt_tokens=60 + vf * 60, validation_failed=vf,
        tool_call_ok=[bool(t) if i % 2 else None for i, t in enumerate(tool)],
        refused=rng.random(n) < refusals, fallback=vf)


def test_a_clear_regression_fails_and_a_good_canary_passes() -> None:
    control = sample(2000, seed=1)
    bad = sample(400, fail_rate=0.25, seed=2)
    good = sample(2000, seed=3)
    r = judge("validation_failure_rate", bad, control, tolerance=0.02, min_samples=100)
    assert r.verdict == "fail" and r.p_value is not None and r.p_value < 1e-6
    assert judge("validation_failure_rate", good, control, 0.02, 100).verdict == "pass"
    assert judge("p95_latency", good, control, 0.15, 100).verdict == "pass"
    slow = sample(2000, latency=1.6, seed=4)
    assert judge("p95_latency", slow, control, 0.15, 100).verdict == "fail"
    assert judge("cost_per_success", bad, control, 0.15, 100).verdict == "fail"
    assert judge("tool_call_success_rate", sample(2000, tool_ok=0.6, seed=5), control, 0.03,
                 100).verdict == "fail"


def test_a_canary_without_a_single_success_fails_on_cost() -> None:
    control = sample(2000, seed=1)
    broken = sample(500, fail_rate=1.0, seed=2)  # every answer fails validation
    r = judge("cost_per_success", broken, control, tolerance=0.15, min_samples=100)
    assert r.verdict == "fail" and r.canary == float("inf")
    assert r.to_json()["canary"] is None  # JSON has no infinity


def test_too_little_data_is_insufficient_never_a_pass() -> None:
    control = sample(2000, seed=1)
    few = sample(30, seed=2)
    for metric in ("validation_failure_rate", "refusal_rate", "p95_latency"):
        r = judge(metric, few, control, tolerance=0.02, min_samples=100)
        assert r.verdict == "insufficient" and "100 needed" in r.reason
    # Enough samples, but the interval is too wide to promise the tolerance.
    mid = judge("validation_failure_rate", sample(120, fail_rate=0.03, seed=7),
                sample(120, seed=8), tolerance=0.01, min_samples=100)
    assert mid.verdict == "insufficient"
    assert combine([mid]) == "insufficient"
    assert combine([]) == "insufficient"


def test_refusals_are_judged_in_both_directions() -> None:
    control = sample(3000, seed=1)
    fewer = sample(3000, seed=2, refusals=0.0)  # the canary stopped refusing
    r = judge("refusal_rate", fewer, control, tolerance=0.02, min_samples=100)
    assert r.verdict == "fail" and r.estimate is not None and r.estimate < 0


SPEC = """
name: q4km-eu
cohort: "hw=rpi5,region=eu"
from: Q8_0
to: Q4_K_M
steps: [1, "10%", "50%", "100%"]
bake_s: 600
holdback: "10%"
gates:
  - {metric: validation_failure_rate, tolerance: 0.02}
  - {metric: p95_latency, tolerance: 0.15, min_samples: 300}
"""


def test_a_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(SPEC)
    spec = load_spec(path)
    assert isinstance(spec, RolloutSpec)
    assert spec.from_variant == "Q8_0" and spec.steps == [1, "10%", "50%", "100%"]
    assert [g.metric for g in spec.gates] == ["validation_failure_rate", "p95_latency"]
    assert resolve_count("10%", 45) == 5 and resolve_count("100%", 45) == 45
    assert resolve_count(1, 45) == 1 and resolve_count(100, 45) == 45


@pytest.mark.parametrize(("change", "message"), [
    ("to: Q8_0", "from and to are the same variant"),
    ('steps: ["50%", "10%"]', "steps must grow"),
    ("steps: [0]", "a step of 0 devices"),
    ('steps: ["120%"]', "between 0% and 100%"),
    ('cohort: "hw=="', "cohort"),
    ("surprise: 1", "surprise: Extra inputs are not permitted"),
    ("gates: [{metric: vibes, tolerance: 1}]", "unknown metric 'vibes'"),
    ("bake_s: -5", "bake_s"),
])
def test_bad_specs_name_the_field(tmp_path: Path, change: str, message: str) -> None:
    doc = yaml.safe_load(SPEC)
    doc.update(yaml.safe_load(change))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_spec_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not YAML"):
        load_spec(path)
