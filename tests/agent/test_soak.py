"""The soak watch's judgement on request events ([update.soak] is tested with the rest of
[update] in tests/agent/test_update_config.py).

Its Wilson bound is fleet/evaluation/stats.wilson_interval, checked against scipy in
tests/eval/test_stats.py."""

from __future__ import annotations

from quantfleet.agent.update.soak import SoakPolicy, SoakWatch, outcome_of
from quantfleet.agent.wire import RequestEvent, ValidationOutcome

POLICY = SoakPolicy(min_requests=20, max_validation_increase=0.10, max_error_increase=0.05,
                    max_latency_ratio=2.0)


def event(i: int, variant: str, ts: float, *, valid: bool | None = True, status: int = 200,
          latency: float = 0.5, fallback_from: str | None = None,
          error_class: str | None = None) -> RequestEvent:
    checks = [] if valid is None else [ValidationOutcome(kind="json_schema", passed=valid)]
    return RequestEvent(
        request_id=f"r{i}", ts=ts, variant=variant, status=status, latency_s=latency,
        error_class=error_class,
        validations=[ValidationOutcome(kind="json_schema", passed=True)] if fallback_from
        else checks,
        fallback_from=fallback_from, fallback_validations=checks if fallback_from else [])


def feed(watch: SoakWatch, variant: str, start: float, n: int, **kw: object) -> None:
    for i in range(n):
        watch.record(event(i, variant, start + i * 0.01, **kw))  # type: ignore[arg-type]


def test_nothing_is_judged_below_the_minimum_sample() -> None:
    w = SoakWatch()
    feed(w, "old", 0, 50)
    feed(w, "new", 100, 19, valid=False)
    v = w.judge("new", "old", 100, POLICY)
    assert not v.breach and v.requests == 19 and "judged from 20" in v.reason


def test_a_validation_regression_breaches_and_a_similar_rate_does_not() -> None:
    w = SoakWatch()
    for i in range(100):  # 5 % failures before
        w.record(event(i, "old", i * 0.01, valid=i % 20 != 0))
    for i in range(40):  # 40 % failures after
        w.record(event(i, "bad", 100 + i * 0.01, valid=i % 5 >= 2))
    v = w.judge("bad", "old", 100, POLICY)
    assert v.breach and "validation failure rate 16/40" in v.reason
    w2 = SoakWatch()
    for i in range(100):
        w2.record(event(i, "old", i * 0.01, valid=i % 20 != 0))
    for i in range(40):  # 7.5 %: within +10 %
        w2.record(event(i, "ok", 100 + i * 0.01, valid=i % 13 != 0))
    v2 = w2.judge("ok", "old", 100, POLICY)
    assert not v2.breach and "validation failure rate" in v2.reason


def test_errors_and_latency_breach_on_their_own_limits() -> None:
    w = SoakWatch()
    feed(w, "old", 0, 40, latency=0.5)
    feed(w, "slow", 100, 40, latency=1.2)
    v = w.judge("slow", "old", 100, POLICY)
    assert v.breach and "p95 latency 1.20s vs 0.50s" in v.reason
    w.record(event(999, "x", 0, status=200))
    feed(w, "broken", 200, 30, status=500, error_class="backend_error", valid=None)
    v2 = w.judge("broken", "old", 200, POLICY)
    assert v2.breach and "error rate 30/30" in v2.reason


def test_a_fallback_does_not_hide_the_first_answer_and_backpressure_is_not_counted() -> None:
    bad = event(1, "fb", 10.0, valid=False, fallback_from="new")
    got = outcome_of(bad)
    assert got is not None and got[0] == "new" and got[1].valid is False
    assert got[1].latency_s is None  # the rescued answer's latency is not the variant's
    assert outcome_of(event(2, "new", 1, status=429, error_class="queue_full")) is None
    assert outcome_of(event(3, "new", 1, status=503, error_class="draining")) is None
    deadline = outcome_of(event(4, "new", 1, status=503, error_class="deadline", valid=None))
    assert deadline is not None and deadline[1].error


def test_without_a_previous_variant_rates_compare_with_zero() -> None:
    w = SoakWatch()
    feed(w, "new", 0, 30, valid=False)
    v = w.judge("new", None, 0, POLICY)
    assert v.breach and "on nothing" in v.reason
