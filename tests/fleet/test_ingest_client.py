"""The ingest's lean MQTT receive path (fleet/ingest.py: ``_IngestClient``) against
paho's own: the same messages out of the same packets, whatever the chunking of
the socket, and paho's own path for everything the lean one leaves to it."""

from __future__ import annotations

import struct
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.wire import RequestEvent, TelemetryBatch, TelemetryEvent, device_topic
from quantfleet.fleet import ingest as ingest_mod
from quantfleet.fleet.ingest import FleetIngest, _lean_publish, _ReadAhead
from quantfleet.fleet.store import Store
from tests.support import broker_up

V5 = mqtt.MQTTv5


def publish_packet(topic: bytes, payload: bytes, qos: int, mid: int, v5: bool,
                   props: Properties | None = None) -> bytes:
    """A PUBLISH packet's variable header and payload (what paho hands _handle_publish)."""
    out = struct.pack("!H", len(topic)) + topic
    if qos:
        out += struct.pack("!H", mid)
    if v5:
        out += props.pack() if props is not None else b"\x00"
    return out + payload


topics = st.binary(min_size=1, max_size=80).filter(lambda b: b"\x00" not in b)


@settings(max_examples=300, deadline=None)
@given(topic=topics, payload=st.binary(max_size=300), qos=st.sampled_from([0, 1]),
       mid=st.integers(1, 65535), v5=st.booleans(), dup=st.booleans(), retain=st.booleans())
def test_lean_decode_equals_paho_for_publishes_without_properties(
        topic: bytes, payload: bytes, qos: int, mid: int, v5: bool, dup: bool,
        retain: bool) -> None:
    command = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    packet = publish_packet(topic, payload, qos, mid, v5)
    ours = _lean_publish(command, packet, v5)
    theirs = _packet.decode_publish(command, packet, V5 if v5 else mqtt.MQTTv311)
    assert ours is not None
    assert (ours._topic, ours.payload, ours.qos, ours.dup, ours.retain) == (
        theirs.topic, theirs.payload, theirs.qos, theirs.dup, theirs.retain)
    assert ours.mid == (theirs.mid if qos else 0)


@settings(max_examples=100, deadline=None)
@given(topic=topics, payload=st.binary(max_size=100), expiry=st.integers(1, 2**31))
def test_publishes_with_properties_and_qos2_are_left_to_paho(topic: bytes, payload: bytes,
                                                           expiry: int) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expiry
    assert _lean_publish(0x32, publish_packet(topic, payload, 1, 7, True, props), True) is None
    assert _lean_publish(0x34, publish_packet(topic, payload, 2, 7, True), True) is None
    assert _lean_publish(0x32, b"\x00", True) is None  # short: paho reports it
    assert _lean_publish(0x32, publish_packet(topic, payload, 1, 0, True), True) is None


class ChunkedSocket:
    """A socket whose recv returns at most the next chunk of a fixed stream."""

    def __init__(self, data: bytes, chunks: list[int]) -> None:
        self.data, self.chunks, self.calls = data, chunks, 0

    def recv(self, n: int) -> bytes:
        size = self.chunks[self.calls % len(self.chunks)]
        self.calls += 1
        out, self.data = self.data[:min(n, size)], self.data[min(n, size):]
        if not out:
            raise BlockingIOError
        return out


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000),
       chunks=st.lists(st.integers(1, 4096), min_size=1, max_size=8),
       reads=st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_read_ahead_hands_out_the_stream_unchanged(data: bytes, chunks: list[int],
                                                   reads: list[int]) -> None:
    inner = ChunkedSocket(data, chunks)
    sock = _ReadAhead(inner, size=1024)
    got = b""
    i = 0
    while True:
        n = reads[i % len(reads)]
        i += 1
        try:
            part = sock.recv(n)
        except BlockingIOError:
            break
        assert 0 < len(part) <= n
        got += part
        # What paho's loop is told is waiting is exactly what is buffered.
        assert sock.pending() == len(sock._buf) - sock._pos
    assert got == data
    assert sock.pending() == 0


def test_the_paho_hooks_are_where_the_lean_path_expects_them() -> None:
    """paho is pinned; a release that renames these would silently bypass the lean path."""
    for name in ("_create_socket", "_handle_publish", "_in_packet", "_manual_ack",
                 "_in_callback_mutex", "_userdata", "_protocol"):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=V5)
        assert hasattr(client, name) or hasattr(mqtt.Client, name), name
    assert set(mqtt.MQTTMessage.__slots__) == {
        "_topic", "dup", "info", "mid", "payload", "properties", "qos", "retain", "state",
        "timestamp"}


@pytest.mark.skipif(not broker_up(), reason="Mosquitto is not answering on 1883")
def test_both_paths_ingest_through_a_real_broker(tmp_path: object,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch with no properties takes the lean path, one with a message expiry paho's;
    both are committed and acknowledged (the broker redelivers neither)."""
    root = f"qftest/{uuid.uuid4().hex[:10]}/v1"
    lean_calls: list[bool] = []
    real = ingest_mod._lean_publish

    def spy(command: int, packet: bytes | bytearray, v5: bool) -> mqtt.MQTTMessage | None:
        out = real(command, packet, v5)
        lean_calls.append(out is not None)
        return out

    monkeypatch.setattr(ingest_mod, "_lean_publish", spy)
    store = Store(f"sqlite:///{tmp_path}/fleet.db")
    cfg = MqttConfig(broker="mqtt://127.0.0.1:1883", topic_root=root)
    client_id = f"lean-{uuid.uuid4().hex[:6]}"
    ingest = FleetIngest(store, cfg, client_id=client_id, session_expiry_s=60).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex[:6]}",
                      protocol=V5)
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    try:
        for seq, expiry in ((1, None), (2, 600)):
            body = RequestEvent(request_id=f"r{seq}", ts=1e9 + seq, variant="m-Q4_K_M")
            batch = TelemetryBatch(device_id="dev-1", sent_at=1e9, events=[
                TelemetryEvent(boot_epoch=1, seq=seq, kind="request", ts=body.ts, body=body)])
            props = None
            if expiry is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.MessageExpiryInterval = expiry
            pub.publish(device_topic("dev-1", "telemetry", root), batch.model_dump_json(),
                        qos=1, properties=props).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while store.event_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.event_count() == 2
        assert True in lean_calls and False in lean_calls  # one each way
        assert ingest.stats.events_inserted == 2
        ingest.stop()
        # The same session again: both were acknowledged, so nothing comes back.
        ingest = FleetIngest(store, cfg, client_id=client_id, session_expiry_s=0).start()
        time.sleep(1.0)
        assert ingest.stats.received == 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingest.stop()
        store.close()
