"""packaging/mosquitto: with the dynamic security plugin, a device publishes only as
itself, subscribes only to its own status and desired state (refused at SUBSCRIBE,
not silently starved), cannot join the fleet's shared telemetry subscription, and
cannot connect with the fleet's client id or another device's; the fleet reads
everything and writes desired state.

Every test runs a private broker from the packaged quantfleet.conf (its listener on a
free port, its paths under tmp_path), whose users come from the real commands:
``quantfleet broker init`` (admin and fleet) and ``quantfleet devices enroll`` (dev-a,
dev-b) through the plugin's control topic. The last test runs the real agent
(telemetry process and update channel) and the real ``FleetIngest`` through it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from quantfleet.fleet.cli import cli
from tests.support import Mosquitto

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
ROOT = "quantfleet/v1/devices"


def _packaged_plugin() -> str:
    line = next(x for x in (PACKAGING / "quantfleet.conf").read_text().splitlines()
                if x.startswith("plugin "))
    return line.split(" ", 1)[1]


pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or not Path(_packaged_plugin()).exists(),
    reason="mosquitto or its dynamic security plugin is not installed")


def packaged_config(b: Mosquitto, dynsec_file: Path) -> str:
    """quantfleet.conf as shipped, but on a free loopback port, without the TLS
    listener (no certificates here), with its files under the test's folder."""
    out, replaced = [], set()
    for line in (PACKAGING / "quantfleet.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if line == "listener 1883 127.0.0.1":
            line, _ = f"listener {b.port} 127.0.0.1", replaced.add(key)
        elif key in ("listener", "certfile", "keyfile"):
            continue
        elif key in ("plugin_opt_config_file", "persistence_location"):
            line = f"{key} {dynsec_file if key.startswith('plugin') else str(b.dir) + '/'}"
            replaced.add(key)
        out.append(line)
    assert replaced == {"listener", "plugin_opt_config_file", "persistence_location"}
    out += [f"log_dest file {b.dir}/mosquitto.log", "log_type all"]
    if os.geteuid() == 0:
        out.append("user root")
    return "\n".join(out) + "\n"


@dataclass
class Broker:
    mosquitto: Mosquitto
    fleet_config: Path
    admin_password_file: Path
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.mosquitto.port

    def enroll(self, device: str, *extra: str) -> Any:
        return CliRunner().invoke(cli, [
            "devices", "enroll", device, "--config", str(self.fleet_config),
            "--admin-password-file", str(self.admin_password_file), *extra])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Mosquitto(tmp_path / "broker")
    etc = tmp_path / "etc"
    init = CliRunner().invoke(cli, ["broker", "init", "--dir", str(etc)])
    assert init.exit_code == 0, init.output
    b.conf.write_text(packaged_config(b, etc / "dynamic-security.json"))
    fleet_config = tmp_path / "fleet.toml"
    fleet_config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "fleet.db"}"\n'
        f'[mqtt]\nbroker = "mqtt://127.0.0.1:{b.port}"\nusername = "fleet"\n'
        f'password_file = "{etc / "fleet.mqtt-password"}"\n')
    b.start()
    out = Broker(b, fleet_config, etc / "admin.mqtt-password",
                 {"fleet": (etc / "fleet.mqtt-password").read_text().strip()})
    try:
        for dev in ("dev-a", "dev-b"):
            result = out.enroll(dev, "--json")
            assert result.exit_code == 0, result.output
            # The last line: the hook's note about the artifact credential may precede it.
            doc = json.loads(result.output.strip().splitlines()[-1])
            out.passwords[dev] = out.passwords[f"{dev}:update"] = doc["password"]
        yield out
    finally:
        b.stop()


