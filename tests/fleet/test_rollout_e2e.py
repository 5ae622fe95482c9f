"""A staged rollout end to end: `quantfleet serve`, 120 simulated devices on the real
broker, and the operator's CLI — a good precision is promoted through every step
(across a fleet restart), a bad one is caught at the canary and rolled back."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.fleet.cli import cli
from quantfleet.fleet.simulate import FleetSimulator
from quantfleet.fleet.store import Store
from tests.support import Mosquitto

from .test_service import Fleet, make_fleet

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto is not installed")


@pytest.fixture
def world(tmp_path: Path, ladder_dir: Path) -> Iterator[tuple[Fleet, FleetSimulator, Path]]:
    # A private broker: its queue for the fleet's session is unbounded, as a production
    # broker for a fleet must be (the default 1,000 messages overflow during a restart).
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    fleet, root = make_fleet(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", ladder_dir,
                             broker=url, extra="[rollouts]\ntick_s = 0.5")
    fleet.start()
    sim = FleetSimulator(MqttConfig(broker=url, topic_root=root), 120,
                         baseline="smollm2-135m-Q8_0", requests_per_s=5, step_s=0.1,
                         seed=11).start()
    yield fleet, sim, tmp_path
    sim.stop()
    fleet.stop()
    broker.stop()


def cli_json(*args: str) -> object:
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def write_spec(path: Path, name: str, frm: str, to: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "cohort": "*", "from": frm, "to": to,
        "steps": ["10%", "50%", "100%"], "bake_s": 4, "max_bake_extensions": 6,
        "min_samples": 150, "holdback": "20%",
        "deadlines": {"download_s": 20, "preflight_s": 10, "activation_s": 10, "soak_s": 20},
        "gates": [{"metric": "validation_failure_rate", "tolerance": 0.05},
                  {"metric": "p95_latency", "tolerance": 0.5}],
    }))
    return path


def wait_state(cfg: str, rollout: str, states: set[str], timeout: float = 150) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        st = cli_json("rollout", "status", "--config", cfg, rollout)
        assert isinstance(st, dict)
        if st["state"] in states:
            return st
        assert time.monotonic() < deadline, f"rollout stuck: {st}"
        time.sleep(0.5)


def test_good_precision_promoted_bad_precision_rolled_back(world) -> None:  # type: ignore[no-untyped-def]
    fleet, sim, tmp = world
    cfg = str(fleet.config)
    deadline = time.monotonic() + 30
    while len(cli_json("devices", "list", "--config", cfg)) < 120:  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    runner = CliRunner()
    good = write_spec(tmp / "good.yaml", "q4km", "Q8_0", "Q4_K_M")
    r = runner.invoke(cli, ["rollout", "create", "--config", cfg, str(good)])
    assert r.exit_code == 0, r.output

    # Restart the fleet once the canary step has passed: the rollout resumes.
    deadline = time.monotonic() + 120
    while cli_json("rollout", "status", "--config", cfg, "q4km")["step"] < 2:  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    fleet.stop()
    fleet.start()
    done = wait_state(cfg, "q4km", {"completed", "rolled_back", "paused"})
    if done["state"] != "completed":
        print(CliRunner().invoke(cli, ["rollout", "history", "--config", cfg, "q4km"]).output)
    assert done["state"] == "completed", done
    variants = sim.variants()
    assert variants == {"smollm2-135m-Q4_K_M": 96, "smollm2-135m-Q8_0": 24}  # 20% holdback

    bad = write_spec(tmp / "bad.yaml", "q2k", "Q4_K_M", "Q2_K")
    r = runner.invoke(cli, ["rollout", "create", "--config", cfg, str(bad)])
    assert r.exit_code == 0, r.output
    failed = wait_state(cfg, "q2k", {"completed", "rolled_back", "paused"})
    assert failed["state"] == "rolled_back", failed
    assert failed["step"] == 1 and "validation_failure_rate" in failed["reason"]
    time.sleep(2)  # the rolled-back devices walk back to the baseline
    assert sim.variants() == {"smollm2-135m-Q4_K_M": 96, "smollm2-135m-Q8_0": 24}
    # Pinned: the same candidate is not offered again without an operator.
    r = runner.invoke(cli, ["rollout", "create", "--config", cfg,
                            str(write_spec(tmp / "again.yaml", "q2k-2", "Q4_K_M", "Q2_K"))])
    assert r.exit_code == 1 and "pinned off cohort" in r.output
    history = runner.invoke(cli, ["rollout", "history", "--config", cfg, "q2k"])
    assert "rollout.verdict" in history.output and "validation_failure_rate=fail" in history.output
    assert "rollout.rolled_back" in history.output
    # Every line says what happened, not only its kind.
    lines = {ln.split()[3]: ln for ln in history.output.splitlines() if "rollout." in ln}
    assert "smollm2-135m-Q2_K on '*'" in lines["rollout.create"], lines
    assert "canaries healthy" in lines["rollout.bake"], lines
    assert "healthy" in lines["rollout.device"], lines


def test_a_fleet_killed_mid_rollout_resumes_and_loses_no_telemetry(  # type: ignore[no-untyped-def]
        world, fault_record) -> None:
    """kill -9 of `quantfleet serve` while a step bakes, devices sending all along: the
    restarted fleet finishes the rollout, and every event the devices sent is stored
    once (the broker kept the fleet's persistent session; nothing was acknowledged
    before it was committed)."""
    fleet, sim, tmp = world
    cfg = str(fleet.config)
    deadline = time.monotonic() + 30
    while len(cli_json("devices", "list", "--config", cfg)) < 120:  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    good = write_spec(tmp / "good.yaml", "q4km-kill", "Q8_0", "Q4_K_M")
    r = CliRunner().invoke(cli, ["rollout", "create", "--config", cfg, str(good)])
    assert r.exit_code == 0, r.output
    deadline = time.monotonic() + 120
    while cli_json("rollout", "status", "--config", cfg, "q4km-kill")["phase"] != "baking":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert fleet.proc is not None
    fleet.proc.send_signal(signal.SIGKILL)
    fleet.proc.wait(10)
    time.sleep(3)  # the devices keep sending while the fleet is down
    fleet.start()
    done = wait_state(cfg, "q4km-kill", {"completed", "rolled_back", "paused"})
    assert done["state"] == "completed", done
    sim.stop(clear_retained=False)
    produced = sum(d.seq for d in sim.devices.values())
    store = Store(f"sqlite:///{tmp / 'fleet.db'}")
    try:
        deadline = time.monotonic() + 60
        while store.event_count("request") < produced and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = store.event_count("request")
        gaps = store.seq_gaps()
    finally:
        store.close()
    fault_record("fleet kill -9 mid-rollout (120 simulated devices)",
                 produced=produced, stored=stored)
    assert stored == produced and gaps == [], (produced, stored, gaps[:5])
