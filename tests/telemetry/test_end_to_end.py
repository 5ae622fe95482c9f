"""The telemetry path against real Mosquitto brokers, with exact counts."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.wire import StatusPayload, device_topic

from .conftest import Mosquitto, wait_until
from .helpers import FleetSide, pipeline, request_event


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_event_arrives_once_on_the_shared_broker(tmp_path: Path, topic_root: str,
                                                       protocol: str) -> None:
    store = FleetSide(tmp_path, topic_root, protocol=protocol).start()
    outbox, publisher = pipeline(tmp_path, "dev-a", 1883, topic_root, protocol=protocol)
    try:
        for i in range(3000):
            outbox.record(request_event(i))
        wait_until(lambda: store.event_count("dev-a") == 3000, what="3000 events stored")
        wait_until(lambda: outbox.stats()["rows"] == 0, what="outbox drained")
        assert store.seqs("dev-a") == list(range(1, 3001))
        assert store.gaps("dev-a") == []
        assert store.rejections() == {}
        assert publisher.published_events == 3000
        status = store.status("dev-a")
        assert status is not None and status["state"] == "online"
        assert status["boot_epoch"] == outbox.boot_epoch
    finally:
        publisher.stop()
        outbox.close()
    wait_until(lambda: (store.status("dev-a") or {}).get("state") == "offline",
               what="explicit offline status")
    assert store.status("dev-a")["reason"] == "shutdown"  # type: ignore[index]
    store.stop()


def test_broker_stopped_and_restarted_mid_stream(tmp_path: Path, topic_root: str,
                                                 private_broker: Mosquitto,
                                                 fault_record: Any) -> None:
    store = FleetSide(tmp_path, topic_root, port=private_broker.port).start()
    outbox, publisher = pipeline(tmp_path, "dev-b", private_broker.port, topic_root,
                                 max_inflight=5)
    total = 6000
    stop_feeding = threading.Event()

    def feed() -> None:
        for i in range(total):
            outbox.record(request_event(i))
            if i % 50 == 0:
                time.sleep(0.01)  # a stream over a few seconds, not one burst
        stop_feeding.set()

    feeder = threading.Thread(target=feed)
    try:
        feeder.start()
        wait_until(lambda: store.event_count("dev-b") > 500, what="first events")
        private_broker.stop()
        wait_until(lambda: not publisher.connected.is_set(), what="publisher notices")
        # The fleet still commits what it received before the broker went: wait until
        # its count holds still, then nothing more may arrive while the broker is down.
        during, end = -1, time.monotonic() + 30
        while (now := store.event_count("dev-b")) != during:
            assert time.monotonic() < end, "the fleet kept storing with the broker down"
            during = now
            time.sleep(0.5)
        time.sleep(2.0)  # events keep coming into the outbox while the broker is down
        assert store.event_count("dev-b") == during
        private_broker.start()
        feeder.join()
        wait_until(lambda: store.event_count("dev-b") == total, timeout=60,
                   what=f"all {total} events")
        wait_until(lambda: outbox.stats()["rows"] == 0, what="outbox drained")
        fault_record("broker outage mid-stream (stopped, restarted)", produced=total,
                     stored=store.event_count("dev-b"))
        assert during < total, "the outage must happen mid-stream"
        assert store.seqs("dev-b") == list(range(1, total + 1))
        assert store.gaps("dev-b") == []
        assert publisher.connects >= 2
        # Nothing is stored twice (the key forbids it) and nothing is missing.
        assert store.event_count("dev-b") == total
    finally:
        stop_feeding.wait(30)
        publisher.stop()
        outbox.close()
        store.stop()


def test_failing_puback_keeps_the_rows(tmp_path: Path, topic_root: str,
                                       private_broker: Mosquitto) -> None:
    """Mosquitto answers an ACL-denied QoS 1 publish with PUBACK 0x87; paho still calls it
    published. The rows must stay until the broker accepts them."""
    private_broker.write_config(acl=f"topic readwrite {topic_root}/devices/+/status\n"
                                    f"topic read {topic_root}/devices/+/telemetry\n")
    private_broker.reload()
    time.sleep(0.3)
    store = FleetSide(tmp_path, topic_root, port=private_broker.port).start()
    outbox, publisher = pipeline(tmp_path, "dev-c", private_broker.port, topic_root)
    try:
        for i in range(500):
            outbox.record(request_event(i))
        wait_until(lambda: publisher.failed_pubacks[0x87] >= 3, what="denied PUBACKs")
        outbox.flush()
        assert outbox.stats()["rows"] == 500
        assert publisher.published_events == 0
        assert store.event_count("dev-c") == 0
        # Allow the topic: the same rows go through, once each.
        private_broker.write_config()
        private_broker.reload()
        wait_until(lambda: store.event_count("dev-c") == 500, what="events after the ACL fix")
        wait_until(lambda: outbox.stats()["rows"] == 0, what="outbox drained")
        assert store.seqs("dev-c") == list(range(1, 501))
        assert publisher.published_events == 500
    finally:
        private_broker.write_config()
        private_broker.reload()
        publisher.stop()
        outbox.close()
        store.stop()


def test_a_stale_retained_will_is_replaced_by_a_new_birth(tmp_path: Path, topic_root: str) -> None:
    """A Will of an older start that lands after our birth (retained) is answered with a
    fresh birth, so even a consumer that only sees the retained message sees the truth."""
    outbox, publisher = pipeline(tmp_path, "dev-w", 1883, topic_root)
    try:
        wait_until(lambda: publisher.births == 1, what="birth")
        stale = StatusPayload(device_id="dev-w", state="offline", boot_epoch=outbox.boot_epoch - 1,
                              reason="will", ts=time.time())
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.connect("127.0.0.1", 1883)
        c.loop_start()
        topic = device_topic("dev-w", "status", topic_root)
        c.publish(topic, stale.model_dump_json(), qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: publisher.births == 2, what="re-birth")
        c.loop_stop()
        c.disconnect()
        # A newcomer sees only the retained message: it must be the new start's birth.
        store = FleetSide(tmp_path, topic_root, db="fresh.db").start()
        fresh = store
        wait_until(lambda: store.status("dev-w") is not None, what="retained status")
        status = store.status("dev-w")
        assert status is not None
        assert (status["state"], status["boot_epoch"]) == ("online", outbox.boot_epoch)
        fresh.stop()
    finally:
        publisher.stop()
        outbox.close()
