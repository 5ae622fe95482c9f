"""Fleet ingest and desired state against the real Mosquitto on 127.0.0.1:1883."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.update.signing import (
    Keyring,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from quantfleet.agent.wire import (
    DesiredPayload,
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    device_topic,
)
from quantfleet.fleet.desired import DesiredState, DesiredStateError
from quantfleet.fleet.ingest import FleetIngest
from quantfleet.fleet.messages import Rejected, parse_message
from quantfleet.fleet.store import Store
from quantfleet.models.catalog import Catalog
from tests.support import broker_up

BROKER = "mqtt://127.0.0.1:1883"


pytestmark = pytest.mark.skipif(not broker_up(), reason="Mosquitto is not answering on 1883")


@pytest.fixture
def root() -> str:
    return f"qftest/{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture
def device_client() -> Iterator[mqtt.Client]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    yield c
    c.disconnect()
    c.loop_stop()


def cfg(root: str) -> MqttConfig:
    return MqttConfig(broker=BROKER, topic_root=root)


def batch(device: str, seqs: range, boot: int = 1) -> TelemetryBatch:
    events = []
    for s in seqs:
        body = RequestEvent(request_id=f"{device}-{s}", ts=float(s), variant="v", latency_s=0.2)
        events.append(TelemetryEvent(boot_epoch=boot, seq=s, kind="request", ts=float(s),
                                     body=body))
    return TelemetryBatch(device_id=device, sent_at=time.time(), events=events)


def publish(client: mqtt.Client, topic: str, payload: bytes | str, retain: bool = False) -> None:
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(5)


def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "plain"])
def test_batches_are_stored_once_and_garbage_is_counted(
    store: Store, root: str, device_client: mqtt.Client, shared: bool
) -> None:
    # plain: share_group = "" subscribes without $share (one instance, e.g. on amqtt).
    ingest = FleetIngest(store, cfg(root), client_id=f"fleet-{uuid.uuid4().hex[:6]}",
                         share_group=uuid.uuid4().hex[:6] if shared else "").start()
    try:
        topic = device_topic("dev-1", "telemetry", root)
        b1 = batch("dev-1", range(1, 101)).model_dump_json()
        publish(device_client, topic, b1)
        publish(device_client, topic, b1)  # a redelivery
        publish(device_client, topic, b"{not json")
        publish(device_client, topic, batch("dev-2", range(1, 3)).model_dump_json())
        newer = json.loads(batch("dev-1", range(200, 201)).model_dump_json())
        newer["schema_version"] = 2
        publish(device_client, topic, json.dumps(newer))
        publish(device_client, topic, batch("dev-1", range(101, 151)).model_dump_json())
        wait_for(lambda: ingest.stats.received == 6)
        wait_for(lambda: store.event_count() == 150)
        assert ingest.stats.duplicates == 100
        assert store.rejection_counts() == {"not_json": 1, "topic_mismatch": 1,
                                            "unsupported_version": 1}
        assert [d["device_id"] for d in store.devices()] == ["dev-1"]
    finally:
        ingest.stop()


def test_liveness_through_the_broker(store: Store, root: str, device_client: mqtt.Client) -> None:
    ingest = FleetIngest(store, cfg(root), client_id=f"fleet-{uuid.uuid4().hex[:6]}").start()
    try:
        topic = device_topic("dev-7", "status", root)
        birth = StatusPayload(device_id="dev-7", state="online", boot_epoch=9, reason="birth",
                              ts=1.0)
        late_will = StatusPayload(device_id="dev-7", state="offline", boot_epoch=8,
                                  reason="will", ts=0.5)
        publish(device_client, topic, birth.model_dump_json())
        publish(device_client, topic, late_will.model_dump_json())
        wait_for(lambda: ingest.stats.statuses == 2)
        device = store.devices()[0]
        assert device["online"] is True and device["boot_epoch"] == 9
    finally:
        ingest.stop()


class GatedStore(Store):
    """A store whose first status commit waits for the test: what arrives meanwhile
    queues up and reaches the writer as one group."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def apply_statuses(self, statuses, received_at=None):  # type: ignore[no-untyped-def]
        self.waiting.set()
        assert self.gate.wait(10)
        return super().apply_statuses(statuses, received_at)


