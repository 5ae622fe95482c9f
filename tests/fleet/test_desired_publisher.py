"""Desired state leaves the tick: stored, queued, acknowledged by the broker (PUBACK by
message id), retried — against a real private Mosquitto that is stopped, continued,
restarted and made to refuse, on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.mqtt import MqttConfig, make_client
from quantfleet.agent.update.signing import generate_keypair, load_private_key
from quantfleet.agent.wire import DesiredPayload, DeviceStatePayload, StatusPayload
from quantfleet.fleet import commands
from quantfleet.fleet.cli import cli
from quantfleet.fleet.desired import DesiredPublisher, DesiredState
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.spec import RolloutSpec
from quantfleet.fleet.store import Store
from quantfleet.models.catalog import Catalog, Precision, VariantEntry
from tests.support import Mosquitto

from .test_service import make_fleet

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto is not installed")

BASE, CANDIDATE = "tiny-Q8_0", "tiny-Q4_K_M"


def models_dir(path: Path) -> Path:
    """A catalog of stand-in files: desired state needs names, sizes and digests only."""
    catalog = Catalog(path)
    for name in (BASE, CANDIDATE):
        data = f"stand-in for {name}\n".encode()
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{name}.gguf").write_bytes(data)
        catalog.doc.variants[name] = VariantEntry(
            name=name, source="tiny", backend="llama.cpp", format="gguf",
            precision=Precision(label=name.split("-", 1)[1], tensor_types={},
                                bits_per_weight=8.0),
            file=f"{name}.gguf", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    catalog.save()
    return path


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@dataclass
class Side:
    """The fleet's side of the wire: a store, a paho client, a DesiredState; and a
    device-side subscriber that records every desired message it sees."""

    broker: Mosquitto
    store: Store
    root: str
    desired: DesiredState
    client: mqtt.Client
    seen: list[DesiredPayload] = field(default_factory=list)
    stopped: bool = False

    def sigstop(self) -> None:
        assert self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        if self.stopped and self.broker.proc is not None:
            self.broker.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def acknowledged(self) -> int:
        return int(self.desired.status()["acknowledged"])


def connected_client(url_port: int, name: str) -> mqtt.Client:
    client: mqtt.Client = make_client(MqttConfig(broker=f"mqtt://127.0.0.1:{url_port}"),
                                      f"{name}-{uuid.uuid4().hex[:6]}")
    client.reconnect_delay_set(1, 2)  # a restarted broker is found within seconds
    client.connect_async("127.0.0.1", url_port)
    client.loop_start()
    return client


@pytest.fixture
def side(tmp_path: Path, store_url: str) -> Iterator[Side]:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    store = Store(store_url)
    key, _ = generate_keypair(tmp_path / "keys")
    root = f"qftest/{uuid.uuid4().hex[:10]}/v1"
    client = connected_client(broker.port, "fleet")
    publisher = DesiredPublisher(client, root, latest=store.desired, backoff_s=(0.2, 1.0))
    desired = DesiredState(store, client, load_private_key(key), models_dir(tmp_path / "m"),
                           "http://fleet.local", topic_root=root, publisher=publisher).start()
    s = Side(broker, store, root, desired, client)
    try:
        wait_for(client.is_connected, 10, "the fleet's client did not connect")
        yield s
    finally:
        s.sigcont()  # a stopped broker cannot act on SIGTERM
        desired.stop()
        client.disconnect()
        client.loop_stop()
        broker.stop()
        store.close()


@pytest.fixture
def device(side: Side) -> Iterator[mqtt.Client]:
    """Subscribed to every device's desired state; what arrives lands in ``side.seen``."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(1, 2)
    subscribed = threading.Event()

    def on_message(cl: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            side.seen.append(DesiredPayload.model_validate_json(msg.payload))

    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{side.root}/devices/+/desired", 1)
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect_async("127.0.0.1", side.broker.port)
    c.loop_start()
    try:
        assert subscribed.wait(10)
        yield c
    finally:
        c.disconnect()
        c.loop_stop()


def fleet_of(store: Store, n: int) -> None:
    """``n`` online devices of cohort region=eu on the baseline, in two transactions."""
    now = time.time()
    ids = [f"d{i:04d}" for i in range(n)]
    store.apply_statuses([StatusPayload(device_id=d, state="online", boot_epoch=1,
                                        reason="birth", ts=now, labels={"region": "eu"})
                          for d in ids])
    store.apply_states([DeviceStatePayload(device_id=d, boot_epoch=1, variant=BASE,
                                           update_state="healthy", ts=now) for d in ids])


def engine_over(side: Side) -> RolloutEngine:
    def assign(ids: Sequence[str], variant: str, rollout_id: str) -> None:
        side.desired.set_variant(ids, variant, rollout_id=rollout_id, actor="rollout")

    return RolloutEngine(side.store, assign)


def test_a_tick_assigning_1000_devices_does_not_wait_for_the_broker(
        side: Side, device: mqtt.Client, store_url: str) -> None:
    fleet_of(side.store, 1000)
    engine = engine_over(side)
    engine.create(RolloutSpec.model_validate({
        "name": "r1", "cohort": "region=eu", "from": BASE, "to": CANDIDATE,
        "steps": ["100%"], "holdback": 0, "max_parallel_downloads": 1000}))
    side.sigstop()  # connected, and nothing will be acknowledged
    started = time.perf_counter()
    engine.tick()
    took = time.perf_counter() - started
    print(f"\ntick assigning 1000 devices, broker stopped ({store_url.split(':')[0]}): "
          f"{took:.2f} s")
    members = engine.members("r1")
    assert len(members) == 1000 and {m["outcome"] for m in members} == {"pending"}
    assert engine.get("r1")["phase"] == "waiting"
    assert {(p.variant, p.revision) for p in side.store.desired()} == {(CANDIDATE, 1)}
    assert side.acknowledged() == 0
    # The old code waited up to 10 s for each device's PUBACK in turn (10,000 s here).
    # What is left is the store's own cost of the desired state: one commit a device, the
    # revision with its desired.set record (two commits, 0.5-0.8 ms on SQLite and 2-9 ms
    # on PostgreSQL with fsync here, when they were separate); 30 ms is a wide margin.
    assert took < 1000 * 0.030, took

    # Stored but not acknowledged is not lost: the next ticks assign nobody again.
    for _ in range(3):
        engine.tick()
    assert not [a for a in side.store.audit_log("rollout:r1")
                if a["action"] == "rollout.assign" and a["evidence"].get("resumed")]
    assert {p.revision for p in side.store.desired()} == {1}

    side.sigcont()
    assert side.desired.wait_acknowledged(None, 60) == []
    assert side.acknowledged() == 1000
    wait_for(lambda: len({p.device_id for p in side.seen}) == 1000, 30, "retained")
    assert {p.variant for p in side.seen} == {CANDIDATE}


def test_a_publish_while_the_broker_is_down_is_acknowledged_when_it_is_back(
        side: Side, device: mqtt.Client) -> None:
    [first] = side.desired.set_variant(["dev-1"], BASE)
    assert side.desired.wait_acknowledged([first], 10) == []
    side.broker.stop()  # SIGTERM: its retained messages are saved
    wait_for(lambda: not side.client.is_connected(), 10, "the client saw no disconnect")

    started = time.perf_counter()
    sent = side.desired.set_variant(["dev-1", "dev-2"], CANDIDATE)
    assert time.perf_counter() - started < 1  # stored and queued, nothing waited for
    assert [(p.device_id, p.revision) for p in sent] == [("dev-1", 2), ("dev-2", 1)]
    pending = side.desired.wait_acknowledged(sent, 0.5)
    assert {(d.device_id, d.state, d.acknowledged) for d in pending} == {
        ("dev-1", "queued", False), ("dev-2", "queued", False)}
    status = side.desired.status()
    assert not status["connected"] and status["queued"] == 2
    assert status["oldest_unacknowledged_s"] is not None

    side.broker.start()  # the same port, the same persistence
    assert side.desired.wait_acknowledged(sent, 30) == []
    wait_for(lambda: {(p.device_id, p.revision) for p in side.seen} >= {
        ("dev-1", 2), ("dev-2", 1)}, 10, f"retained after the restart: {side.seen}")
    assert [d.attempts for d in side.desired.publisher.deliveries()] == [1, 1]


def test_a_refused_publish_is_retried_until_the_broker_accepts_it(
        side: Side, device: mqtt.Client) -> None:
    # Anonymous clients may read the fleet's topics and write none: PUBACK 0x87.
    side.broker.write_config(acl=f"topic read {side.root}/#\n")
    side.broker.reload()
    time.sleep(0.5)
    [p] = side.desired.set_variant(["dev-1"], CANDIDATE)
    [refused] = side.desired.wait_acknowledged([p], 10)  # returns at the refusal
    assert refused.refused and "Not authorized" in refused.error, refused
    wait_for(lambda: side.desired.publisher.deliveries()[0].attempts >= 3, 10,
             "retried with backoff")
    assert not side.seen

    side.broker.write_config(acl=f"topic readwrite {side.root}/#\n")
    side.broker.reload()
    wait_for(lambda: side.acknowledged() == 1, 15, f"acknowledged: {side.desired.status()}")
    [d] = side.desired.publisher.deliveries()
    assert d.acknowledged and d.error == "" and d.attempts >= 4
    wait_for(lambda: [(x.device_id, x.revision) for x in side.seen] == [("dev-1", 1)], 10,
             "delivered once accepted")


def test_a_newer_revision_never_overtakes_an_older_one(
        side: Side, device: mqtt.Client) -> None:
    side.sigstop()
    side.desired.set_variant(["dev-1"], CANDIDATE)  # with the broker, unacknowledged
    side.desired.set_variant(["dev-1"], BASE)  # waits for the first one's PUBACK
    assert side.desired.status()["sent"] == 0 and side.desired.status()["queued"] == 1
    side.sigcont()
    assert side.desired.wait_acknowledged(None, 20) == []
    wait_for(lambda: len(side.seen) == 2, 10, f"both revisions: {side.seen}")
    assert [(p.revision, p.variant) for p in side.seen] == [(1, CANDIDATE), (2, BASE)]
    # What a device that connects now finds: the newest.
    late: list[DesiredPayload] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: late.append(DesiredPayload.model_validate_json(m.payload))
    c.on_connect = lambda cl, u, f, rc, pr: cl.subscribe(f"{side.root}/devices/dev-1/desired")
    c.connect("127.0.0.1", side.broker.port)
    c.loop_start()
    try:
        wait_for(lambda: bool(late), 10, "the retained message")
        assert late[0].revision == 2
    finally:
        c.disconnect()
        c.loop_stop()


def test_stored_but_never_sent_before_a_crash_goes_out_at_the_next_start(
        side: Side, device: mqtt.Client, tmp_path: Path) -> None:
    """A fleet that stores a revision and dies before it is sent: the store has it, the
    engine does not assign it again (stored is sent), and the next start's republish
    delivers it."""
    fleet_of(side.store, 4)
    nowhere = connected_client(1, "crashed")  # never connects
    try:
        crashed = DesiredState(side.store, nowhere, side.desired.key, side.desired.models_dir,
                               "http://fleet.local", topic_root=side.root)

        def assign(ids: Sequence[str], variant: str, rollout_id: str) -> None:
            crashed.set_variant(ids, variant, rollout_id=rollout_id, actor="rollout")

        engine = RolloutEngine(side.store, assign)
        engine.create(RolloutSpec.model_validate({
            "name": "r1", "cohort": "region=eu", "from": BASE, "to": CANDIDATE,
            "steps": ["100%"], "holdback": 0}))
        engine.tick()
        assert crashed.status()["queued"] == 4 and not side.seen
    finally:
        nowhere.loop_stop()  # the crash: nothing of it survives but the store
        nowhere.disconnect()
    engine.assign = lambda *a: pytest.fail("stored desired state is not lost")
    engine.tick()

    assert side.desired.republish() == 4  # the next start
    assert side.desired.wait_acknowledged(None, 10) == []
    wait_for(lambda: len({p.device_id for p in side.seen}) == 4, 10, "republished")
    assert {p.variant for p in side.seen} == {CANDIDATE}


def test_desired_set_says_what_the_broker_acknowledged(
        side: Side, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str) -> None:
    fleet, root = make_fleet(tmp_path / "cli", store_url, models_dir(tmp_path / "m"),
                             broker=f"mqtt://127.0.0.1:{side.broker.port}")
    cfg = str(fleet.config)
    monkeypatch.setattr(commands, "ACK_TIMEOUT_S", 1.0)

    def desired_set(*devices: str) -> tuple[int, str]:
        args = ["desired", "set", "--config", cfg, "--variant", "Q8_0"]
        for d in devices:
            args += ["--device", d]
        r = CliRunner().invoke(cli, args)
        return r.exit_code, r.output

    assert desired_set("dev-ok") == (0, "dev-ok: tiny-Q8_0 (revision 1)\n")
    # The broker lets the fleet write one device's desired state and not another's.
    side.broker.write_config(acl=f"topic readwrite {root}/devices/dev-ok/desired\n"
                                 f"topic read {root}/#\n")
    side.broker.reload()
    time.sleep(0.5)
    code, out = desired_set("dev-ok", "dev-no")
    assert code == 1, out
    assert "dev-ok: tiny-Q8_0 (revision 2)" in out
    assert "the broker refused desired state for dev-no: Not authorized (stored as " \
           "revision 1)" in out, out
    # A broker that accepts the connection and never answers: nothing acknowledged.
    side.sigstop()
    code, out = desired_set("dev-ok")
    side.sigcont()
    assert code == 1, out
    assert "desired state for dev-ok was not acknowledged by the broker within 1 s " \
           "(stored as revision 3; it is re-published when the fleet restarts)" in out, out
    assert [p.revision for p in side.store.desired(["dev-ok"])] == [3]


def test_the_fleet_service_shows_what_is_acknowledged(
        side: Side, tmp_path: Path, store_url: str) -> None:
    """``quantfleet serve``: /healthz counts the deliveries, /v1/desired lists each stored
    revision with whether the broker acknowledged it."""
    import httpx

    fleet, _ = make_fleet(tmp_path / "svc", store_url, models_dir(tmp_path / "m"),
                             broker=f"mqtt://127.0.0.1:{side.broker.port}")
    side.store.put_desired("dev-1", lambda rev: DesiredPayload(
        device_id="dev-1", revision=rev, variant=BASE, backend="llama.cpp",
        sha256="0" * 64, size_bytes=1, url="http://fleet/x", signature="s", issued_at=0.0,
        key_id="0" * 16))
    fleet.start()
    try:
        def health() -> dict[str, Any]:
            body: dict[str, Any] = httpx.get(f"{fleet.url}/healthz", timeout=5).json()
            return dict(body["desired"])

        wait_for(lambda: health()["acknowledged"] == 1, 10, "republished at start")
        assert health()["unacknowledged"] == [] and health()["connected"]
        [row] = httpx.get(f"{fleet.url}/v1/desired", timeout=5).json()["desired"]
        assert (row["device_id"], row["revision"], row["acknowledged"]) == ("dev-1", 1, True)
        assert row["delivery"]["attempts"] == 1
    finally:
        fleet.stop()


def test_rollout_abort_says_which_canaries_the_broker_did_not_acknowledge(
        side: Side, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str) -> None:
    from quantfleet.fleet.rollouts import cli as rollout_cli

    fleet, _ = make_fleet(tmp_path / "cli", store_url, models_dir(tmp_path / "m"),
                          broker=f"mqtt://127.0.0.1:{side.broker.port}")
    monkeypatch.setattr(rollout_cli, "ACK_TIMEOUT_S", 1.0)
    fleet_of(side.store, 2)
    engine = engine_over(side)
    engine.create(RolloutSpec.model_validate({
        "name": "r1", "cohort": "region=eu", "from": BASE, "to": CANDIDATE,
        "steps": ["100%"], "holdback": 0}))
    engine.tick()
    side.sigstop()  # the operator's command connects, and nothing is acknowledged
    result = CliRunner().invoke(cli, ["rollout", "abort", "--config", str(fleet.config), "r1"])
    side.sigcont()
    assert result.exit_code == 0, result.output
    assert result.stdout == "rollout r1: aborted\n"  # the rollback is recorded either way
    assert result.stderr.splitlines() == [
        f"desired state for d000{i} was not acknowledged by the broker within 1 s (stored "
        "as revision 2; it is re-published when the fleet restarts)" for i in range(2)]
    assert {(p.variant, p.revision) for p in side.store.desired()} == {(BASE, 2)}
