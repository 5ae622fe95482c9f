"""The agent's birth says what hardware it is, and the fleet's ingest turns it into labels.

Through the real Mosquitto on 127.0.0.1:1883 (a unique topic root per test): the
telemetry service announces its retained birth on ``…/status``; a newcomer that
subscribes afterwards gets it, it carries this machine's fingerprint and validates
against the published JSON Schema (docs/schemas/status.json); the fleet's real
ingest (``FleetIngest``) then has the device's hardware and its cpu.* labels, and
the derived labels win over the device's own label of the same key.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.hardware import fingerprint
from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.telemetry.config import TelemetryConfig
from quantfleet.agent.telemetry.service import TelemetryService
from quantfleet.agent.wire import HardwareFingerprint, StatusPayload, device_topic
from quantfleet.fleet.ingest import FleetIngest
from quantfleet.fleet.store import Store

from .conftest import wait_until

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "status.json"


def _retained(topic: str, timeout: float = 10.0) -> dict[str, Any]:
    """What a client subscribing now gets on ``topic``: the retained message. (The
    publisher counts a birth when it sends it; a subscriber quicker than the broker
    gets it live instead, and then asks again for the retained copy.)"""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got: list[tuple[bool, bytes]] = []
        arrived = threading.Event()

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage,
                       got: list[tuple[bool, bytes]] = got,
                       arrived: threading.Event = arrived) -> None:
            if msg.payload:
                got.append((bool(msg.retain), bytes(msg.payload)))
                arrived.set()

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = on_message
        sub.connect("127.0.0.1", 1883)
        sub.subscribe(topic, qos=1)
        sub.loop_start()
        try:
            arrived.wait(max(0.1, end - time.monotonic()))
        finally:
            sub.loop_stop()
            sub.disconnect()
        retained = [payload for was_retained, payload in got if was_retained]
        if retained:
            doc: dict[str, Any] = json.loads(retained[0])
            return doc
    raise AssertionError(f"no retained message on {topic}")


def _clear(topic: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    try:
        c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def test_the_retained_birth_carries_the_fingerprint_and_the_fleet_labels_the_device(
        tmp_path: Path, topic_root: str) -> None:
    device = "edge-hw-1"
    status_topic = device_topic(device, "status", topic_root)
    cfg = TelemetryConfig.model_validate({
        "device_id": device, "aggregate_interval_s": 60, "health_interval_s": 0,
        # The device's own config claims a class; the fingerprint's fact must win.
        "labels": {"site": "lab", "cpu.class": "made-up"},
        "mqtt": {"broker": "mqtt://127.0.0.1:1883", "topic_root": topic_root},
        "outbox": {"path": str(tmp_path / "outbox.db"), "commit_interval_s": 0.05},
        "publisher": {"backoff_initial_s": 0.1},
    })
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    service = TelemetryService(cfg).start()
    ingest: FleetIngest | None = None
    try:
        wait_until(lambda: service.publisher.births >= 1, what="the birth")
        birth = _retained(status_topic)
        jsonschema.validate(birth, json.loads(SCHEMA.read_text()))
        status = StatusPayload.model_validate(birth)
        assert status.reason == "birth" and status.state == "online"
        assert status.schema_version == StatusPayload.SCHEMA_VERSION == 2
        assert status.hardware == fingerprint()
        hw = status.hardware
        assert hw is not None and hw.llama_cpp_system_info and hw.onnxruntime

        # The fleet starts after the birth: the retained message is all it gets.
        ingest = FleetIngest(store, MqttConfig(broker="mqtt://127.0.0.1:1883",
                                               topic_root=topic_root),
                             client_id=f"fleet-{topic_root}", share_group="",
                             session_expiry_s=5).start()

        def row() -> dict[str, Any] | None:
            return next((d for d in store.devices() if d["device_id"] == device), None)

        wait_until(lambda: (row() or {}).get("online") is True, what="the device online")
        found = row()
        assert found is not None
        assert HardwareFingerprint.model_validate(found["hardware"]) == hw
        derived = hw.labels()
        assert {"cpu.arch", "cpu.class"} <= derived.keys()
        assert found["labels"] == {"site": "lab", **derived}
        assert found["labels"]["cpu.class"] == hw.cpu_class != "made-up"
    finally:
        if ingest is not None:
            ingest.stop()
        service.close()
        store.close()
        _clear(status_topic)