def test_a_group_of_statuses_and_states_ends_as_one_by_one(
    tmp_path: Path, root: str, device_client: mqtt.Client
) -> None:
    def status(device: str, state: str, epoch: int, reason: str, **labels: str) -> str:
        return StatusPayload(device_id=device, state=state, boot_epoch=epoch,  # type: ignore[arg-type]
                             reason=reason, ts=1.0, labels=labels).model_dump_json()  # type: ignore[arg-type]

    def state(device: str, ts: float, variant: str) -> str:
        return DeviceStatePayload(device_id=device, boot_epoch=2, variant=variant,
                                  update_state="healthy", ts=ts).model_dump_json()

    store = GatedStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    ingest = FleetIngest(store, cfg(root), client_id=f"fleet-{uuid.uuid4().hex[:6]}").start()
    try:
        publish(device_client, device_topic("dev-b", "status", root),
                status("dev-b", "online", 1, "birth"))  # the writer holds this one at the gate
        assert store.waiting.wait(10)
        rest = [
            ("dev-a", "status", status("dev-a", "online", 2, "birth", hw="rpi5")),
            ("dev-a", "state", state("dev-a", 5.0, "v2")),
            ("dev-a", "status", status("dev-a", "offline", 1, "will")),  # an older start's Will
            ("dev-a", "state", state("dev-a", 3.0, "v1")),  # older than the stored state
            ("dev-a", "status", "{not json"),
            ("dev-a", "status", status("dev-a", "offline", 2, "shutdown")),
            ("dev-a", "status", status("dev-a", "offline", 2, "will")),  # after the shutdown
            ("dev-b", "status", status("dev-b", "offline", 1, "shutdown")),
            ("dev-b", "status", status("dev-b", "online", 2, "birth", hw="x86")),
            ("dev-b", "state", state("dev-b", 1.0, "v1")),
        ]
        for device, leaf, payload in rest:
            publish(device_client, device_topic(device, leaf, root), payload)
        wait_for(lambda: ingest._queue.qsize() == len(rest))
        store.gate.set()
        wait_for(lambda: ingest.stats.received == 1 + len(rest))
        wait_for(lambda: ingest.stats.commits == 2)
        assert (ingest.stats.statuses, ingest.stats.states) == (7, 3)
        assert store.rejection_counts() == {"not_json": 1}
        got = {d["device_id"]: (d["online"], d["boot_epoch"], d["status_reason"], d["labels"],
                                d["variant"], d["state_ts"]) for d in store.devices()}
        assert got == {"dev-a": (False, 2, "shutdown", {"hw": "rpi5"}, "v2", 5.0),
                       "dev-b": (True, 2, "birth", {"hw": "x86"}, "v1", 1.0)}
    finally:
        ingest.stop()
        store.close()


def test_nothing_is_lost_across_a_fleet_restart(
    store: Store, root: str, device_client: mqtt.Client
) -> None:
    """The broker keeps the fleet's persistent session: what arrives while the fleet is
    down is delivered when it returns, and acknowledged only once committed."""
    client_id = f"fleet-{uuid.uuid4().hex[:6]}"
    group = uuid.uuid4().hex[:6]
    first = FleetIngest(store, cfg(root), client_id=client_id, share_group=group).start()
    topic = device_topic("dev-1", "telemetry", root)
    publish(device_client, topic, batch("dev-1", range(1, 51)).model_dump_json())
    wait_for(lambda: store.event_count() == 50)
    first.stop()
    for k in range(5):  # while the fleet is down
        publish(device_client, topic, batch("dev-1", range(51 + 50 * k, 101 + 50 * k))
                .model_dump_json())
    second = FleetIngest(store, cfg(root), client_id=client_id, share_group=group).start()
    try:
        wait_for(lambda: store.event_count() == 300)
        assert store.seq_gaps() == []
    finally:
        second.stop()


