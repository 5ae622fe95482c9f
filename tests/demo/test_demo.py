"""The README's demo, run for real at a small size: a private broker, `quantfleet serve`,
a real agent on the real ladder, simulated devices, traffic, two staged rollouts — and
nothing left running afterwards, also when it is interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from quantfleet.demo.broker import amqtt_available, start_broker
from quantfleet.demo.calibration import calibrate
from quantfleet.demo.processes import ProcessGroup
from quantfleet.demo.run import STORY, VALIDATION_TOLERANCE
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.store import Store
from quantfleet.models.catalog import Catalog


def processes_naming(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (what `pgrep -f` finds)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def demo_argv(ladder_dir: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantfleet.fleet.cli", "demo", "--models-dir",
            str(ladder_dir), "--run-dir", str(runs), "--agents", "1", "--devices", "100",
            # Enough canaries and requests that each gate's interval is narrow next to the
            # distance of the measured gap from the 10-point tolerance. On x86-64 (AVX2
            # kernels) Q8_0 fails 4.8 points more golden items than F16: with 4 canaries
            # (40 devices) the interval of ~400 canary requests was about +-4 points and the
            # step went either way; 10 canaries at 8 requests/s give ~800 per bake, +-2.5.
            "--rate", "8", "--bake", "10", "--min-samples", "150", *extra]


def knife_edges(ladder_dir: Path) -> list[str]:
    """The story's steps whose gap, as this machine's calibration measured it (the one the
    demo just used, reused here), lies within 3 points of the validation gate's tolerance."""
    labels = tuple(dict.fromkeys(x for _, frm, to, _ in STORY for x in (frm, to)))
    cal = calibrate(Catalog(ladder_dir), labels)
    assert cal.reused, "the demo measured this machine just before"
    return [f"{frm} -> {to}: {cal.failure_rate(to) - cal.failure_rate(frm):+.1%}"
            for _, frm, to, _ in STORY
            if abs(cal.failure_rate(to) - cal.failure_rate(frm) - VALIDATION_TOLERANCE) < 0.03]


