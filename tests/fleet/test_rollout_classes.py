"""Per-class judging, pure: the pool, each hardware class and each stratum over Samples.

A regression confined to one class fails the step and is named, though the
pool averages it away; a class short of data is insufficient for itself and
holds nothing up unless the spec requires it; devices without hardware are
the class "(unknown)".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.fleet.rollouts.gates import Sample
from quantfleet.fleet.rollouts.spec import UNKNOWN_CLASS, RolloutSpec, SpecError, load_spec
from quantfleet.fleet.rollouts.verdict import (
    POOL,
    Cell,
    GroupKey,
    GroupSamples,
    cell_of,
    decide,
    dimensions,
    merge_cells,
)

WINDOW = (0.0, 600.0)


def spec(**over: object) -> RolloutSpec:
    doc: dict[str, object] = {
        "name": "r", "cohort": "*", "from": "m-Q8_0", "to": "m-int8", "steps": ["10%"],
        "min_samples": 150,
        "gates": [{"metric": "validation_failure_rate", "tolerance": 0.03},
                  {"metric": "p95_latency", "tolerance": 0.25}]}
    doc.update(over)
    return RolloutSpec.model_validate(doc)


def sample(n: int, *, fail_rate: float = 0.02, latency: float = 1.0, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    vf = rng.random(n) < fail_rate
    return Sample.from_requests(
        status=[200] * n, latency_s=rng.lognormal(np.log(latency), 0.25, n),
        attempt_tokens=[60] * n, validation_failed=vf, tool_call_ok=[None] * n,
        refused=[False] * n, fallback=[False] * n)


def cells(**by_class: tuple[Sample, Sample, int, int]) -> dict[Cell, GroupSamples]:
    return {(k.replace("_", "-"),): GroupSamples(*v) for k, v in by_class.items()}


def groups(s: RolloutSpec, c: dict[Cell, GroupSamples]) -> dict[GroupKey, GroupSamples]:
    out: dict[GroupKey, GroupSamples] = merge_cells(c, dimensions(s))
    return out


def test_a_regression_confined_to_one_class_fails_and_is_named() -> None:
    s = spec()
    c = cells(**{
        "x86_avx512_vnni": (sample(3000, seed=1), sample(6000, seed=2), 30, 60),
        "x86_avx2": (sample(400, fail_rate=0.25, seed=3), sample(800, seed=4), 4, 8),
        "arm_dotprod": (sample(3000, seed=5), sample(6000, seed=6), 30, 60),
    })
    v = decide(s, groups(s, c), WINDOW)
    pooled = {g.metric: g.verdict for g in v.gates}
    # The pool averages it away (+1.4 points against a 3-point tolerance) ...
    assert pooled["validation_failure_rate"] != "fail"
    # ... the class does not.
    assert v.verdict == "fail" and v.failed_classes == ["x86-avx2"]
    assert [g.name for g in v.failed] == ["cpu.class=x86-avx2"]
    assert v.reason.startswith("gate failed on cpu.class=x86-avx2 only (4 canary, "
                               "8 control devices; pooled: ")
    assert "validation_failure_rate: canary +2" in v.reason
    ev = v.evidence()
    assert ev["failed"] == ["cpu.class=x86-avx2"]
    assert ev["classes"]["x86-avx2"]["verdict"] == "fail"
    assert ev["classes"]["x86-avx2"]["canary_devices"] == 4
    assert {k: e["verdict"] for k, e in ev["classes"].items()} == {
        "arm-dotprod": "pass", "x86-avx2": "fail", "x86-avx512-vnni": "pass"}
    assert ev["hardware_label"] == "cpu.class"


def test_a_class_short_of_data_is_insufficient_for_itself_and_holds_nothing_up() -> None:
    s = spec()
    c = cells(**{
        "x86_avx512_vnni": (sample(3000, seed=1), sample(6000, seed=2), 30, 60),
        "arm_dotprod": (sample(40, seed=3), sample(900, seed=4), 1, 9),
    })
    v = decide(s, groups(s, c), WINDOW)
    assert v.verdict == "pass"
    assert [g.name for g in v.insufficient] == ["cpu.class=arm-dotprod"]
    assert v.reason == ("passed; insufficient for cpu.class=arm-dotprod: "
                        "validation_failure_rate: 40 canary and 900 control samples; "
                        "150 needed")
    assert v.evidence()["insufficient"] == ["cpu.class=arm-dotprod"]


def test_a_required_class_short_of_canaries_makes_the_step_insufficient() -> None:
    s = spec(min_canaries_per_class=3)
    c = cells(**{
        "x86_avx512_vnni": (sample(3000, seed=1), sample(6000, seed=2), 30, 60),
        "arm_dotprod": (sample(2000, seed=3), sample(2000, seed=4), 2, 10),
    })
    required = s.class_minimum(["x86-avx512-vnni", "arm-dotprod", UNKNOWN_CLASS])
    assert required == {"arm-dotprod": 3, "x86-avx512-vnni": 3}  # the unknown class is not
    v = decide(s, groups(s, c), WINDOW, required)
    # Its gates pass on plenty of requests, but two devices are not the three asked for.
    assert [g.verdict for g in v.classes[0].gates] == ["pass", "pass"]
    assert v.verdict == "insufficient"
    assert v.reason == ("insufficient data: cpu.class=arm-dotprod (required): 2 of 3 "
                        "required healthy canaries")


def test_a_required_class_nobody_judged_is_named() -> None:
    s = spec(required_classes=["arm-i8mm"])
    c = cells(x86_avx2=(sample(3000, seed=1), sample(6000, seed=2), 30, 60))
    v = decide(s, groups(s, c), WINDOW, s.class_minimum(["x86-avx2"]))
    assert v.verdict == "insufficient"
    assert [(g.value, g.required, g.canary_devices) for g in v.classes] == [
        ("arm-i8mm", 1, 0), ("x86-avx2", 0, 30)]
    assert "cpu.class=arm-i8mm (required): 0 of 1 required healthy canaries" in v.reason
    # With it there and passing, the step passes.
    c.update(cells(arm_i8mm=(sample(1000, seed=3), sample(2000, seed=4), 5, 10)))
    assert decide(s, groups(s, c), WINDOW, s.class_minimum([])).verdict == "pass"


def test_a_required_class_without_controls_says_so() -> None:
    s = spec(required_classes=["arm-neon"])
    c = cells(x86_avx2=(sample(3000, seed=1), sample(6000, seed=2), 30, 60),
              arm_neon=(sample(1000, seed=3), Sample(), 5, 0))
    v = decide(s, groups(s, c), WINDOW, s.class_minimum([]))
    assert v.verdict == "insufficient"
    assert "cpu.class=arm-neon (required): no control device in it; " in v.reason


def test_devices_without_hardware_are_the_unknown_class_and_can_fail_it() -> None:
    s = spec()
    assert cell_of(s, {"hw": "rpi5"}) == (UNKNOWN_CLASS,)
    assert cell_of(s, {"cpu.class": "arm-dotprod"}) == ("arm-dotprod",)
    c: dict[Cell, GroupSamples] = {
        ("x86-avx2",): GroupSamples(sample(3000, seed=1), sample(6000, seed=2), 30, 60),
        (UNKNOWN_CLASS,): GroupSamples(sample(500, fail_rate=0.3, seed=3),
                                       sample(1000, seed=4), 5, 10)}
    v = decide(s, groups(s, c), WINDOW)
    assert v.verdict == "fail" and v.failed_classes == [UNKNOWN_CLASS]
    assert "cpu.class=(unknown)" in v.reason


def test_one_class_for_everyone_is_named_once() -> None:
    s = spec()
    c = cells(x86_avx2=(sample(2000, fail_rate=0.3, seed=1), sample(2000, seed=2), 10, 10))
    v = decide(s, groups(s, c), WINDOW)
    assert v.verdict == "fail"
    assert v.reason.startswith("gate failed (every judged device is cpu.class=x86-avx2): "
                               "validation_failure_rate: canary +")
    assert v.reason.count("x86-avx2") == 1
    # An old fleet (nobody reports hardware) reads as before.
    old: dict[Cell, GroupSamples] = {(UNKNOWN_CLASS,): c[("x86-avx2",)]}
    assert decide(s, groups(s, old), WINDOW).reason.startswith(
        "gate failed: validation_failure_rate: canary +")


def test_both_dimensions_are_judged_from_the_same_cells() -> None:
    """stratify_by and the hardware class: each value of each is a group of its own."""
    s = spec(stratify_by="hw")
    assert dimensions(s) == ["cpu.class", "hw"]
    assert cell_of(s, {"cpu.class": "x86-avx2", "hw": "nuc"}) == ("x86-avx2", "nuc")
    assert cell_of(s, {}) == (UNKNOWN_CLASS, "(none)")
    seed = iter(range(100))

    def g(n: int, fail: float = 0.02) -> GroupSamples:
        return GroupSamples(sample(n, fail_rate=fail, seed=next(seed)),
                            sample(2 * n, seed=next(seed)), n // 100, n // 50)

    # The regression is in the "nuc" stratum of both classes: that stratum fails, named
    # (each dimension is judged on its own, from the same four cells).
    c: dict[Cell, GroupSamples] = {
        ("x86-avx2", "nuc"): g(500, 0.3), ("x86-avx2", "rpi5"): g(2000),
        ("arm-dotprod", "nuc"): g(500, 0.3), ("arm-dotprod", "rpi5"): g(2000)}
    merged = groups(s, c)
    assert set(merged) == {POOL, ("cpu.class", "x86-avx2"), ("cpu.class", "arm-dotprod"),
                           ("hw", "nuc"), ("hw", "rpi5")}
    assert merged[("hw", "nuc")].canary.n == 1000 and merged[("hw", "nuc")].canary_devices == 10
    v = decide(s, merged, WINDOW)
    assert v.verdict == "fail"
    assert "hw=nuc" in [x.name for x in v.failed]
    assert v.evidence()["strata"]["nuc"][0]["verdict"] == "fail"  # the old shape, kept
    assert v.evidence()["stratum_verdicts"]["rpi5"]["verdict"] == "pass"
    # stratify_by on the hardware label itself: one dimension, judged once.
    same = spec(stratify_by="cpu.class")
    assert dimensions(same) == ["cpu.class"]


def test_without_a_hardware_label_only_the_pool_is_judged() -> None:
    s = spec(hardware_label=None)
    assert dimensions(s) == [] and cell_of(s, {"cpu.class": "x86-avx2"}) == ()
    c: dict[Cell, GroupSamples] = {
        (): GroupSamples(sample(2000, seed=1), sample(2000, seed=2), 10, 10)}
    v = decide(s, groups(s, c), WINDOW)
    assert v.verdict == "pass" and v.classes == [] and v.evidence()["classes"] == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(1, 40)),
                min_size=1, max_size=12), st.integers(0, 2**16))
def test_merged_cells_equal_the_requests_counted_together(
        parts: list[tuple[int, int, int]], seed: int) -> None:
    """Summing cells (Sample.combine) equals computing each group from its requests."""
    s = spec(stratify_by="hw")
    classes, strata = ("x86-avx2", "arm-dotprod", "x86-sse", UNKNOWN_CLASS), ("a", "b", "c")
    rng = np.random.default_rng(seed)
    raw: dict[tuple[str, ...], list[tuple[float, int, bool]]] = {}
    for ci, si, n in parts:
        # Latencies with exact repeats (shared bins) and token counts with ties.
        rows = [(float(rng.choice([0.2, 0.5, rng.lognormal(-1, 0.5)])),
                 int(rng.integers(10, 20)), bool(rng.random() < 0.3)) for _ in range(n)]
        raw.setdefault((classes[ci], strata[si]), []).extend(rows)

    def of(rows: list[tuple[float, int, bool]]) -> Sample:
        return Sample.from_requests(
            status=[200] * len(rows), latency_s=[r[0] for r in rows],
            attempt_tokens=[r[1] for r in rows], validation_failed=[r[2] for r in rows],
            tool_call_ok=[None] * len(rows), refused=[False] * len(rows),
            fallback=[False] * len(rows))

    merged = merge_cells({c: GroupSamples(of(r), of(r), 1, 2) for c, r in raw.items()},
                         dimensions(s))
    wanted = {POOL: [r for rows in raw.values() for r in rows]}
    for (cls, stratum), rows in raw.items():
        wanted.setdefault(("cpu.class", cls), []).extend(rows)
        wanted.setdefault(("hw", stratum), []).extend(rows)
    assert set(merged) == set(wanted)
    for key, rows in wanted.items():
        got, want = merged[key].canary, of(rows)
        assert (got.requests, got.validation_failures, got.successes) == (
            want.requests, want.validation_failures, want.successes)
        for dist in ("latency", "attempt_tokens"):
            a, b = getattr(got, dist), getattr(want, dist)
            assert np.array_equal(a.key, b.key) and np.array_equal(a.count, b.count)
            assert np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)
        assert merged[key].control_devices == 2 * merged[key].canary_devices


BASE_SPEC = {"name": "r", "cohort": "*", "from": "a", "to": "b", "steps": [1]}


@pytest.mark.parametrize(("change", "message"), [
    ({"required_classes": ["x86_avx2"]}, "required class 'x86_avx2' is not a cpu.class"),
    ({"required_classes": ["x86-avx2", "x86-avx2"]}, "a class is listed twice"),
    ({"required_classes": ["has space"]}, "is not a class name"),
    ({"hardware_label": None, "min_canaries_per_class": 2},
     "required_classes and min_canaries_per_class need a hardware_label"),
    ({"hardware_label": "cpu class"}, "is not a label key"),
    ({"min_canaries_per_class": -1}, "min_canaries_per_class"),
])
def test_bad_class_fields_name_the_field(tmp_path: Path, change: dict[str, object],
                                         message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE_SPEC, **change}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_class_fields_and_their_defaults() -> None:
    s = RolloutSpec.model_validate(BASE_SPEC)
    assert (s.hardware_label, s.min_canaries_per_class, s.required_classes) == (
        "cpu.class", 0, [])
    assert s.class_minimum(["x86-avx2"]) == {}
    assert RolloutSpec.model_validate({**BASE_SPEC, "required_classes": [
        "riscv64", UNKNOWN_CLASS]}).class_minimum([]) == {"riscv64": 1, UNKNOWN_CLASS: 1}
    other = RolloutSpec.model_validate({**BASE_SPEC, "hardware_label": "soc",
                                        "required_classes": ["bcm2712"],
                                        "min_canaries_per_class": 2})
    assert other.class_minimum(["x"]) == {"bcm2712": 2}
