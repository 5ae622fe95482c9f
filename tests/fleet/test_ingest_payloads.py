"""The fleet's ingest, payload by payload: every bad one is rejected with a counted reason,
good ones land once — the same ``apply_messages`` its writer runs, on a real store, and
through the real broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.wire import RequestEvent, StatusPayload, TelemetryBatch, device_topic
from quantfleet.fleet.ingest import FleetIngest, apply_messages
from quantfleet.fleet.messages import REJECTION_REASONS
from quantfleet.fleet.store import SeqGap, Store

ROOT = "quantfleet/v1"


def request_body(seq: int) -> dict[str, Any]:
    return RequestEvent(request_id=f"r{seq}", ts=1.0, variant="smollm2-135m-Q4_K_M",
                        latency_s=0.5).model_dump(mode="json")


def batch(device: str = "d1", seqs: range = range(1, 4), epoch: int = 5) -> dict[str, Any]:
    return {"schema_version": 1, "type": "batch", "device_id": device, "sent_at": 1.0,
            "historical": False,
            "events": [{"boot_epoch": epoch, "seq": s, "kind": "request", "ts": 1.0,
                        "body": request_body(s)} for s in seqs]}


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def ingest(store: Store, topic: str, payload: bytes) -> dict[str, int]:
    """One message through the writer's path; the rejections it added, by reason."""
    before = store.rejection_counts()
    apply_messages(store, [(topic, payload)], ROOT)
    after = store.rejection_counts()
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_a_batch_delivered_twice_is_stored_once(store: Store) -> None:
    topic = device_topic("d1", "telemetry")
    first = apply_messages(store, [(topic, enc(batch()))], ROOT)
    again = apply_messages(store, [(topic, enc(batch()))], ROOT)
    assert (first.events_inserted, again.events_inserted, again.duplicates) == (3, 0, 3)
    assert store.event_count() == 3


def test_gaps_are_what_is_neither_stored_nor_reported_evicted(store: Store) -> None:
    topic = device_topic("d1", "telemetry")
    ingest(store, topic, enc(batch(seqs=range(1, 4))))
    ingest(store, topic, enc(batch(seqs=range(10, 12))))
    assert store.seq_gaps() == [SeqGap("d1", 4, 9)]
    gap = batch(seqs=range(12, 13))
    gap["events"][0].update(kind="gap", body={"type": "gap", "reason": "evicted", "events": 4,
                                              "counts": {"request": 4}, "ranges": [[4, 7]]})
    assert ingest(store, topic, enc(gap)) == {}
    assert store.seq_gaps() == [SeqGap("d1", 8, 9)]


def test_a_late_will_of_an_older_start_never_overrides_a_newer_birth(store: Store) -> None:
    topic = device_topic("d1", "status")

    def status(state: str, epoch: int, reason: str) -> bytes:
        return StatusPayload(device_id="d1", state=state, boot_epoch=epoch,  # type: ignore[arg-type]
                             reason=reason, ts=time.time()).model_dump_json().encode()  # type: ignore[arg-type]

    ingest(store, topic, status("online", 2, "birth"))
    ingest(store, topic, status("offline", 1, "will"))  # the killed start's Will, late
    assert store.devices()[0]["online"] is True
    ingest(store, topic, status("offline", 2, "will"))
    assert store.devices()[0]["online"] is False


@pytest.mark.parametrize(("payload", "topic", "reason"), [
    (b"\xff\xfe not json", device_topic("d1", "telemetry"), "not_json"),
    (b"", device_topic("d1", "telemetry"), "not_json"),
    (enc({**batch(), "schema_version": 2}), device_topic("d1", "telemetry"),
     "unsupported_version"),
    (enc({**batch(), "events": []}), device_topic("d1", "telemetry"), "invalid_payload"),
    (enc({**batch(), "extra": 1}), device_topic("d1", "telemetry"), "invalid_payload"),
    # strict, as the published JSON Schemas are: a string is not a sequence number
    (enc({**batch(), "events": [{**batch()["events"][0], "seq": "5"}]}),
     device_topic("d1", "telemetry"), "invalid_payload"),
    (enc(batch(device="d2")), device_topic("d1", "telemetry"), "topic_mismatch"),
    (enc(batch()), "quantfleet/v1/devices/d1/telemetry/extra", "unknown_topic"),
    (enc(batch()), device_topic("d1", "desired"), "unknown_topic"),
])
def test_each_kind_of_bad_payload_has_its_reason(store: Store, payload: bytes, topic: str,
                                                  reason: str) -> None:
    assert ingest(store, topic, payload) == {reason: 1}
    assert store.event_count() == 0