def never_assign(ids: object, variant: str, rollout_id: str) -> None:
    raise AssertionError("reading only")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_promotes_q8_catches_q2k_and_stops_everything(ladder_dir: Path,
                                                            tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # The first run on a machine measures the variants on the golden set (minutes);
    # the interrupt test below reuses that measurement. Meanwhile the rollouts are
    # followed live on the web console whose URL the demo prints.
    demo = subprocess.Popen(demo_argv(ladder_dir, runs), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "160"})
    seen: dict[str, set[str]] = {}  # rollout id -> the states the console showed
    pages: list[int] = []
    lines: list[str] = []

    def follow(url: str) -> None:
        while demo.poll() is None:
            try:
                r = httpx.get(url + "api/rollouts", timeout=10)
                for rollout in r.json()["rollouts"]:
                    seen.setdefault(rollout["id"], set()).add(rollout["state"])
                if seen and not pages:
                    pages.append(httpx.get(url + "rollouts", timeout=10).status_code)
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # the fleet is not up yet, or already stopped
            time.sleep(1.0)

    followers: list[threading.Thread] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            found = re.search(r"console: (http://\S+/console/)", line)
            if found and not followers:
                followers.append(threading.Thread(target=follow, args=(found.group(1),),
                                                  daemon=True))
                followers[0].start()
        demo.wait(timeout=1400)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    for thread in followers:
        thread.join(30)
    out = "".join(lines)
    assert demo.returncode == 0, out  # the machinery worked: every rollout decided itself
    assert followers, "the demo printed no console URL"
    # Both rollouts were visible on the console while they ran, and the page answered.
    assert len(seen) == len(STORY) and all("running" in st for st in seen.values()), seen
    assert pages == [200], pages
    (run_dir,) = list(runs.iterdir())
    assert processes_naming(str(run_dir)) == [], "the demo left processes running"
    if "the rollouts ended as expected" not in out:
        # The story depends on this machine's measured gaps: it must hold unless the
        # calibration itself put a gap within 3 points of the 10-point tolerance, where
        # the gate may rightly decide either way. The demo must then say so and explain
        # it from the evidence.
        near = knife_edges(ladder_dir)
        assert near, "the story did not hold although every measured gap is clear of the " \
                     "tolerance:\n" + out
        assert "the rollouts did not end as expected" in out and "from the evidence" in out
        assert "tolerance of 10%" in out and "on this machine" in out, out
        warnings.warn(f"the demo's story did not hold on this machine ({'; '.join(near)}): "
                      + out[out.index("the rollouts did not end as expected"):][:600],
                      stacklevel=1)
        return
    # The agents' model copies are gone, the fleet's files stay for the printed commands.
    assert [p.name for p in run_dir.glob("agents/*/models/*")] == ["catalog.json"]
    assert (ladder_dir / "smollm2-135m-F16.gguf").exists()

    store = Store(f"sqlite:///{run_dir / 'fleet.db'}")
    engine = RolloutEngine(store, never_assign)
    try:
        good, bad = engine.get("demo-q8"), engine.get("demo-q2k")
        assert (good["state"], good["step"]) == ("completed", 2), good
        assert (bad["state"], bad["step"]) == ("rolled_back", 0), bad
        # Caught by a gate at the canary step (or by a real agent refusing Q2_K in its
        # pre-flight, which the fleet counts as a failed device update).
        assert "validation_failure_rate" in bad["reason"] or "pre-flight" in bad["reason"]
        assert [p["variant"] for p in engine.pins()] == ["smollm2-135m-Q2_K"]
        devices = {d["device_id"]: d for d in store.devices()}
        assert len(devices) == 101
        assert not any(d["variant"] == "smollm2-135m-Q2_K" for d in devices.values())
        # The real agent took part like any device: a canary ends on Q8_0, reported
        # healthy by its own updater; a control stays on F16.
        role = {m["device_id"]: m["role"] for m in engine.members("demo-q8")}["agent-1"]
        agent = devices["agent-1"]
        if role == "canary":
            assert (agent["variant"], agent["update_state"]) == ("smollm2-135m-Q8_0",
                                                                 "healthy")
        else:
            assert agent["variant"] == "smollm2-135m-F16"
        assert store.event_count("request") > 1000
    finally:
        store.close()

    for command in ("$ quantfleet keys generate", "$ quantfleet serve --config",
                    "$ quantfleet-agent serve --config", "$ quantfleet rollout create",
                    "$ quantfleet rollout history", "$ quantfleet signals"):
        assert command in out, command
    assert "rollout.rolled_back" in out and "rollout.complete" in out
    # what the simulated devices do was measured on this machine, and said so
    assert "calibrated:" in out and "Nothing is injected" in out
    assert "injected JSON regression" not in out and "injected regression" not in out
    assert list((ladder_dir / "calibration").glob("demo-*.json"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_interrupted_demo_stops_every_process(ladder_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    log = tmp_path / "demo.log"
    with log.open("wb") as fh:
        demo = subprocess.Popen(demo_argv(ladder_dir, runs), stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        # Alone, the run measures the variants first (minutes; see above).
        deadline = time.monotonic() + 1000
        # Interrupt once the fleet, the agent and the simulator run and a rollout has begun.
        while "rollout.create" not in log.read_text(errors="replace"):
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        (run_dir,) = list(runs.iterdir())
        running = processes_naming(str(run_dir))
        assert len(running) == 3, running  # broker, fleet, agent
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 130, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert processes_naming(str(run_dir)) == [], log.read_text()
    assert "stopped every process the demo started" in log.read_text()


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    procs = ProcessGroup(tmp_path / "logs")
    child = procs.start("stubborn", [sys.executable, "-c",
                                     "import signal, time; "
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                     "print('up', flush=True); time.sleep(600)"])
    deadline = time.monotonic() + 10
    while "up" not in (tmp_path / "logs" / "stubborn.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    procs.stop_all(grace_s=1)
    assert child.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert procs.children == []


@pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed")
def test_embedded_broker_delivers_shared_subscriptions_and_retained_messages(
        tmp_path: Path) -> None:
    procs = ProcessGroup(tmp_path / "logs")
    try:
        broker = start_broker(procs, tmp_path, "amqtt")
        assert broker.protocol == "3.1.1"
        port = int(broker.url.rsplit(":", 1)[1])
        got: list[str] = []

        def client(name: str) -> mqtt.Client:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                            protocol=mqtt.MQTTv311)
            c.on_message = lambda c, u, m: got.append(f"{m.topic}={m.payload.decode()}")
            c.connect("127.0.0.1", port)
            c.loop_start()
            return c

        pub = client("device")
        pub.publish("qf/devices/d1/state", b"healthy", qos=1, retain=True).wait_for_publish(5)
        sub = client("fleet")
        subscribed = sub.subscribe([("$share/fleet/qf/devices/+/telemetry", 1),
                                    ("qf/devices/+/state", 1)])
        assert subscribed[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.5)
        pub.publish("qf/devices/d1/telemetry", b"batch", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(got) == ["qf/devices/d1/state=healthy", "qf/devices/d1/telemetry=batch"]
        # A client that connects gets no retained message it did not subscribe to
        # (amqtt 0.12.1 on its own sends those of every client's subscriptions).
        got.clear()
        other = client("device-2")
        time.sleep(1)
        assert got == []
        for c in (pub, sub, other):
            c.disconnect()
            c.loop_stop()
    finally:
        procs.stop_all()
    assert processes_naming(str(tmp_path / "broker")) == []
