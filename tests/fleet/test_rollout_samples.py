"""The store's SQL aggregation of a window equals the same computed from every request row.

Both engines; requests with every signal mixed in (errors, validation and
tool-call outcomes, refusals, fallbacks, missing values), outside the window,
from devices nobody judges, and on the wrong variant for their side.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from quantfleet.agent.wire import (
    RequestEvent,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.rollouts.gates import Sample
from quantfleet.fleet.rollouts.samples import Member, read_samples
from quantfleet.fleet.store import Store, event_row

BASE, CAND = "m-Q8_0", "m-Q4_K_M"
WINDOW = (1000.0, 1600.0)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def random_request(rng: random.Random, dev: str, seq: int, variant: str,
                   ts: float) -> TelemetryEvent:
    """A request event with every signal the gates count, drawn from ``rng``."""
    validations = []
    if rng.random() < 0.8:
        validations.append(ValidationOutcome(kind="json_schema", passed=rng.random() > 0.1))
    if rng.random() < 0.3:
        validations.append(ValidationOutcome(kind="tool_call", passed=rng.random() > 0.2))
    if rng.random() < 0.1:
        validations.append(ValidationOutcome(kind="refusal", passed=True, detail="refused"))
    body = RequestEvent(
        request_id=f"{dev}-{seq}", ts=ts, variant=variant,
        status=rng.choice([200, 200, 200, 200, 422, 500]),
        # Some instant answers (bin 0), a wide spread, and exact repeats (ties).
        latency_s=rng.choice([0.0, 5e-5, rng.lognormvariate(-1, 0.8), 0.25]),
        prompt_tokens=rng.randint(5, 60), completion_tokens=rng.randint(0, 30),
        attempt_tokens=rng.choice([0, rng.randint(10, 200)]),
        fallback_from=rng.choice([None, None, None, "m-F16"]),
        validations=validations)
    return TelemetryEvent(boot_epoch=1, seq=seq, kind="request", ts=ts, body=body)


def test_sql_aggregates_equal_the_per_request_computation(store: Store) -> None:
    rng = random.Random(11)
    members: dict[str, Member] = {}
    expected: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    batches = []
    for i in range(60):
        dev = f"d{i:02d}"
        side = "canary" if i % 3 == 0 else "control"
        # A cell: hardware class and stratum (every combination on each side).
        cell = (("x86-avx2", "arm-dotprod")[i % 2], ("rpi5", "jetson")[(i // 6) % 2])
        own = CAND if side == "canary" else BASE
        if i < 55:  # the last five devices are not judged
            members[dev] = Member(side, own, cell)
        events = []
        for s in range(1, 41):
            # Mostly inside the window; some before, after, and on the window's edges.
            ts = rng.choice([rng.uniform(*WINDOW), rng.uniform(400, 999), WINDOW[0],
                             WINDOW[1], rng.uniform(1600, 2000)])
            variant = own if rng.random() < 0.9 else (BASE if own == CAND else CAND)
            ev = random_request(rng, dev, s, variant, ts)
            events.append(ev)
            if dev in members and variant == own and WINDOW[0] <= ts < WINDOW[1]:
                expected.setdefault((side, cell), []).append(event_row(dev, ev, 0, False))
        batches.append(TelemetryBatch(device_id=dev, sent_at=2000, events=events))
    store.ingest_batches(batches)

    with store.engine.begin() as conn:
        got = read_samples(conn, members, WINDOW)
        again = read_samples(conn, members, WINDOW)  # the scratch table is reused

    assert set(got) == set(expected) == {(s, (c, k)) for s in ("canary", "control")
                                         for c in ("x86-avx2", "arm-dotprod")
                                         for k in ("rpi5", "jetson")}
    for group, rows in expected.items():
        want = _from_rows(rows)
        for sample in (got[group], again[group]):
            for name in ("requests", "validation_failures", "tool_calls", "tool_calls_ok",
                         "refusals", "fallbacks", "errors", "successes"):
                assert getattr(sample, name) == getattr(want, name), (group, name)
            for dist in ("latency", "attempt_tokens"):
                a, b = getattr(sample, dist), getattr(want, dist)
                assert np.array_equal(a.key, b.key) and np.array_equal(a.count, b.count)
                assert np.allclose(a.low, b.low) and np.allclose(a.high, b.high)
    assert got[("canary", ("x86-avx2", "jetson"))].latency.key[0] == 0  # instant answers: bin 0


def test_nobody_judged_reads_nothing(store: Store) -> None:
    with store.engine.begin() as conn:
        assert read_samples(conn, {}, WINDOW) == {}


def _from_rows(rows: list[dict[str, Any]]) -> Sample:
    return Sample.from_requests(**{c: [r[c] for r in rows] for c in (
        "status", "latency_s", "attempt_tokens", "validation_failed", "tool_call_ok",
        "refused", "fallback")})
