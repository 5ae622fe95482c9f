"""The fleet store on both engines: idempotent ingest, liveness by epoch, seq gaps.

Its migrations, blank and old stores → latest, are tests/fleet/test_migrations.py.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from quantfleet.agent.wire import (
    DeviceStatePayload,
    GapRecord,
    HardwareFingerprint,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.store import (
    EVENT_COLUMNS,
    LAST_SEEN_EVERY_S,
    Store,
    _sqlite_math,
    event_row,
    event_tuple,
    schema,
)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def request_event(seq: int, *, variant: str = "smollm2-135m-Q4_K_M", ok: bool = True,
                  boot: int = 1, device: str = "dev-1") -> TelemetryEvent:
    body = RequestEvent(
        request_id=f"{device}-{seq}", ts=1000.0 + seq, variant=variant, latency_s=0.5,
        prompt_tokens=30, completion_tokens=20,
        validations=[ValidationOutcome(kind="json_schema", passed=ok),
                     ValidationOutcome(kind="tool_call", passed=ok)],
        fallback_from="smollm2-135m-Q2_K" if not ok else None,
    )
    return TelemetryEvent(boot_epoch=boot, seq=seq, kind="request", ts=body.ts, body=body)


def batch(device: str, events: list[TelemetryEvent]) -> TelemetryBatch:
    return TelemetryBatch(device_id=device, sent_at=2000.0, events=events)


def test_ingest_is_idempotent(store: Store) -> None:
    events = [request_event(i) for i in range(1, 51)]
    first = store.ingest_batch(batch("dev-1", events))
    assert (first.inserted, first.duplicates) == (50, 0)
    redelivered = store.ingest_batches([batch("dev-1", events[10:30]),
                                        batch("dev-1", [request_event(51)])])
    assert (redelivered.inserted, redelivered.duplicates) == (1, 20)
    assert store.event_count("request") == 51
    # The same seq from another boot or another device is a different event.
    other = store.ingest_batch(batch("dev-1", [request_event(1, boot=2)]))
    assert other.inserted == 1
    assert store.ingest_batch(batch("dev-2", [request_event(1, device="dev-2")])).inserted == 1
    assert [d["device_id"] for d in store.devices()] == ["dev-1", "dev-2"]


def test_ingest_creates_devices_and_marks_every_one_seen(store: Store) -> None:
    store.ingest_batch(batch("dev-1", [request_event(1)]), received_at=100.0)
    store.ingest_batches([batch("dev-1", [request_event(2)]),
                          batch("dev-2", [request_event(1, device="dev-2")]),
                          batch("dev-3", [request_event(1, device="dev-3")])], received_at=200.0)
    seen = {d["device_id"]: (d["first_seen"], d["last_seen"])
            for d in store.devices(columns=("device_id", "first_seen", "last_seen"))}
    assert seen == {"dev-1": (100.0, 200.0), "dev-2": (200.0, 200.0), "dev-3": (200.0, 200.0)}


def test_request_signals_become_columns(store: Store) -> None:
    store.ingest_batch(batch("dev-1", [request_event(1), request_event(2, ok=False)]))
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "select seq, validation_failed, tool_call_ok, fallback, attempt_tokens "
            "from events order by seq")).all()
    assert [tuple(r) for r in rows] == [(1, False, True, False, 50), (2, True, False, True, 50)]


def test_a_late_will_never_overrides_a_newer_birth(store: Store) -> None:
    def status(state: str, epoch: int, reason: str) -> StatusPayload:
        return StatusPayload(device_id="dev-1", state=state, boot_epoch=epoch,
                             reason=reason, ts=float(epoch))

    assert store.apply_status(status("online", 5, "birth"))
    assert not store.apply_status(status("offline", 4, "will"))  # the old start's Will
    device = store.devices()[0]
    assert device["online"] is True and device["boot_epoch"] == 5
    assert store.apply_status(status("offline", 5, "shutdown"))
    assert not store.apply_status(status("offline", 5, "will"))
    assert store.devices()[0]["status_reason"] == "shutdown"
    assert store.apply_status(status("online", 6, "birth"))
    assert store.devices()[0]["online"] is True


def test_seq_gaps_less_what_the_device_reported(store: Store) -> None:
    have = [s for s in range(1, 31) if not (5 <= s <= 9 or 20 <= s <= 22)]
    events = [request_event(s) for s in have]
    gap = GapRecord(reason="evicted", events=3, counts={"request": 3}, ranges=[(20, 22)])
    events.append(TelemetryEvent(boot_epoch=1, seq=31, kind="gap", ts=2000.0, body=gap))
    store.ingest_batch(batch("dev-1", events))
    gaps = store.seq_gaps()
    assert [(g.device_id, g.first, g.last) for g in gaps] == [("dev-1", 5, 9)]
    assert gaps[0].events == 5


def test_seq_gaps_across_an_outbox_that_started_over(store: Store) -> None:
    """A lost outbox starts again at seq 1 under a new epoch: the holes of the new
    sequence are found, and the old sequence's gap record covers only its own."""
    def ev(epoch: int, seq: int) -> TelemetryEvent:
        return request_event(seq, boot=epoch)

    first = [ev(100, s) for s in range(1, 41) if not 20 <= s <= 22]  # reported below
    gap = GapRecord(reason="evicted", events=3, counts={"request": 3}, ranges=[(20, 22)])
    first.append(TelemetryEvent(boot_epoch=100, seq=41, kind="gap", ts=2000.0, body=gap))
    # A restart (epoch 101, seq runs on): nothing lost in between.
    first += [ev(101, s) for s in range(42, 51)]
    # The outbox is lost: epoch 200 starts at 1, and 5-9 and 20-22 never arrive.
    second = [ev(200, s) for s in range(1, 31) if not (5 <= s <= 9 or 20 <= s <= 22)]
    store.ingest_batch(batch("dev-1", first))
    store.ingest_batch(batch("dev-1", second))
    gaps = store.seq_gaps()
    assert [(g.first, g.last, g.restart) for g in gaps] == [(5, 9, 1), (20, 22, 1)]
    assert sum(g.events for g in gaps) == 8


