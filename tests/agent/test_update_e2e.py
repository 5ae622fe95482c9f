"""Device updates end to end: `quantfleet serve`, real agent processes on real variants,
a private Mosquitto, and the operator's CLI; the fleet serves artifacts only to
devices with their credential ([http.auth]).

Three agents start on Q8_0. The cohort ``cohort=main`` (agent-1, agent-2) is
moved to Q4_K_M while agent-2, on a slow link, is killed mid-download and
resumes; a Q2_K whose pre-flight fails is never activated; a tampered artifact
is refused; agent-3, with a strict soak policy, rolls itself back. Steady
traffic runs against agent-1 and agent-3 throughout and no request fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.agent.wire import DeviceStatePayload
from quantfleet.fleet.auth import issue_device_credential, toml_entry
from quantfleet.fleet.cli import cli
from quantfleet.models.catalog import Catalog
from tests.agent.test_updater import walk
from tests.fleet.test_service import Fleet, make_fleet
from tests.support import Mosquitto, free_port

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto is not installed")

LADDER = ("Q8_0", "Q4_K_M", "Q2_K", "Q4_0")


@dataclass
class AgentProc:
    name: str
    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # its artifact credential

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"agent.{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quantfleet.agent.cli", "serve", "--config",
             str(self.config), "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.name} never ready:\n{self.log()}"
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:]
                         for p in sorted(self.dir.glob("agent.*.log")))

    def active(self) -> str:
        return str(httpx.get(f"{self.url}/healthz", timeout=5).json()["active"])


@dataclass
class StateLog:
    """Every device state the agents publish, as the broker delivers it."""

    states: dict[str, list[DeviceStatePayload]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, payload: bytes) -> None:
        if payload:
            s = DeviceStatePayload.model_validate_json(payload)
            with self.lock:
                self.states[s.device_id].append(s)

    def of(self, device: str, revision: int | None = None) -> list[DeviceStatePayload]:
        with self.lock:
            return [s for s in self.states[device]
                    if revision is None or s.desired_revision == revision]

    def wait(self, device: str, ok: Callable[[DeviceStatePayload], bool],
             timeout: float, agents: list[AgentProc]) -> DeviceStatePayload:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.of(device):
                if ok(s):
                    return s
            time.sleep(0.1)
        logs = "\n\n".join(f"--- {a.name}\n{a.log()}" for a in agents)
        seen = [(s.update_state, s.target, s.reason) for s in self.of(device)]
        raise AssertionError(f"{device}: no matching state in {timeout:.0f} s; saw {seen}\n{logs}")


@dataclass
class Traffic:
    """Sequential chat requests against one agent until stopped; every outcome kept."""

    agent: AgentProc
    outcomes: list[tuple[float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        prompts = ["Name a colour.", "Say hello in French.", "What is 2+2?"]
        with httpx.Client(timeout=120) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    r = http.post(f"{self.agent.url}/v1/chat/completions", json={
                        "model": "default", "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": prompts[i % 3]}]})
                    model = r.json().get("model", "") if r.status_code == 200 else r.text
                    self.outcomes.append((time.time(), r.status_code, model))
                except httpx.HTTPError as exc:
                    self.outcomes.append((time.time(), 0, repr(exc)))
                # Steady, not flat out: two cores also run the pre-flights and the swaps.
                self.stop.wait(0.25)

    def finish(self) -> list[tuple[float, int, str]]:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(120)
        return self.outcomes


@dataclass
class World:
    fleet: Fleet
    root: str
    fleet_models: Path
    agents: dict[str, AgentProc]
    states: StateLog
    traffic: dict[str, Traffic]

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(cli, [*args[:2], "--config", str(self.fleet.config),
                                          *args[2:]], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def devices(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.cli("devices", "list", "--json"))
        return {r["device_id"]: r for r in rows}

    def set_variant(self, variant: str, *, cohort: str | None = None,
                    device: str | None = None) -> int:
        args = ["--cohort", cohort] if cohort else ["--device", str(device)]
        out = self.cli("desired", "set", *args, "--variant", variant)
        return int(out.strip().splitlines()[-1].rsplit("revision ", 1)[1].rstrip(")"))


def _install(catalog: Catalog, dest: Path, labels: tuple[str, ...]) -> Catalog:
    dest.mkdir(parents=True, exist_ok=True)
    local = Catalog(dest)
    for label in labels:
        e = catalog.resolve(label)
        shutil.copy(e.path(catalog.dir), dest / e.file)
        local.put_variant(e)
    local.save()
    return local


def _agent_config(a: AgentProc, *, cohort: str, broker: str, root: str, public_key: Path,
                  update: str = "", preflight: str = "", soak: str = "") -> None:
    a.config.write_text(f"""
