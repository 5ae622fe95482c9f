"""packaging/mosquitto: a device can publish only as itself and read only its own desired
state; the fleet reads everything (also on a shared subscription) and writes desired."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import Mosquitto

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None,
                                reason="mosquitto_passwd is not installed")
USERS = {"dev-a": "pa", "dev-b": "pb", "fleet": "pf"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    passwd = tmp_path / "passwd"
    for user, password in USERS.items():
        flags = ["-b"] if passwd.exists() else ["-c", "-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwd), user, password], check=True)
    acl = tmp_path / "acl"
    shutil.copy(PACKAGING / "quantfleet.acl", acl)
    # The packaged settings that matter here, on a free loopback port.
    b.conf.write_text(f"listener {b.port} 127.0.0.1\nallow_anonymous false\n"
                      f"password_file {passwd}\nacl_file {acl}\nmax_queued_messages 0\n"
                      + ("user root\n" if os.geteuid() == 0 else ""))
    b.start()
    yield b
    b.stop()


def client(broker: Mosquitto, user: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, USERS[user])
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert connected.wait(5)
    return c


def subscribe(c: mqtt.Client, topic: str) -> list[object]:
    done = threading.Event()
    codes: list[object] = []

    def on_subscribe(cl, u, mid, reasons, props):  # type: ignore[no-untyped-def]
        codes.extend(reasons)
        done.set()

    c.on_subscribe = on_subscribe
    c.subscribe(topic, qos=1)
    assert done.wait(5)
    return codes


def test_a_device_cannot_publish_as_another(broker: Mosquitto) -> None:
    fleet, dev_a = client(broker, "fleet"), client(broker, "dev-a")
    got: list[str] = []
    fleet.on_message = lambda c, u, m: got.append(m.topic)
    codes = subscribe(fleet, "$share/fleet/quantfleet/v1/devices/+/telemetry")
    assert not any(getattr(r, "is_failure", False) for r in codes)

    acks: dict[int, object] = {}
    dev_a.on_publish = lambda c, u, mid, rc, props: acks.__setitem__(mid, rc)
    own = dev_a.publish("quantfleet/v1/devices/dev-a/telemetry", b"{}", qos=1)
    forged = dev_a.publish("quantfleet/v1/devices/dev-b/telemetry", b"{}", qos=1)
    own.wait_for_publish(5)
    forged.wait_for_publish(5)
    time.sleep(0.5)
    assert got == ["quantfleet/v1/devices/dev-a/telemetry"]
    # MQTT 5: the broker answers the forged publish with 0x87 Not authorized
    # (paho still calls it "published": the reason code is what tells).
    assert not acks[own.mid].is_failure  # type: ignore[attr-defined]
    assert acks[forged.mid].is_failure and acks[forged.mid].value == 0x87  # type: ignore[attr-defined]
    for c in (fleet, dev_a):
        c.disconnect()
        c.loop_stop()


def test_a_device_reads_only_its_own_desired_state(broker: Mosquitto) -> None:
    fleet, dev_a = client(broker, "fleet"), client(broker, "dev-a")
    own = subscribe(dev_a, "quantfleet/v1/devices/dev-a/desired")
    assert not own[0].is_failure  # type: ignore[attr-defined]
    # Mosquitto 2 grants a subscription the ACL forbids and then delivers nothing on
    # it, so what counts is what arrives.
    subscribe(dev_a, "quantfleet/v1/devices/dev-b/desired")
    got: list[str] = []
    dev_a.on_message = lambda c, u, m: got.append(m.topic)
    for dev in ("dev-a", "dev-b"):
        fleet.publish(f"quantfleet/v1/devices/{dev}/desired", b"{}", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert got == ["quantfleet/v1/devices/dev-a/desired"]
    # A device cannot write desired state, not even its own.
    dev_b = client(broker, "dev-b")
    watch: list[str] = []
    fleet.on_message = lambda c, u, m: watch.append(m.topic)
    subscribe(fleet, "quantfleet/v1/devices/+/desired")
    watch.clear()  # retained messages from above
    dev_b.publish("quantfleet/v1/devices/dev-b/desired", b"{}", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert watch == []
    for c in (fleet, dev_a, dev_b):
        c.disconnect()
        c.loop_stop()


def test_a_device_reads_its_own_status_and_no_one_elses(broker: Mosquitto) -> None:
    dev_a, dev_b = client(broker, "dev-a"), client(broker, "dev-b")
    for dev, c in (("dev-a", dev_a), ("dev-b", dev_b)):
        c.publish(f"quantfleet/v1/devices/{dev}/status", dev.encode(), qos=1,
                  retain=True).wait_for_publish(5)
    got: list[str] = []
    dev_a.on_message = lambda c, u, m: got.append(m.topic)
    subscribe(dev_a, "quantfleet/v1/devices/dev-a/status")
    subscribe(dev_a, "quantfleet/v1/devices/dev-b/status")
    time.sleep(0.5)
    assert got == ["quantfleet/v1/devices/dev-a/status"]
    for c in (dev_a, dev_b):
        c.disconnect()
        c.loop_stop()