def test_rejections_are_counted(store: Store) -> None:
    store.record_rejection("quantfleet/v1/devices/x/telemetry", "not JSON")
    store.record_rejection("quantfleet/v1/devices/x/telemetry", "not JSON")
    store.record_rejection("quantfleet/v1/devices/y/telemetry", "schema: events: too short")
    assert store.rejection_counts() == {"not JSON": 2, "schema: events: too short": 1}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=15),
                           min_size=1, max_size=6))
def test_any_redelivery_pattern_stores_each_event_once(
    tmp_path: Path, deliveries: list[list[int]]
) -> None:
    s = Store(f"sqlite:///{tmp_path / f'p{uuid.uuid4().hex}.db'}")
    try:
        total_new = 0
        for seqs in deliveries:
            result = s.ingest_batch(batch("dev-1", [request_event(q) for q in sorted(set(seqs))]))
            total_new += result.inserted
        distinct = {q for seqs in deliveries for q in seqs}
        assert total_new == len(distinct) == s.event_count()
    finally:
        s.close()


def test_a_birth_brings_the_devices_own_labels(store: Store) -> None:
    store.set_labels("dev-1", {"canary": "yes", "hw": "old"})
    store.apply_status(StatusPayload(device_id="dev-1", state="online", boot_epoch=1,
                                     reason="birth", ts=1.0, labels={"hw": "rpi5"}))
    assert store.devices()[0]["labels"] == {"canary": "yes", "hw": "rpi5"}
    assert store.devices(columns=("device_id", "labels")) == [
        {"device_id": "dev-1", "labels": {"canary": "yes", "hw": "rpi5"}}]


def test_a_birth_brings_the_hardware_and_the_labels_derived_from_it(store: Store) -> None:
    hw = HardwareFingerprint(arch="x86_64", cpu_model="AMD EPYC 7B13", features=["avx2", "fma"],
                             cpu_class="x86-avx2", logical_cores=2, memory_bytes=8 << 30)
    store.set_labels("dev-1", {"cpu.class": "made-up", "canary": "yes"})
    store.apply_status(StatusPayload(device_id="dev-1", state="online", boot_epoch=1,
                                     reason="birth", ts=1.0, labels={"hw": "rpi5"},
                                     hardware=hw))
    [device] = store.devices()
    # the fingerprint's labels are facts: they win over an operator's label of the same key
    assert device["labels"] == {"canary": "yes", "hw": "rpi5", "cpu.arch": "x86_64",
                                "cpu.class": "x86-avx2", "cpu.vnni": "false",
                                "cpu.avx512": "false"}
    assert device["hardware"] == hw.model_dump(mode="json")
    # a version-1 birth (an agent from before fingerprints) keeps what the fleet knew
    old = StatusPayload.model_validate({"schema_version": 1, "device_id": "dev-1",
                                        "state": "online", "boot_epoch": 2, "reason": "birth",
                                        "ts": 2.0, "labels": {"hw": "rpi5"}})
    store.apply_status(old)
    [device] = store.devices()
    assert device["labels"]["cpu.class"] == "x86-avx2" and device["hardware"]["arch"] == "x86_64"


_status = st.builds(
    StatusPayload, device_id=st.sampled_from(["d0", "d1"]),
    state=st.sampled_from(["online", "offline"]), boot_epoch=st.integers(0, 3),
    reason=st.sampled_from(["birth", "will", "shutdown"]), ts=st.just(1.0),
    agent_version=st.sampled_from(["", "0.1", "0.2"]),
    labels=st.dictionaries(st.sampled_from(["hw", "region"]), st.sampled_from(["a", "b"]),
                           max_size=2))