[device]
id = "{a.name}"
labels = {{ cohort = "{cohort}" }}
[models]
dir = "{a.dir / 'models'}"
active = "Q8_0"
fallback = ""
threads = 1
n_ctx = 1024
[listen]
port = {a.port}
[concurrency]
queue_size = 16
[telemetry]
device_id = "{a.name}"
aggregate_interval_s = 5
health_interval_s = 0
[telemetry.mqtt]
broker = "{broker}"
topic_root = "{root}"
[telemetry.outbox]
path = "{a.dir / 'outbox.db'}"
[update]
public_key = "{public_key}"
min_free_mb = 0
{update}
[update.preflight]
{preflight}
[update.soak]
poll_s = 0.5
min_requests = 5
{soak}
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("updates")
    broker = Mosquitto(tmp / "broker")
    broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    fleet_models = tmp / "fleet-models"
    _install(catalog, fleet_models, LADDER)
    # The fleet serves artifacts to enrolled devices only: each agent has its credential,
    # agent-1 from systemd's $CREDENTIALS_DIRECTORY, the others from the environment.
    names = ("agent-1", "agent-2", "agent-3")
    creds = {n: issue_device_credential(n) for n in names}
    fleet, root = make_fleet(tmp, f"sqlite:///{tmp / 'fleet.db'}", fleet_models, broker=url,
                             extra="[http.auth]\ndevices = [" + ", ".join(
                                 toml_entry(entry) for _, entry in creds.values()) + "]\n")
    fleet.start()
    states = StateLog()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}")
    watcher.on_message = lambda c, u, m: states.add(m.payload)
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe(f"{root}/devices/+/state", qos=1)
    watcher.loop_start()
    pub = tmp / "keys" / "signing.pub"
    agents = {n: AgentProc(n, tmp / n, free_port()) for n in names}
    for a in agents.values():
        _install(catalog, a.dir / "models", ("Q8_0",))
        if a.name == "agent-1":
            (a.dir / "credentials").mkdir()
            (a.dir / "credentials" / "artifact-token").write_text(creds[a.name][0] + "\n")
            a.env = {"CREDENTIALS_DIRECTORY": str(a.dir / "credentials")}
        else:
            a.env = {"QUANTFLEET_ARTIFACT_TOKEN": creds[a.name][0]}
    # agent-1: the defaults but a short soak; agent-2: a slow link (killed mid-download);
    # agent-3: a soak policy no variant can meet (it must roll back), no pre-flight.
    _agent_config(agents["agent-1"], cohort="main", broker=url, root=root, public_key=pub,
                  soak="duration_s = 6")
    _agent_config(agents["agent-2"], cohort="main", broker=url, root=root, public_key=pub,
                  update="bandwidth_bps = 12000000", soak="duration_s = 6")
    _agent_config(agents["agent-3"], cohort="strict", broker=url, root=root, public_key=pub,
                  preflight="sample = 0", soak="duration_s = 120\nmax_latency_ratio = 0.05")
    w = World(fleet, root, fleet_models, agents, states, {})
    try:
        for a in agents.values():
            a.start()
        w.traffic = {n: Traffic(agents[n]).start() for n in ("agent-1", "agent-3")}
        deadline = time.monotonic() + 60
        while set(w.devices()) != set(agents):
            assert time.monotonic() < deadline, f"devices never registered: {w.devices()}"
            time.sleep(0.3)
        yield w
    finally:
        for t in w.traffic.values():
            t.finish()
        for a in agents.values():
            a.stop()
        watcher.loop_stop()
        fleet.stop()
        broker.stop()


def test_a_cohort_moves_to_q4_k_m_and_a_killed_download_resumes(world: World,
                                                                 catalog: Catalog) -> None:
    q4 = catalog.resolve("Q4_K_M").name
    agents = list(world.agents.values())
    revision = world.set_variant("Q4_K_M", cohort="cohort=main")
    # The operator watches the cohort from a terminal while it moves.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "quantfleet.fleet.cli", "devices", "list", "--config",
         str(world.fleet.config), "--selector", "cohort=main", "--watch", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "250"})
    try:
        # agent-2 downloads at 12 MB/s: kill it part-way, start it again.
        a2 = world.agents["agent-2"]
        world.states.wait("agent-2", lambda s: s.update_state == "downloading"
                          and (s.progress or 0) >= 0.2, 90, agents)
        a2.kill()
        partial = a2.dir / "models" / f"{q4}.gguf.partial"
        assert partial.exists() and partial.stat().st_size > 0
        a2.start()
        for name in ("agent-1", "agent-2"):
            world.states.wait(name, lambda s: s.update_state == "healthy" and s.variant == q4,
                              300, agents)
        # The operator's view, through the CLI.
        time.sleep(1.0)
        watcher.send_signal(signal.SIGINT)
        watched, _ = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:  # the test failed before the operator stopped it
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, watched
    assert "agent-2" in watched and "healthy" in watched and "agent-3" not in watched, watched
    devices = world.devices()
    for name in ("agent-1", "agent-2"):
        d = devices[name]
        assert d["variant"] == q4 and d["update_state"] == "healthy", d
        assert world.agents[name].active() == q4
    assert devices["agent-3"]["variant"] == catalog.resolve("Q8_0").name
    table = world.cli("devices", "list", "--selector", "cohort=main")
    assert "agent-1" in table and "healthy" in table and "agent-3" not in table
    # agent-1 walked every step, in order.
    assert walk(world.states.of("agent-1", revision))[-6:] == [
        "downloading", "verifying", "preflight", "activating", "soaking", "healthy"]
    # The whole walk reached the fleet as telemetry events: the operator reads it back.
    deadline = time.monotonic() + 60
    while True:
        history = json.loads(world.cli("devices", "history", "agent-1", "--json"))
        steps = walk([DeviceStatePayload.model_validate(h) for h in history
                      if h["desired_revision"] == revision])
        if steps[-1:] == ["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert steps[-6:] == ["downloading", "verifying", "preflight", "activating", "soaking",
                          "healthy"], history
    assert "preflight" in world.cli("devices", "history", "agent-1")
    # agent-2 resumed where the killed process left off instead of starting over.
    resumed = [s for s in world.states.of("agent-2") if "resuming at byte" in s.reason]
    assert resumed and (resumed[0].progress or 0) >= 0.2, world.states.of("agent-2")
    assert not partial.exists()
    local = Catalog(a2.dir / "models")
    assert local.verify(local.resolve(q4)) is None