def _mutations() -> st.SearchStrategy[Any]:
    """Valid batches with one field broken in a way the schema forbids."""
    good = batch()

    def break_it(path_value: tuple[str, Any]) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        where, value = path_value
        if where == "event":
            doc["events"][0][next(iter(value))] = value[next(iter(value))]
        elif where == "body":
            doc["events"][0]["body"][next(iter(value))] = value[next(iter(value))]
        else:
            doc[where] = value
        return doc

    bad = st.one_of(
        st.tuples(st.just("device_id"), st.one_of(st.just(""), st.just("a/b"), st.integers())),
        st.tuples(st.just("events"), st.one_of(st.just([]), st.integers(), st.text())),
        st.tuples(st.just("type"), st.text().filter(lambda t: t != "batch")),
        st.tuples(st.just("event"), st.fixed_dictionaries(
            {"seq": st.one_of(st.integers(max_value=0), st.text(), st.none())})),
        st.tuples(st.just("event"), st.fixed_dictionaries(
            {"kind": st.sampled_from(["aggregate", "gap", "health", "x"])})),
        st.tuples(st.just("body"), st.fixed_dictionaries(
            {"latency_s": st.one_of(st.text(), st.lists(st.integers()))})),
        st.tuples(st.just("body"), st.fixed_dictionaries({"unexpected": st.integers()})),
    )
    return bad.map(break_it)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_mutations())
def test_property_broken_batches_are_rejected_and_counted(store: Store,
                                                          doc: dict[str, Any]) -> None:
    added = ingest(store, device_topic("d1", "telemetry"), enc(doc))
    assert len(added) == 1 and next(iter(added.values())) == 1, added
    assert set(added) <= set(REJECTION_REASONS)
    assert store.event_count() == 0


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=300),
                         st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                      lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                      max_leaves=20).map(enc)),
       leaf=st.sampled_from(["telemetry", "status", "state"]))
def test_property_arbitrary_payloads_never_crash_the_ingest(store: Store, payload: bytes,
                                                            leaf: str) -> None:
    added = ingest(store, device_topic("d1", leaf), payload)
    if leaf in ("status", "state") and payload == b"":
        assert added == {}  # a cleared retained message
    else:
        assert len(added) == 1 and set(added) <= set(REJECTION_REASONS), added
    # The store still takes good data afterwards.
    before = store.event_count()
    assert ingest(store, device_topic("d1", "telemetry"),
                  enc(batch(seqs=range(before + 1, before + 4)))) == {}
    assert store.event_count() == before + 3


def test_malformed_messages_over_the_broker_are_counted_and_the_ingest_keeps_going(
        store: Store) -> None:
    root = f"qf-test-{uuid.uuid4().hex[:8]}"
    cfg = MqttConfig(broker="mqtt://127.0.0.1:1883", topic_root=root)
    fleet = FleetIngest(store, cfg, client_id=f"fleet-{root}", share_group="",
                        session_expiry_s=0).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    t = device_topic("d1", "telemetry", root)
    bad = [b"{", b"null", enc([1, 2]), enc({**batch(), "schema_version": 9}),
           enc(batch(device="other")), enc({**batch(), "events": []}), b"\x00\x01"]
    try:
        for p in bad:
            pub.publish(t, p, qos=1).wait_for_publish(5)
        pub.publish(t, enc(batch(seqs=range(1, 51))), qos=1).wait_for_publish(5)
        pub.publish(t, enc(batch(seqs=range(40, 61))), qos=1).wait_for_publish(5)  # overlap
        deadline = time.monotonic() + 20
        while fleet.stats.received < len(bad) + 2 or store.event_count() < 60:
            assert time.monotonic() < deadline, (fleet.stats, store.event_count())
            time.sleep(0.05)
        assert store.rejection_counts() == {"not_json": 2, "invalid_payload": 3,
                                            "unsupported_version": 1, "topic_mismatch": 1}
        assert store.event_count() == 60 and store.seq_gaps() == []
        assert fleet.stats.duplicates == 11
    finally:
        pub.loop_stop()
        pub.disconnect()
        fleet.stop()


def test_wire_batch_round_trips() -> None:
    doc = batch()
    assert json.loads(TelemetryBatch.model_validate(doc).model_dump_json()) == doc