_state = st.builds(
    DeviceStatePayload, device_id=st.sampled_from(["d0", "d1"]), boot_epoch=st.integers(0, 3),
    variant=st.sampled_from([None, "v1", "v2"]),
    update_state=st.sampled_from(["idle", "downloading", "healthy", "failed"]),
    ts=st.integers(0, 4).map(float))
_COMPARED = ("labels", "online", "boot_epoch", "status_reason", "agent_version", "variant",
             "update_state", "state", "state_ts")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(st.one_of(_status, _state), max_size=3),
       group=st.lists(st.one_of(_status, _state), min_size=1, max_size=8),
       operator_labels=st.booleans())
def test_a_group_of_statuses_and_states_ends_where_one_by_one_ends(
    store: Store, before: list[StatusPayload | DeviceStatePayload],
    group: list[StatusPayload | DeviceStatePayload], operator_labels: bool,
) -> None:
    """Out-of-order epochs, Wills after shutdowns, older states: the grouped apply of the
    ingest's writer and one message per transaction leave every device the same."""
    run = uuid.uuid4().hex[:8]

    def renamed(msgs: list[Any], prefix: str) -> list[Any]:
        return [m.model_copy(update={"device_id": f"{prefix}-{run}-{m.device_id}"})
                for m in msgs]

    results: dict[str, list[bool]] = {}
    for prefix in ("one", "grp"):
        if operator_labels:
            store.set_labels(f"{prefix}-{run}-d0", {"canary": "yes", "hw": "old"})
        for m in renamed(before, prefix):  # what the store already held
            (store.apply_status if isinstance(m, StatusPayload) else store.apply_state)(m)
    one = renamed(group, "one")
    results["one"] = [store.apply_status(m) if isinstance(m, StatusPayload)
                      else store.apply_state(m) for m in one]
    grp = renamed(group, "grp")
    statuses = [m for m in grp if isinstance(m, StatusPayload)]
    states = [m for m in grp if isinstance(m, DeviceStatePayload)]
    status_ok = iter(store.apply_statuses(statuses))
    state_ok = iter(store.apply_states(states))
    results["grp"] = [next(status_ok) if isinstance(m, StatusPayload) else next(state_ok)
                      for m in grp]
    assert results["grp"] == results["one"]
    rows = {r["device_id"]: r for r in store.devices() if run in r["device_id"]}
    for d in {m.device_id for m in group} | ({"d0"} if operator_labels else set()):
        a, b = rows[f"one-{run}-{d}"], rows[f"grp-{run}-{d}"]
        state_a, state_b = a["state"], b["state"]
        if state_a is not None:  # the state names its own device
            assert state_b["device_id"] == f"grp-{run}-{d}"
            state_a, state_b = {**state_a, "device_id": d}, {**state_b, "device_id": d}
        assert ({c: a[c] for c in _COMPARED if c != "state"}, state_a) == \
            ({c: b[c] for c in _COMPARED if c != "state"}, state_b)


def test_a_group_applies_in_arrival_order(store: Store) -> None:
    """Concrete cases of the property above, with their expected ends."""
    def status(state: str, epoch: int, reason: str, **labels: str) -> StatusPayload:
        return StatusPayload(device_id="dev-1", state=state, boot_epoch=epoch,
                             reason=reason, ts=float(epoch), labels=labels)

    def state(ts: float, variant: str) -> DeviceStatePayload:
        return DeviceStatePayload(device_id="dev-1", boot_epoch=1, variant=variant,
                                  update_state="healthy", ts=ts)

    assert store.apply_statuses([
        status("online", 5, "birth", hw="rpi5"), status("offline", 4, "will"),
        status("offline", 5, "shutdown"), status("offline", 5, "will"),
        status("online", 3, "birth", hw="old")]) == [True, False, True, False, False]
    (device,) = store.devices()
    assert (device["online"], device["boot_epoch"], device["status_reason"],
            device["labels"]) == (False, 5, "shutdown", {"hw": "rpi5"})
    assert store.apply_states([state(10.0, "v2"), state(9.0, "v1"), state(10.0, "v3")]) \
        == [True, False, True]
    assert store.apply_states([state(9.5, "v1")]) == [False]
    (device,) = store.devices()
    assert (device["variant"], device["state_ts"]) == ("v3", 10.0)
    assert store.apply_statuses([]) == [] and store.apply_states([]) == []


def test_sqlite_without_math_functions_gets_them() -> None:
    """A SQLite built without ln/floor gets Python ones with SQLite's semantics."""
    conn = sqlite3.connect(":memory:")
    _sqlite_math(conn)
    assert conn.execute("SELECT ln(1.0), floor(2.7), floor(-0.5), ln(0), ln(-1), ln(NULL)"
                        ).fetchone() == (0.0, 2.0, -1.0, None, None, None)
    assert conn.execute("SELECT ln(2.718281828459045)").fetchone()[0] == pytest.approx(1.0)