def test_a_variant_failing_its_preflight_is_never_activated(world: World,
                                                            catalog: Catalog) -> None:
    a1 = world.agents["agent-1"]
    before = a1.active()
    q2 = catalog.resolve("Q2_K").name
    revision = world.set_variant("Q2_K", device="agent-1")
    final = world.states.wait("agent-1", lambda s: s.desired_revision == revision
                              and s.update_state in ("failed", "healthy", "rolled_back"),
                              300, list(world.agents.values()))
    assert final.update_state == "failed", final
    assert final.target == q2 and "pre-flight failed" in final.reason, final.reason
    # the state message carries the evidence: the paired test and the KLD against limits
    assert "McNemar" in final.reason and "kld_mean:all" in final.reason, final.reason
    steps = walk(world.states.of("agent-1", revision))
    assert "preflight" in steps and "activating" not in steps, steps
    assert a1.active() == before and final.variant == before
    assert world.devices()["agent-1"]["update_state"] == "failed"


def test_a_tampered_artifact_is_refused(world: World, catalog: Catalog) -> None:
    a2 = world.agents["agent-2"]
    before = a2.active()
    q40 = catalog.resolve("Q4_0")
    # Someone alters the file the fleet serves after its hash was signed.
    path = world.fleet_models / q40.file
    with path.open("r+b") as fh:
        fh.seek(q40.size_bytes // 2)
        byte = fh.read(1)
        fh.seek(q40.size_bytes // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    revision = world.set_variant("Q4_0", device="agent-2")
    final = world.states.wait("agent-2", lambda s: s.desired_revision == revision
                              and s.update_state in ("failed", "healthy", "refused"),
                              120, list(world.agents.values()))
    assert final.update_state == "failed" and "sha256" in final.reason, final
    assert "preflight" not in walk(world.states.of("agent-2", revision))
    assert a2.active() == before
    leftovers = list((a2.dir / "models").glob(f"{q40.name}*"))
    assert leftovers == [], leftovers


def test_a_device_rolls_itself_back_when_its_soak_breaches(world: World,
                                                           catalog: Catalog) -> None:
    a3 = world.agents["agent-3"]
    q8, q4 = catalog.resolve("Q8_0").name, catalog.resolve("Q4_K_M").name
    assert a3.active() == q8
    revision = world.set_variant("Q4_K_M", device="agent-3")
    final = world.states.wait("agent-3", lambda s: s.desired_revision == revision
                              and s.update_state in ("rolled_back", "healthy", "failed"),
                              240, list(world.agents.values()))
    assert final.update_state == "rolled_back", final
    assert "p95 latency" in final.reason and final.variant == q8 == final.known_good
    assert "soaking" in walk(world.states.of("agent-3", revision))
    assert a3.active() == q8
    # The known-good file stayed on disk; the agent served Q4_K_M for a while.
    assert (a3.dir / "models" / catalog.resolve("Q8_0").file).exists()
    served = {m for _, status, m in world.traffic["agent-3"].outcomes if status == 200}
    assert {q8, q4} <= served
    assert world.devices()["agent-3"]["update_state"] == "rolled_back"


def test_no_request_failed_through_swaps_and_rollbacks(world: World) -> None:
    for name, traffic in world.traffic.items():
        outcomes = list(traffic.outcomes)
        assert len(outcomes) >= 10, name
        bad = [o for o in outcomes if o[1] != 200]
        assert bad == [], (name, bad[:5])