class Session:
    """A paho session that records its CONNACK, SUBACKs, PUBACKs, messages, disconnects."""

    def __init__(self, broker: Broker, user: str, client_id: str, *,
                 clean_start: bool = True, session_expiry_s: int | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, broker.passwords[user])
        self.connack: Any = None
        self.session_present: bool | None = None
        self.disconnects: list[Any] = []
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, Any] = {}
        self._connected = threading.Event()
        self._subacks: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = lambda cl, u, flags, rc, props: self.disconnects.append(rc)
        c.on_message = self._on_message
        c.on_subscribe = lambda cl, u, mid, rcs, props: self._subacks.__setitem__(mid, rcs)
        c.on_publish = lambda cl, u, mid, rc, props: self.acks.__setitem__(mid, rc)
        props = None
        if session_expiry_s is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry_s
        c.connect("127.0.0.1", broker.port, clean_start=clean_start, properties=props)
        c.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    @property
    def refused(self) -> bool:
        return bool(self.connack.is_failure)

    def subscribe(self, topic: str) -> Any:
        """The SUBACK's reason code for ``topic``."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + 5
        while mid not in self._subacks:
            assert time.monotonic() < deadline, f"no SUBACK for {topic}"
            time.sleep(0.01)
        return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> Any:
        """The PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.acks[info.mid]

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(cond: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


NOT_AUTHORIZED = 0x87


def test_a_device_cannot_publish_as_another(broker: Broker) -> None:
    fleet = Session(broker, "fleet", "quantfleet-fleet")
    dev_a = Session(broker, "dev-a", "qf-dev-a")
    assert not fleet.subscribe(f"$share/quantfleet/{ROOT}/+/telemetry").is_failure
    own = dev_a.publish(f"{ROOT}/dev-a/telemetry")
    forged = dev_a.publish(f"{ROOT}/dev-b/telemetry")
    time.sleep(0.5)
    assert fleet.topics() == [f"{ROOT}/dev-a/telemetry"]
    # MQTT 5: the broker answers the forged publish with 0x87 Not authorized
    # (paho still calls it "published": the reason code is what tells).
    assert not own.is_failure
    assert forged.is_failure and forged.value == NOT_AUTHORIZED
    for s in (fleet, dev_a):
        s.close()


def test_a_device_reads_only_its_own_desired_state(broker: Broker) -> None:
    fleet = Session(broker, "fleet", "quantfleet-fleet-pub-test")
    # The agent's update channel: its own user, bound to its own client id.
    dev_a = Session(broker, "dev-a:update", "qf-dev-a-update")
    assert not dev_a.subscribe(f"{ROOT}/dev-a/desired").is_failure
    # Refused at SUBSCRIBE, not granted and then starved.
    refused = dev_a.subscribe(f"{ROOT}/dev-b/desired")
    assert refused.is_failure and refused.value == NOT_AUTHORIZED
    assert dev_a.subscribe(f"{ROOT}/+/desired").is_failure
    for dev in ("dev-a", "dev-b"):
        assert not fleet.publish(f"{ROOT}/{dev}/desired", retain=True).is_failure
    wait_for(lambda: dev_a.topics(), what="dev-a's desired state")
    time.sleep(0.3)
    assert dev_a.topics() == [f"{ROOT}/dev-a/desired"]
    # A device cannot write desired state, not even its own.
    dev_b = Session(broker, "dev-b:update", "qf-dev-b-update")
    assert not fleet.subscribe(f"{ROOT}/+/desired").is_failure
    wait_for(lambda: len(fleet.topics()) == 2, what="the retained desired states")
    rc = dev_b.publish(f"{ROOT}/dev-b/desired")
    assert rc.is_failure and rc.value == NOT_AUTHORIZED
    time.sleep(0.3)
    assert len(fleet.topics()) == 2
    # Mosquitto 2.0.11 then drops the connection (its log: "Bad socket read/write"),
    # after the PUBACK; the update channel reconnects. Its own state it may publish.
    dev_b.close()
    dev_b = Session(broker, "dev-b:update", "qf-dev-b-update")
    assert not dev_b.publish(f"{ROOT}/dev-b/state").is_failure
    for s in (fleet, dev_a, dev_b):
        s.close()


def test_a_device_reads_its_own_status_and_no_one_elses(broker: Broker) -> None:
    dev_a, dev_b = Session(broker, "dev-a", "qf-dev-a"), Session(broker, "dev-b", "qf-dev-b")
    for dev, s in (("dev-a", dev_a), ("dev-b", dev_b)):
        assert not s.publish(f"{ROOT}/{dev}/status", dev.encode(), retain=True).is_failure
    assert not dev_a.subscribe(f"{ROOT}/dev-a/status").is_failure
    assert dev_a.subscribe(f"{ROOT}/dev-b/status").value == NOT_AUTHORIZED
    wait_for(lambda: dev_a.topics(), what="dev-a's retained status")
    time.sleep(0.3)
    assert dev_a.topics() == [f"{ROOT}/dev-a/status"]
    for s in (dev_a, dev_b):
        s.close()


def test_a_device_cannot_join_the_fleets_shared_telemetry_subscription(broker: Broker) -> None:
    """Issue 14, case 10: with acl_file, 403 of 803 of dev-b's events went to dev-a's
    share of the group and were dropped. Two fleet replicas (one user) share it here."""
    replicas = [Session(broker, "fleet", f"quantfleet-fleet-{i}") for i in (1, 2)]
    topic = f"$share/quantfleet/{ROOT}/+/telemetry"
    for r in replicas:
        assert not r.subscribe(topic).is_failure
    dev_a = Session(broker, "dev-a", "qf-dev-a")
    joined = dev_a.subscribe(topic)
    assert joined.is_failure and joined.value == NOT_AUTHORIZED
    assert dev_a.subscribe(f"{ROOT}/+/telemetry").is_failure
    dev_b = Session(broker, "dev-b", "qf-dev-b")
    n = 803
    for i in range(n):
        dev_b.client.publish(f"{ROOT}/dev-b/telemetry", str(i).encode(), qos=1)
    wait_for(lambda: sum(len(r.messages) for r in replicas) >= n, what="every event")
    time.sleep(0.3)
    got = sorted(int(p) for r in replicas for _, p in r.messages)
    assert got == list(range(n))
    assert all(r.messages for r in replicas), "the group did not split the load"
    assert dev_a.messages == []
    for s in (*replicas, dev_a, dev_b):
        s.close()


def test_a_device_cannot_take_the_fleets_session_nor_another_devices_client_id(
        broker: Broker) -> None:
    fleet = Session(broker, "fleet", "quantfleet-fleet", clean_start=False,
                    session_expiry_s=3600)
    assert not fleet.subscribe(f"$share/quantfleet/{ROOT}/+/telemetry").is_failure
    dev_b = Session(broker, "dev-b", "qf-dev-b")

    # While the fleet is connected, and while it is away with a persistent session
    # that holds dev-b's events: dev-a is refused the fleet's client id either way.
    thief = Session(broker, "dev-a", "quantfleet-fleet", clean_start=False)
    assert thief.refused and thief.connack.value == NOT_AUTHORIZED
    thief.close()
    assert fleet.disconnects == [] and fleet.client.is_connected()
    fleet.close()
    for i in range(50):
        dev_b.publish(f"{ROOT}/dev-b/telemetry", str(i).encode())
    thief = Session(broker, "dev-a", "quantfleet-fleet", clean_start=False)
    assert thief.refused
    thief.close()
    back = Session(broker, "fleet", "quantfleet-fleet", clean_start=False,
                   session_expiry_s=3600)
    assert back.session_present is True
    wait_for(lambda: len(back.messages) >= 50, what="the fleet's queued messages")
    assert sorted(int(p) for _, p in back.messages) == list(range(50))

    # Nor dev-b's client ids: dev-b stays connected and keeps publishing.
    for cid in ("qf-dev-b", "qf-dev-b-update"):
        thief = Session(broker, "dev-a", cid)
        assert thief.refused and thief.connack.value == NOT_AUTHORIZED
        thief.close()
    # Nor its own user with another of its client ids (each user has exactly one).
    thief = Session(broker, "dev-a", "qf-dev-a-update")
    assert thief.refused
    thief.close()
    time.sleep(0.3)
    assert dev_b.disconnects == [] and dev_b.client.is_connected()
    assert not dev_b.publish(f"{ROOT}/dev-b/telemetry", b"after").is_failure
    wait_for(lambda: (f"{ROOT}/dev-b/telemetry", b"after") in back.messages, what="after")
    for s in (back, dev_b):
        s.close()


def test_enroll_refuses_a_second_enrolment_and_ids_that_would_collide(broker: Broker) -> None:
    again = broker.enroll("dev-a")
    assert again.exit_code == 1 and "already exists" in again.output
    assert broker.enroll("dev-a-update").exit_code == 1
    assert "may not end in -update" in broker.enroll("dev-a-update").output
    assert broker.enroll("bad/id").exit_code == 1
    for name in ("fleet", "quantfleet-admin"):  # the fleet's and the admin's users
        taken = broker.enroll(name)
        assert taken.exit_code == 1 and "not a device" in taken.output
    wrong = broker.enroll("dev-c", "--admin-user", "fleet")
    assert wrong.exit_code == 1 and "not enrolled" in wrong.output


def test_enroll_prints_the_password_once_and_the_agent_config(broker: Broker) -> None:
    result = broker.enroll("dev-c")
    assert result.exit_code == 0, result.output
    password = next(line.rsplit(" ", 1)[1] for line in result.output.splitlines()
                    if line.startswith("MQTT password"))
    assert result.output.count(password) == 1
    assert 'update_username = "dev-c:update"' in result.output
    assert "artifact credential (shown once): qfd_" in result.output
    broker.passwords["dev-c"] = password
    s = Session(broker, "dev-c", "qf-dev-c")
    assert not s.refused and not s.publish(f"{ROOT}/dev-c/telemetry").is_failure
    s.close()


def test_rotate_gives_both_users_a_new_password_and_revoke_takes_the_device_off(
        broker: Broker) -> None:
    sessions = [Session(broker, "dev-a", "qf-dev-a"),
                Session(broker, "dev-a:update", "qf-dev-a-update")]
    old = broker.passwords["dev-a"]
    rotated = broker.enroll("dev-a", "--rotate", "--json")
    assert rotated.exit_code == 0, rotated.output
    new = json.loads(rotated.output)["password"]
    assert new != old
    # The plugin disconnects the sessions that logged in with the old password.
    wait_for(lambda: all(s.disconnects for s in sessions), what="the old sessions closed")
    for s in sessions:
        s.close()
    stale = Session(broker, "dev-a", "qf-dev-a")
    assert stale.refused
    stale.close()
    broker.passwords["dev-a"] = broker.passwords["dev-a:update"] = new
    sessions = [Session(broker, "dev-a", "qf-dev-a"),
                Session(broker, "dev-a:update", "qf-dev-a-update")]
    assert not any(s.refused for s in sessions)

    revoked = CliRunner().invoke(cli, [
        "devices", "revoke", "dev-a", "--config", str(broker.fleet_config),
        "--admin-password-file", str(broker.admin_password_file)])
    assert revoked.exit_code == 0, revoked.output
    wait_for(lambda: all(s.disconnects for s in sessions), what="the revoked sessions closed")
    for s in sessions:
        s.close()
    gone = Session(broker, "dev-a", "qf-dev-a")
    assert gone.refused
    gone.close()
    again = CliRunner().invoke(cli, [
        "devices", "revoke", "dev-a", "--config", str(broker.fleet_config),
        "--admin-password-file", str(broker.admin_password_file)])
    assert again.exit_code == 1 and "not revoked" in again.output
    # Revoked means gone: the id can be enrolled afresh (a replaced device).
    assert broker.enroll("dev-a").exit_code == 0


def test_enroll_issues_the_artifact_credential_too(broker: Broker) -> None:
    """One command gives a device everything: its MQTT password and its artifact
    credential, whose hash goes into the fleet's [http.auth] devices."""
    from quantfleet.fleet.auth import token_sha256

    result = broker.enroll("dev-d", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    cred = doc["artifact_credential"]
    assert cred["config_entry"] == {"device_id": "dev-d",
                                    "token_sha256": token_sha256(cred["token"])}
    assert cred["token"] not in cred["toml"] and cred["config_entry"]["token_sha256"] in \
        cred["toml"]
    text = broker.enroll("dev-f")
    assert text.exit_code == 0, text.output
    assert "add to the fleet's [http.auth] devices: {device_id = \"dev-f\"" in text.output


def test_the_real_agent_and_the_real_fleet_work_through_the_packaged_broker(
        broker: Broker, tmp_path: Path) -> None:
    """End to end with enrolled credentials: ``quantfleet-agent telemetry run`` (the
    agent's telemetry process) publishes as dev-a; the fleet's ``FleetService`` (its
    ``FleetIngest`` with the default client id and the ``quantfleet`` share group, its
    desired-state publisher as ``quantfleet-fleet-pub-<random>``, both on the fleet's
    user) stores every event and sends dev-a a signed desired state, which the agent's
    update channel (``StateChannel``: dev-a:update as qf-dev-a-update) receives; the
    channel's state reaches the fleet. Meanwhile dev-b tries to join the fleet's
    group and is refused."""
    from quantfleet.agent.mqtt import MqttConfig
    from quantfleet.agent.update.service import StateChannel
    from quantfleet.agent.update.signing import generate_keypair
    from quantfleet.agent.wire import DesiredPayload, DeviceStatePayload
    from quantfleet.fleet.config import load_fleet_config
    from quantfleet.fleet.service import FleetService

    from .test_desired_publisher import BASE, models_dir

    url = f"mqtt://127.0.0.1:{broker.port}"
    generate_keypair(tmp_path / "keys")
    with broker.fleet_config.open("a") as f:
        f.write(f'[artifacts]\nmodels_dir = "{models_dir(tmp_path / "models")}"\n'
                f'signing_key = "{tmp_path / "keys" / "signing.key"}"\n')
    fleet = FleetService(load_fleet_config(broker.fleet_config)).start()
    store = fleet.store
    intruder = Session(broker, "dev-b", "qf-dev-b")
    assert intruder.subscribe(f"$share/quantfleet/{ROOT}/+/telemetry").value == NOT_AUTHORIZED

    secret = tmp_path / "mqtt-password"
    secret.write_text(broker.passwords["dev-a"] + "\n")
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        '[telemetry]\ndevice_id = "dev-a"\nhealth_interval_s = 0\n'
        f'[telemetry.mqtt]\nbroker = "{url}"\nusername = "dev-a"\n'
        f'update_username = "dev-a:update"\npassword_file = "{secret}"\n'
        f'[telemetry.outbox]\npath = "{tmp_path / "outbox.db"}"\ncommit_interval_s = 0.05\n')
    channel = None
    try:
        run = subprocess.run(
            [sys.executable, "-m", "quantfleet.agent.telemetry", "run", "--config",
             str(agent_toml), "--synthetic-count", "300", "--exit-when-drained", "--json"],
            capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["appended"] == 300 and summary["rows"] == 0
        assert summary["failed_pubacks"] == {}
        wait_for(lambda: store.event_count() >= summary["published_events"], 90,
                 what=f"every published event in the fleet's store "
                      f"({summary['published_events']} published)")
        assert store.event_count() == summary["published_events"]
        assert store.event_count("request") == 300
        row = next(d for d in store.devices() if d["device_id"] == "dev-a")
        assert row["online"] is False  # its clean stop's retained offline/shutdown
        assert fleet.ingest.stats.rejected == {}

        # The update channel, with the agent's own config, and the fleet's real
        # desired-state publisher.
        desired: list[bytes] = []
        mqtt_cfg = MqttConfig(broker=url, username="dev-a", update_username="dev-a:update",
                              password_file=secret)
        channel = StateChannel(mqtt_cfg, "dev-a", desired.append).start()
        wait_for(channel.subscribed.is_set, what="the update channel's subscription")
        # Both fleet clients on the fleet's one user, neither bound to a client id.
        log = broker.mosquitto.log()
        assert re.search(r"as quantfleet-fleet-pub-[0-9a-f]{6} \(.*u'fleet'\)", log)
        assert re.search(r"as quantfleet-fleet \(.*u'fleet'\)", log)
        fleet.desired.set_variant(["dev-a"], BASE)
        wait_for(lambda: desired, what="the desired state")
        got = DesiredPayload.model_validate_json(desired[-1])
        assert (got.device_id, got.variant, got.revision) == ("dev-a", BASE, 1)
        channel.publish(DeviceStatePayload(device_id="dev-a", boot_epoch=summary["boot_epoch"],
                                           variant=BASE, desired_revision=1,
                                           update_state="healthy", ts=time.time()))
        wait_for(lambda: next(d for d in store.devices()
                              if d["device_id"] == "dev-a")["update_state"] == "healthy",
                 what="the device's state in the fleet's store")
    finally:
        if channel is not None:
            channel.stop()
        intruder.close()
        fleet.stop()


def test_a_failing_artifact_credential_leaves_the_broker_credential_shown(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantfleet.fleet import auth

    def issue_device_credential(device_id: str) -> tuple[str, str]:
        raise OSError("the token store is read-only")

    monkeypatch.setattr(auth, "issue_device_credential", issue_device_credential)
    result = broker.enroll("dev-e")
    assert result.exit_code == 1
    assert "MQTT password (shown once" in result.output
    assert "the token store is read-only" in result.output
