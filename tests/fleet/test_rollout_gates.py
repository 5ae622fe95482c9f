"""Gate statistics against known values, and verdicts that cannot pass by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import fisher_exact, mannwhitneyu

from quantfleet.fleet.rollouts.gates import Sample, combine, judge
from quantfleet.fleet.rollouts.spec import RolloutSpec, SpecError, load_spec, resolve_count
from quantfleet.fleet.rollouts.stats import (
    newcombe_interval,
    quantile_interval,
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


def test_ratio_estimate_agrees_with_scipy() -> None:
    rng = np.random.default_rng(1)
    control = rng.lognormal(0, 0.3, 800)
    canary = control * 1.5
    r = ratio_estimate(canary, control, "p95")
    assert r.ratio == pytest.approx(1.5, rel=1e-9)
    assert r.low < 1.5 < r.high
    assert r.p_greater == pytest.approx(mannwhitneyu(canary, control,
                                                     alternative="greater").pvalue)
    m = ratio_estimate(canary, control, "mean")
    assert m.ratio == pytest.approx(1.5) and m.low < 1.5 < m.high


def test_quantile_interval_covers_the_true_quantile() -> None:
    """Distribution-free: over many draws the interval holds the true p95 at least
    as often as its stated confidence."""
    rng = np.random.default_rng(5)
    true_p95 = float(np.exp(1.6448536 * 0.5))  # lognormal(0, 0.5)
    hits = 0
    for _ in range(400):
        _, low, high = quantile_interval(rng.lognormal(0, 0.5, 300), 0.95, 0.95)
        hits += low <= true_p95 <= high
    assert hits / 400 >= 0.93


def sample(n: int, *, fail_rate: float = 0.02, latency: float = 1.0, seed: int = 0,
           tool_ok: float = 0.95) -> Sample:
    rng = np.random.default_rng(seed)
    vf = rng.random(n) < fail_rate
    return Sample(validation_failed=vf, tool_call_ok=rng.random(n // 2) < tool_ok,
                  refused=rng.random(n) < 0.05, fallback=vf.copy(),
                  error=np.zeros(n, dtype=bool),
                  latency_s=rng.lognormal(np.log(latency), 0.25, n),
                  attempt_tokens=np.full(n, 60.0) + vf * 60, success=~vf)


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
    fewer = sample(3000, seed=2)
    fewer.refused = np.zeros(3000, dtype=bool)  # the canary stopped refusing
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
