"""The consumer: every bad payload is rejected with a counted reason; good ones land once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.wire import StatusPayload, TelemetryBatch, device_topic
from quantfleet.fleet.consumer import REJECTION_REASONS, Consumer, TelemetryStore

from .conftest import wait_until
from .helpers import request_event

ROOT = "quantfleet/v1"


def batch(device: str = "d1", seqs: range = range(1, 4), epoch: int = 5,
          historical: bool = False) -> dict[str, Any]:
    return {"schema_version": 1, "type": "batch", "device_id": device, "sent_at": 1.0,
            "historical": historical,
            "events": [{"boot_epoch": epoch, "seq": s, "kind": "request", "ts": 1.0,
                        "body": request_event(s).model_dump(mode="json")} for s in seqs]}


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
def store(tmp_path: Path) -> TelemetryStore:
    return TelemetryStore(tmp_path / "fleet.db")


def test_a_batch_delivered_twice_is_stored_once(store: TelemetryStore) -> None:
    topic = device_topic("d1", "telemetry")
    assert store.ingest(topic, enc(batch())).inserted == 3
    again = store.ingest(topic, enc(batch()))
    assert (again.inserted, again.duplicates) == (0, 3)
    assert store.event_count("d1") == 3 and store.duplicates == 3


def test_gaps_are_what_is_neither_stored_nor_reported_evicted(store: TelemetryStore) -> None:
    topic = device_topic("d1", "telemetry")
    store.ingest(topic, enc(batch(seqs=range(1, 4))))
    store.ingest(topic, enc(batch(seqs=range(10, 12))))
    assert store.gaps("d1") == [(4, 9)]
    gap = batch(seqs=range(12, 13))
    gap["events"][0].update(kind="gap", body={"type": "gap", "reason": "evicted", "events": 4,
                                              "counts": {"request": 4}, "ranges": [[4, 7]]})
    assert store.ingest(topic, enc(gap)).inserted == 1
    assert store.gaps("d1") == [(8, 9)]
    assert store.evicted_ranges("d1") == [(4, 7)]


def test_a_late_will_of_an_older_start_never_overrides_a_newer_birth(
        store: TelemetryStore) -> None:
    topic = device_topic("d1", "status")

    def status(state: str, epoch: int, reason: str) -> bytes:
        return StatusPayload(device_id="d1", state=state, boot_epoch=epoch,  # type: ignore[arg-type]
                             reason=reason, ts=time.time()).model_dump_json().encode()  # type: ignore[arg-type]

    store.ingest(topic, status("online", 2, "birth"))
    store.ingest(topic, status("offline", 1, "will"))  # the killed start's Will, late
    assert store.status("d1")["state"] == "online"  # type: ignore[index]
    store.ingest(topic, status("offline", 2, "will"))
    assert store.status("d1")["state"] == "offline"  # type: ignore[index]


@pytest.mark.parametrize(("payload", "topic", "reason"), [
    (b"\xff\xfe not json", device_topic("d1", "telemetry"), "not_json"),
    (b"", device_topic("d1", "telemetry"), "not_json"),
    (enc({**batch(), "schema_version": 2}), device_topic("d1", "telemetry"),
     "unsupported_version"),
    (enc({**batch(), "events": []}), device_topic("d1", "telemetry"), "invalid_payload"),
    (enc({**batch(), "extra": 1}), device_topic("d1", "telemetry"), "invalid_payload"),
    (enc(batch(device="d2")), device_topic("d1", "telemetry"), "topic_mismatch"),
    (enc(batch()), "quantfleet/v1/devices/d1/telemetry/extra", "unknown_topic"),
    (enc(batch()), device_topic("d1", "desired"), "unknown_topic"),
])
def test_each_kind_of_bad_payload_has_its_reason(store: TelemetryStore, payload: bytes,
                                                  topic: str, reason: str) -> None:
    assert store.ingest(topic, payload).rejected == reason
    assert store.rejections() == {reason: 1}
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
def test_property_broken_batches_are_rejected_and_counted(store: TelemetryStore,
                                                          doc: dict[str, Any]) -> None:
    before = sum(store.rejections().values())
    result = store.ingest(device_topic("d1", "telemetry"), enc(doc))
    assert result.rejected in REJECTION_REASONS
    assert sum(store.rejections().values()) == before + 1
    assert store.event_count() == 0


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=300),
                         st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                      lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                      max_leaves=20).map(enc)),
       leaf=st.sampled_from(["telemetry", "status"]))
def test_property_arbitrary_payloads_never_crash_the_store(store: TelemetryStore,
                                                           payload: bytes, leaf: str) -> None:
    before = sum(store.rejections().values())
    result = store.ingest(device_topic("d1", leaf), payload)
    if leaf == "status" and payload == b"":
        assert result.rejected is None  # a cleared retained status
    else:
        assert result.rejected in REJECTION_REASONS
        assert sum(store.rejections().values()) == before + 1
    # The store still takes good data afterwards.
    assert store.ingest(device_topic("d1", "telemetry"), enc(batch())).rejected is None


def test_malformed_messages_over_the_broker_are_counted_and_the_consumer_keeps_going(
        tmp_path: Path, topic_root: str, store: TelemetryStore) -> None:
    consumer = Consumer(store, root=topic_root, client_id=f"c-{topic_root}").start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    t = device_topic("d1", "telemetry", topic_root)
    bad = [b"{", b"null", enc([1, 2]), enc({**batch(), "schema_version": 9}),
           enc(batch(device="other")), enc({**batch(), "events": []}), b"\x00\x01"]
    try:
        for p in bad:
            pub.publish(t, p, qos=1).wait_for_publish(5)
        pub.publish(t, enc(batch(seqs=range(1, 51))), qos=1).wait_for_publish(5)
        pub.publish(t, enc(batch(seqs=range(40, 61))), qos=1).wait_for_publish(5)  # overlap
        wait_until(lambda: store.event_count("d1") == 60, what="60 good events")
        wait_until(lambda: sum(store.rejections().values()) == len(bad), what="rejections")
        assert store.rejections() == {"not_json": 2, "invalid_payload": 3,
                                      "unsupported_version": 1, "topic_mismatch": 1}
        assert store.seqs("d1") == list(range(1, 61))
        assert store.duplicates == 11
        assert consumer.received == len(bad) + 2
    finally:
        pub.loop_stop()
        pub.disconnect()
        consumer.stop()


def test_wire_batch_round_trips() -> None:
    doc = batch()
    assert json.loads(TelemetryBatch.model_validate(doc).model_dump_json()) == doc
