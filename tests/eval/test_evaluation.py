"""A real evaluation of the ladder: the quality slope, flips, the noise floor, repeatability."""

from __future__ import annotations

from quantfleet.agent.backends import load_backend
from quantfleet.agent.quality.golden import GoldenSet
from quantfleet.agent.quality.results import EvalReport
from quantfleet.agent.quality.runner import EvalOptions, evaluate_backends
from quantfleet.models.catalog import Catalog

from .conftest import SAMPLE, SEED, comparison


def test_every_variant_answered_every_item(evaluation: EvalReport, catalog: Catalog) -> None:
    assert evaluation.golden.items == SAMPLE and evaluation.golden.sample == SAMPLE
    assert [v.precision for v in evaluation.variants] == ["F16", "Q8_0", "Q2_K"]
    assert evaluation.variants[0].role == "baseline"
    for v in evaluation.variants:
        assert len(v.items) == SAMPLE
        assert v.size_bytes == catalog.resolve(v.precision).size_bytes
        assert v.tokens_per_second > 0 and v.seconds_per_item > 0
        assert v.load["prefix_cache"] is False and v.load["seed"] == SEED
        assert set(v.categories) == {"json_extraction", "tool_call", "refusal", "grounded",
                                     "chat"}
        for run in v.items:
            assert run.properties and run.passed == all(run.properties.values())
            assert run.outcomes and run.prompt_tokens > 0
    # the reference passes the sampled items it was written for
    assert evaluation.variants[0].overall.rate >= 0.8


def test_the_real_slope_q8_close_q2k_clearly_worse_on_structure(evaluation: EvalReport) -> None:
    q8, q2 = comparison(evaluation, "Q8_0"), comparison(evaluation, "Q2_K")
    assert q8.logits and q2.logits
    q8s, q2s = q8.logits.structured, q2.logits.structured
    assert q8s is not None and q2s is not None and q8s.tokens > 50
    assert q8s.kl_mean < 0.02 and q8s.same_top > 0.95
    assert q2s.kl_mean > 10 * q8s.kl_mean
    assert q2s.same_top < q8s.same_top - 0.1
    assert q2s.dp_mean < q8s.dp_mean  # Q2_K loses probability on the reference's choices
    assert q2.logits.prose is not None
    # The answers follow: Q2_K rewrites far more of them than Q8_0. (Which of 10 items
    # then *fail* depends on the CPU's kernels — on AVX2 and AVX-512 builds Q2_K flipped
    # 1 to 5 of 12 — so pass/fail counts are evidence here, not an assertion.)
    texts = {v.precision: [r.text for r in v.items] for v in evaluation.variants}
    changed = {label: sum(a != b for a, b in zip(texts["F16"], texts[label], strict=True))
               for label in ("Q8_0", "Q2_K")}
    assert changed["Q2_K"] >= changed["Q8_0"] + 3, changed


def test_flips_and_mcnemar_agree_with_the_items(evaluation: EvalReport) -> None:
    base = {r.item_id: r for r in evaluation.variants[0].items}
    for c in evaluation.comparisons:
        cand = {r.item_id: r for r in next(v for v in evaluation.variants
                                           if v.name == c.candidate).items}
        worse = [i for i in base if base[i].passed and not cand[i].passed]
        better = [i for i in base if cand[i].passed and not base[i].passed]
        assert (c.worse, c.better) == (len(worse), len(better))
        assert sorted(f.item_id for f in c.flips) == sorted(worse + better)
        for f in c.flips:
            assert f.properties, "a flip names the properties that changed"
        assert 0 < c.mcnemar_p <= 1
        assert sum(d.worse for d in c.categories.values()) == c.worse


def test_noise_floor_is_measured_and_below_every_candidate(evaluation: EvalReport) -> None:
    assert evaluation.noise_load is not None
    assert evaluation.noise_load["n_batch"] != evaluation.variants[0].load["n_batch"]
    floor = comparison(evaluation, "Q8_0").noise_floor
    assert floor is not None and floor.all is not None
    q8 = comparison(evaluation, "Q8_0").logits
    assert q8 is not None and q8.all is not None
    assert floor.all.tokens == q8.all.tokens  # scored on every sampled item here
    assert 0.0 <= floor.all.kl_p99 < q8.all.kl_p99
    assert floor.all.same_top >= q8.all.same_top
    assert set(evaluation.kl_samples) == {"smollm2-135m-Q8_0", "smollm2-135m-Q2_K", "noise"}


def test_report_survives_json(evaluation: EvalReport) -> None:
    again = EvalReport.model_validate_json(evaluation.model_dump_json())
    assert again == evaluation


def test_preflight_path_repeats_the_evaluation(evaluation: EvalReport, catalog: Catalog,
                                               starter: GoldenSet) -> None:
    """The agent's pre-flight on loaded backends gives the same answers, item for item."""
    items = list(starter.sample(SAMPLE, SEED).items)[:3]
    load = EvalOptions(seed=SEED).load()
    f16, q8 = (catalog.resolve(label) for label in ("F16", "Q8_0"))
    base = load_backend(f16.backend, f16.path(catalog.dir), load)
    cand = load_backend(q8.backend, q8.path(catalog.dir), load)
    try:
        [c] = evaluate_backends(items, (f16.name, base), {q8.name: cand}, seed=SEED)
    finally:
        base.close()
        cand.close()
    assert c.n_items == 3
    full = comparison(evaluation, "Q8_0")
    flipped = {f.item_id for f in full.flips}
    assert {f.item_id for f in c.flips} == flipped & {i.id for i in items}
    assert c.logits is not None and c.logits.all is not None
    assert c.logits.all.kl_max <= full.logits.all.kl_max + 1e-12  # type: ignore[union-attr]
