"""The telemetry service as the serving Recorder; lanes after an outage; TLS with a password."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.serving.recorder import Recorder
from quantfleet.agent.telemetry.config import PublisherConfig, TelemetryConfig
from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.telemetry.publisher import Publisher
from quantfleet.agent.telemetry.service import TelemetryService
from quantfleet.agent.wire import device_topic
from tests.support import free_port, private_ca

from .conftest import Mosquitto, wait_until
from .helpers import FleetSide, request_event


def test_service_is_a_recorder_and_sends_raw_events_aggregates_health_and_status(
        tmp_path: Path, topic_root: str) -> None:
    fleet = FleetSide(tmp_path, topic_root).start()
    cfg = TelemetryConfig.model_validate({
        "device_id": "dev-svc", "aggregate_interval_s": 0.3, "health_interval_s": 0.3,
        "labels": {"site": "lab", "hw": "pi5"},
        "mqtt": {"broker": "mqtt://127.0.0.1:1883", "topic_root": topic_root},
        "outbox": {"path": str(tmp_path / "o.db"), "commit_interval_s": 0.05},
        "publisher": {"backoff_initial_s": 0.1},
    })
    sub_status: list[dict[str, Any]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: sub_status.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(device_topic("dev-svc", "status", topic_root), qos=1)
    watcher.loop_start()
    time.sleep(0.3)
    service = TelemetryService(cfg, variant=lambda: "Q8_0").start()
    assert isinstance(service, Recorder) and isinstance(service.outbox, Recorder)
    past = time.time() - 180  # a finished minute, so the ticker flushes it
    for i in range(100):
        service.record(request_event(i, ts=past + i % 50, status=200 if i % 10 else 500))
    try:
        wait_until(lambda: bool(fleet.bodies("dev-svc", "aggregate")), what="an aggregate")
        wait_until(lambda: bool(fleet.bodies("dev-svc", "health")), what="health")
    finally:
        service.close()
    wait_until(lambda: (fleet.device("dev-svc") or {}).get("status_reason") == "shutdown",
               what="offline")
    assert fleet.device("dev-svc")["online"] is False  # type: ignore[index]
    births = [m for m in sub_status if m["reason"] == "birth"]
    assert births and births[0]["labels"] == {"site": "lab", "hw": "pi5"}
    aggs = fleet.bodies("dev-svc", "aggregate")
    assert sum(a["requests"] for a in aggs) == 100
    assert sum(a["errors"] for a in aggs) == 10
    assert {a["variant"] for a in aggs} == {"Q8_0"}
    assert len(fleet.bodies("dev-svc", "request")) == 100
    statuses = fleet.bodies("dev-svc", "device_status")
    assert statuses and statuses[-1]["variant"] == "Q8_0"
    assert fleet.store.seq_gaps(["dev-svc"]) == []
    fleet.stop()
    watcher.loop_stop()
    watcher.disconnect()


def test_after_an_outage_recent_events_go_first_and_the_backlog_is_historical_and_paced(
        tmp_path: Path, topic_root: str) -> None:
    fleet = FleetSide(tmp_path, topic_root).start()
    # What the publisher sent, batch by batch, in the order the broker delivered it.
    sent: list[tuple[bool, list[int]]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: sent.append(
        (json.loads(m.payload)["historical"], [e["seq"] for e in json.loads(m.payload)["events"]]))
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(device_topic("dev-l", "telemetry", topic_root), qos=1)
    watcher.loop_start()
    time.sleep(0.3)
    outbox = Outbox(tmp_path / "dev-l.db", "dev-l", commit_interval_s=0.05).start()
    old = time.time() - 3600
    for i in range(3000):  # recorded during a long outage
        outbox.append(request_event(i, ts=old + i), ts=old + i)
    for i in range(200):  # the last minute
        outbox.record(request_event(10_000 + i))
    outbox.flush()
    rate = 10.0
    publisher = Publisher(outbox, MqttConfig(broker="mqtt://127.0.0.1:1883",
                                             topic_root=topic_root),
                          PublisherConfig(live_window_s=60, backfill_batches_per_s=rate,
                                          batch_max_bytes=16 * 1024))
    started = time.monotonic()
    publisher.start()
    try:
        wait_until(lambda: fleet.event_count("dev-l") == 3200, timeout=60, what="all events")
        elapsed = time.monotonic() - started
        wait_until(lambda: sum(len(seqs) for _, seqs in sent) >= 3200, what="the watcher")
        rows = fleet._rows("SELECT seq, historical FROM events WHERE device_id = :d", d="dev-l")
    finally:
        publisher.stop()
        outbox.close()
        fleet.stop()
        watcher.loop_stop()
        watcher.disconnect()
    # The fleet stored each event with the lane it came in.
    assert all(bool(h) == (seq <= 3000) for seq, h in rows) and len(rows) == 3200
    live = [i for i, (historical, _) in enumerate(sent) if not historical]
    backlog = [i for i, (historical, _) in enumerate(sent) if historical]
    assert all(s > 3000 for i in live for s in sent[i][1])
    assert all(s <= 3000 for i in backlog for s in sent[i][1])
    # The live lane went before the backlog...
    assert max(live) < min(backlog)
    # ...and the backlog went oldest-first, no faster than the rate limit allows.
    order = [s for i in backlog for s in sent[i][1]]
    assert order == sorted(order)
    batches = len(backlog)
    assert batches > 12
    assert elapsed >= (batches - rate) / rate


@pytest.mark.parametrize("password", ["s3cret", "wrong"])
def test_mqtts_with_a_password_from_the_environment(
        tmp_path: Path, topic_root: str, private_broker: Mosquitto,
        monkeypatch: pytest.MonkeyPatch, password: str) -> None:
    ca, cert, key = private_ca(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "pi-01", "s3cret"], check=True)
    tls_port = free_port()
    private_broker.stop()
    private_broker.write_config(tls_listener="\n".join([
        f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
        "allow_anonymous false", f"password_file {passwd}"]))
    private_broker.start()
    fleet = FleetSide(tmp_path, topic_root, port=private_broker.port).start()
    monkeypatch.setenv("QF_TEST_MQTT_PASSWORD", password)
    outbox = Outbox(tmp_path / "o.db", "dev-tls", commit_interval_s=0.05).start()
    publisher = Publisher(outbox, MqttConfig(
        broker=f"mqtts://127.0.0.1:{tls_port}", topic_root=topic_root, ca_file=ca,
        username="pi-01", password_env="QF_TEST_MQTT_PASSWORD"),
        PublisherConfig(backoff_initial_s=0.1, backoff_max_s=0.3)).start()
    try:
        for i in range(300):
            outbox.record(request_event(i))
        if password == "s3cret":
            wait_until(lambda: fleet.event_count("dev-tls") == 300, what="events over TLS")
            assert fleet.seqs("dev-tls") == list(range(1, 301))
        else:
            time.sleep(2.0)  # several refused attempts
            outbox.flush()
            assert publisher.connects == 0 and fleet.event_count("dev-tls") == 0
            assert outbox.stats()["rows"] == 300  # kept for when the credentials are fixed
            assert "not authorised" in private_broker.log().lower()
    finally:
        publisher.stop(timeout=1)
        outbox.close()
        fleet.stop()
        private_broker.stop()
        private_broker.write_config()
        private_broker.start()
