"""PUBACK 0x10 *No matching subscribers* is not a delivery (issue 14, #9): the publisher
keeps the rows and retries, counted, until a subscriber takes them — shown on a private
mosquitto with persistence on, as the packaged config has it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.ingest import FleetIngest
from quantfleet.fleet.store import Store

from .conftest import Mosquitto, wait_until
from .helpers import FleetSide, pipeline, request_event


def test_no_matching_subscribers_keeps_the_rows_until_the_fleet_subscribes(
        tmp_path: Path, topic_root: str, private_broker: Mosquitto) -> None:
    """Nobody subscribes to this topic root yet: mosquitto answers every MQTT 5 QoS 1
    publish with 0x10, and before this fix the rows were deleted and lost."""
    outbox, publisher = pipeline(tmp_path, "dev-n", private_broker.port, topic_root)
    try:
        for i in range(200):
            outbox.record(request_event(i))
        wait_until(lambda: publisher.failed_pubacks[0x10] >= 2, what="PUBACKs 0x10")
        assert outbox.stats()["rows"] == 200 and publisher.published_events == 0
        assert publisher.stats()["failed_pubacks"]["0x10"] >= 2
        fleet = FleetSide(tmp_path, topic_root, port=private_broker.port).start()
        try:
            wait_until(lambda: fleet.event_count("dev-n") == 200, what="all 200 stored")
            wait_until(lambda: outbox.stats()["rows"] == 0, what="outbox drained")
            assert fleet.gaps("dev-n") == []
        finally:
            fleet.stop()
    finally:
        publisher.stop()
        outbox.close()


def test_a_device_back_before_the_fleet_after_a_broker_restart_loses_nothing(
        tmp_path: Path, topic_root: str, private_broker: Mosquitto,
        fault_record: Any) -> None:
    """The fleet's persistent session subscribes with ``$share``; mosquitto (persistence on)
    restores the session's plain subscriptions after a restart, not the shared one. The
    device reconnects first and publishes into no subscriber (0x10); the fleet comes back
    on its old session — ``session present`` — and subscribes again in ``on_connect``."""
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    cfg = MqttConfig(broker=f"mqtt://127.0.0.1:{private_broker.port}", topic_root=topic_root)
    client_id = f"fleet-{uuid.uuid4().hex[:8]}"

    def fleet() -> FleetIngest:
        return FleetIngest(store, cfg, client_id=client_id, share_group="g",
                           session_expiry_s=3600).start()

    ingest = fleet()
    outbox, publisher = pipeline(tmp_path, "dev-r", private_broker.port, topic_root)
    restarted = False
    try:
        for i in range(100):
            outbox.record(request_event(i))
        wait_until(lambda: store.event_count() == 100, what="first 100 stored")
        ingest.stop()  # the fleet is down (its session kept) when the broker restarts
        private_broker.stop()
        private_broker.start()
        restarted = True
        wait_until(publisher.connected.is_set, what="device back first")
        for i in range(100, 300):
            outbox.record(request_event(i))
        wait_until(lambda: publisher.failed_pubacks[0x10] >= 1, what="PUBACK 0x10")
        assert outbox.stats()["rows"] > 0  # kept, not deleted
        ingest = fleet()
        wait_until(lambda: store.event_count() == 300, timeout=60, what="all 300 stored")
        wait_until(lambda: outbox.stats()["rows"] == 0, what="outbox drained")
        fault_record("broker restart, device back before the fleet (PUBACK 0x10)",
                     produced=300, stored=store.event_count())
        assert store.seq_gaps() == []
    finally:
        publisher.stop()
        outbox.close()
        ingest.stop()
        store.close()
        if not restarted and private_broker.proc is None:
            private_broker.start()
