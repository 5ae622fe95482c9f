"""The fleet simulator on a real broker: what it publishes is valid and all of it arrives."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfleet.agent.mqtt import MqttConfig, make_client
from quantfleet.agent.wire import RequestEvent, TelemetryBatch, TelemetryEvent, ValidationOutcome
from quantfleet.fleet.simulate import (
    FleetSimulator,
    SimRequest,
    SimulateOptionError,
    render_batch,
)
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


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.builds(
    SimRequest, seq=st.integers(1, 2**62), latency_s=st.floats(0, 1e4),
    prompt_tokens=st.integers(0, 2**31 - 1), ok=st.booleans()), min_size=1, max_size=20),
    device=st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z"), variant=st.text(min_size=1, max_size=40),
    boot_epoch=st.integers(0, 2**62), now=st.floats(0, 4e9))
def test_a_rendered_batch_is_what_the_models_write(requests: list[SimRequest], device: str,
                                                   variant: str, boot_epoch: int,
                                                   now: float) -> None:
    """The simulator writes batches from templates, not through the models: the JSON
    must be the agent's, parsed strictly, with every field as the models write it."""
    fast = render_batch(device, variant, boot_epoch, now, requests)
    models = TelemetryBatch(device_id=device, sent_at=now, events=[TelemetryEvent(
        boot_epoch=boot_epoch, seq=r.seq, kind="request", ts=now, body=RequestEvent(
            request_id=f"{device}-{r.seq}", ts=now, variant=variant, latency_s=r.latency_s,
            prompt_tokens=r.prompt_tokens, completion_tokens=40,
            validations=[ValidationOutcome(kind="json_schema", passed=r.ok,
                                           detail="" if r.ok else "schema")]))
        for r in requests])
    assert TelemetryBatch.model_validate_json(fast, strict=True) == models
    assert json.loads(fast) == json.loads(models.model_dump_json())


def test_flush_interval_is_checked() -> None:
    with pytest.raises(SimulateOptionError, match=r"flush interval 0\.01 s"):
        FleetSimulator(MqttConfig(broker="mqtt://127.0.0.1:1"), 1, baseline="m-Q8_0",
                       flush_s=0.01)


def test_each_device_publishes_once_per_flush_interval(broker: str) -> None:
    """flush_s 1: every device sends one batch a second on average (none when it served
    nothing), as the agent does once per outbox commit — not one per tick."""
    root = f"qfsim{uuid.uuid4().hex[:8]}"
    cfg = MqttConfig(broker=broker, topic_root=root)
    sim = FleetSimulator(cfg, 200, baseline="m-Q8_0", requests_per_s=20, seed=2,
                         flush_s=1.0).start()
    try:
        p0, e0 = sim.published, sum(d.seq for d in sim.devices.values())
        time.sleep(4.0)
        p1, e1 = sim.published, sum(d.seq for d in sim.devices.values())
    finally:
        sim.stop(clear_retained=False, drain_s=10)
    # Every PUBACK counted, through the simulator's lean path for bare acknowledgements.
    assert sim.delivered == sim.published
    msgs, events = (p1 - p0) / 4.0, (e1 - e0) / 4.0
    assert 200 * 0.7 <= msgs <= 200 * 1.3, msgs  # one a second each, not ten
    assert 200 * 20 * 0.7 <= events <= 200 * 20 * 1.3, events