_validations = st.lists(st.builds(
    ValidationOutcome, kind=st.sampled_from(["json_schema", "tool_call", "refusal", "regex"]),
    passed=st.booleans(), detail=st.sampled_from(["", "refused", "schema"])), max_size=5)


@settings(max_examples=300, deadline=None)
@given(validations=_validations, prompt=st.integers(0, 10_000), completion=st.integers(0, 10_000),
       attempt=st.integers(0, 30_000), fallback=st.sampled_from([None, "m-Q8_0"]),
       status=st.sampled_from([200, 400, 503]))
def test_an_event_row_carries_the_signals_its_body_says(
        validations: list[ValidationOutcome], prompt: int, completion: int, attempt: int,
        fallback: str | None, status: int) -> None:
    """The typed columns the gates count, from the body by their definitions (the row is
    built by hand for speed: this holds it to what each column means)."""
    body = RequestEvent(request_id="r", ts=5.0, variant="m-Q4_K_M", status=status,
                        prompt_tokens=prompt, completion_tokens=completion,
                        attempt_tokens=attempt, validations=validations,
                        fallback_from=fallback, truncated_messages=3)
    ev = TelemetryEvent(boot_epoch=2, seq=9, kind="request", ts=5.0, body=body)
    row = event_row("dev-1", ev, 7.0, True)
    tool = [v.passed for v in validations if v.kind == "tool_call"]
    assert row == {
        "device_id": "dev-1", "boot_epoch": 2, "seq": 9, "kind": "request", "ts": 5.0,
        "received_at": 7.0, "historical": True, "variant": "m-Q4_K_M", "status": status,
        "latency_s": 0.0, "ttft_s": None, "prompt_tokens": prompt,
        "completion_tokens": completion, "attempt_tokens": attempt or prompt + completion,
        "validation_failed": any(not v.passed for v in validations),
        "tool_call_ok": all(tool) if tool else None,
        "refused": any(v.kind == "refusal" and v.detail == "refused" for v in validations),
        "fallback": fallback is not None, "truncated": 3, "body": body.model_dump_json()}
    assert tuple(row) == EVENT_COLUMNS
    assert set(EVENT_COLUMNS) == {c.name for c in schema.events.columns} - {"id", "txid"}


def test_telemetry_marks_a_device_seen_at_most_every_few_seconds(store: Store) -> None:
    """A device is created by its first telemetry; after that ``last_seen`` moves only
    once LAST_SEEN_EVERY_S has passed (per process), not at every message."""
    def send(seq: int, at: float) -> None:
        store.ingest_batch(TelemetryBatch(device_id="dev-seen", sent_at=at,
                                          events=[request_event(seq)]), received_at=at)

    def last_seen() -> float:
        [row] = [d for d in store.devices(["device_id", "last_seen"])
                 if d["device_id"] == "dev-seen"]
        return float(row["last_seen"])

    send(1, 1000.0)
    assert last_seen() == 1000.0
    send(2, 1000.0 + LAST_SEEN_EVERY_S / 2)
    assert last_seen() == 1000.0
    send(3, 1000.0 + LAST_SEEN_EVERY_S)
    assert last_seen() == 1000.0 + LAST_SEEN_EVERY_S
    assert store.event_count() == 3
    # Another process (a replica, a restart) knows nothing of this one's marks.
    other = Store(store.url)
    other.ingest_batch(TelemetryBatch(device_id="dev-seen", sent_at=0, events=[
        request_event(4)]), received_at=1000.0 + LAST_SEEN_EVERY_S + 1)
    other.close()
    assert last_seen() == 1000.0 + LAST_SEEN_EVERY_S + 1


def test_an_int4_overflow_is_refused_not_truncated(store: Store) -> None:
    """PostgreSQL's binary COPY would store an integer over 32 bits in an int4 column
    truncated, without a word: the store refuses the rows first (the ingest screens
    such values out before; this is the store's own guard). SQLite keeps any integer."""
    row = event_tuple("dev-big", request_event(1).model_copy(update={"body": RequestEvent(
        request_id="r", ts=1.0, variant="m-Q4_K_M")}), 1.0, False)
    at = EVENT_COLUMNS.index("status")
    big = (*row[:at], 2**40, *row[at + 1:])
    if store.dialect == "postgresql":
        with pytest.raises(ValueError, match=r"events\.status: 1099511627776 is outside"):
            store.ingest_rows([row, big], 1.0)
        assert store.event_count() == 0
    else:
        store.ingest_rows([big], 1.0)
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT status FROM events")).scalar_one() == 2**40
