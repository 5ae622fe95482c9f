"""The fleet simulator on a real broker: what it publishes is valid and all of it arrives."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from quantfleet.agent.mqtt import MqttConfig, make_client
from quantfleet.agent.wire import TelemetryBatch
from quantfleet.fleet.simulate import FleetSimulator
from tests.support import Mosquitto

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto is not installed")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield f"mqtt://127.0.0.1:{b.port}"
    b.stop()


def test_stopping_delivers_every_event_made(broker: str) -> None:
    """A stop waits for the broker's acknowledgements instead of dropping the client's
    queue, so a subscriber gets every event the devices made, each a valid batch."""
    cfg = MqttConfig(broker=broker, topic_root=f"qf{uuid.uuid4().hex[:8]}")
    received: dict[str, set[int]] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        batch = TelemetryBatch.model_validate_json(msg.payload)
        with lock:
            received.setdefault(batch.device_id, set()).update(e.seq for e in batch.events)

    sub = make_client(cfg, f"qf-test-sub-{uuid.uuid4().hex[:6]}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(f"{cfg.topic_root}/devices/+/telemetry", qos=1)
    host, port = broker.removeprefix("mqtt://").split(":")
    sub.connect(host, int(port))
    sub.loop_start()
    assert subscribed.wait(10)

    # More than the client sends as fast as it is handed messages: a queue builds up
    # (without the drain, a stop here loses events; with it, none).
    sim = FleetSimulator(cfg, 1000, baseline="m-Q8_0", requests_per_s=30, seed=3).start()
    time.sleep(1.5)
    sim.stop()
    made = {d.device_id: d.seq for d in sim.devices.values()}
    assert sim.delivered == sim.published and sum(made.values()) > 1000
    deadline = time.monotonic() + 20
    while True:
        with lock:
            got = {dev: len(seqs) for dev, seqs in received.items()}
        if got == {d: n for d, n in made.items() if n} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    sub.loop_stop()
    sub.disconnect()
    assert got == {d: n for d, n in made.items() if n}
    assert all(received[d] == set(range(1, n + 1)) for d, n in made.items() if n)