def test_shared_subscription_splits_the_load_without_duplicates(
    store: Store, root: str, device_client: mqtt.Client
) -> None:
    group = uuid.uuid4().hex[:6]
    a = FleetIngest(store, cfg(root), client_id=f"fa-{group}", share_group=group).start()
    b = FleetIngest(store, cfg(root), client_id=f"fb-{group}", share_group=group).start()
    try:
        topic = device_topic("dev-1", "telemetry", root)
        for k in range(40):
            publish(device_client, topic, batch("dev-1", range(1 + 10 * k, 11 + 10 * k))
                    .model_dump_json())
        wait_for(lambda: store.event_count() == 400)
        assert a.stats.received + b.stats.received == 40
        assert a.stats.received > 0 and b.stats.received > 0
        assert a.stats.duplicates + b.stats.duplicates == 0
    finally:
        a.stop()
        b.stop()


def test_desired_state_is_retained_signed_and_revised(
    store: Store, root: str, ladder_dir: Path, tmp_path: Path, device_client: mqtt.Client
) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fp-{uuid.uuid4().hex[:6]}",
                            protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    try:
        desired = DesiredState(store, publisher, load_private_key(key_path), ladder_dir,
                               "http://fleet.local:8600", topic_root=root)
        desired.set_variant(["dev-a", "dev-b"], "Q8_0")
        desired.set_variant(["dev-b"], "Q4_K_M", rollout_id="r1")
        with pytest.raises(DesiredStateError, match="no variant 'Q9'"):
            desired.set_variant(["dev-a"], "Q9")
        # set_variant stores and queues; the broker has them once it acknowledged them.
        assert desired.wait_acknowledged(None, 5) == []

        # A device that connects afterwards finds its retained desired state.
        got: dict[str, DesiredPayload] = {}
        done = threading.Event()

        def on_message(c, u, msg):  # type: ignore[no-untyped-def]
            if not msg.payload:  # the clean-up below clears the retained messages
                return
            p = DesiredPayload.model_validate_json(msg.payload)
            got[p.device_id] = p
            if len(got) == 2:
                done.set()

        device_client.on_message = on_message
        device_client.subscribe(f"{root}/devices/+/desired", qos=1)
        assert done.wait(5)
        assert (got["dev-a"].variant, got["dev-a"].revision) == ("smollm2-135m-Q8_0", 1)
        assert (got["dev-b"].variant, got["dev-b"].revision) == ("smollm2-135m-Q4_K_M", 2)
        assert got["dev-b"].rollout_id == "r1"
        entry = Catalog(ladder_dir).resolve("Q4_K_M")
        assert got["dev-b"].sha256 == entry.sha256
        Keyring(load_public_key(pub_path)).verify_desired(got["dev-b"].model_dump(mode="json"),
                                                          got["dev-b"].signature)
        assert [a["action"] for a in store.audit_log()] == ["desired.set"] * 3
        # After a restart the fleet re-publishes what it stored.
        assert desired.republish() == 2
        # The fleet's key is rotated: at its next start it signs every stored desired
        # state again with the new key, same revision, before publishing it.
        new_key, new_pub = generate_keypair(tmp_path / "keys-2027")
        rotated = DesiredState(store, publisher, load_private_key(new_key), ladder_dir,
                               "http://fleet.local:8600", topic_root=root)
        assert rotated.republish() == 2
        assert rotated.wait_acknowledged(None, 5) == []
        new_ring = Keyring(load_public_key(new_pub))
        for p in store.desired():
            assert p.key_id == rotated.key_id != desired.key_id
            new_ring.verify_desired(p.model_dump(mode="json"), p.signature)
        assert [p.revision for p in store.desired()] == [1, 2]
    finally:
        for d in ("dev-a", "dev-b"):  # clear the retained messages
            publish(publisher, device_topic(d, "desired", root), b"", retain=True)
        publisher.disconnect()
        publisher.loop_stop()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                     max_size=4),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
), leaf=st.sampled_from(["telemetry", "status", "state", "desired", "other"]))
def test_any_payload_is_parsed_or_rejected_with_a_reason(payload: bytes, leaf: str) -> None:
    result = parse_message(f"quantfleet/v1/devices/dev-1/{leaf}", payload)
    if isinstance(result, Rejected):
        assert result.reason in ("not_json", "unsupported_version", "invalid_payload",
                                 "topic_mismatch", "unknown_topic")
        assert result.detail
