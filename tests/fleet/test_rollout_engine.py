"""The rollout engine over a real store (SQLite and PostgreSQL), with devices simulated at
the store's edge.

Each "device" answers desired state the way the agent's updater does (a
state report), and serves traffic whose quality depends on the variant it
runs; the engine sees only the store, exactly as in production.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from quantfleet.agent.wire import (
    DesiredPayload,
    DeviceStatePayload,
    RequestEvent,
    StatusPayload,
    TelemetryBatch,
    TelemetryEvent,
    ValidationOutcome,
)
from quantfleet.fleet.rollouts.engine import RolloutEngine, RolloutError
from quantfleet.fleet.rollouts.spec import UNKNOWN_CLASS, RolloutSpec
from quantfleet.fleet.simulate import fingerprint
from quantfleet.fleet.store import Store

BASE, GOOD, BAD = "m-Q8_0", "m-Q4_K_M", "m-Q2_K"


@dataclass
class World:
    store: Store
    now: float = 1_000_000.0
    fail_rate: dict[str, float] = field(default_factory=lambda: {BASE: 0.02, GOOD: 0.025,
                                                                 BAD: 0.30})
    offline: set[str] = field(default_factory=set)
    refuse: set[str] = field(default_factory=set)
    variant: dict[str, str] = field(default_factory=dict)
    pending: list[tuple[str, str]] = field(default_factory=list)
    seq: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    # Per-class regressions: (variant, cpu class) -> added failure rate / latency factor.
    cpu_class: dict[str, str] = field(default_factory=dict)
    class_fail: dict[tuple[str, str], float] = field(default_factory=dict)
    class_slow: dict[tuple[str, str], float] = field(default_factory=dict)

    def clock(self) -> float:
        return self.now

    def add(self, n: int, labels: dict[str, str] | None = None, prefix: str = "d",
            cpu_class: str | None = None) -> None:
        """``n`` devices; with ``cpu_class``, each birth carries a fingerprint of that class
        (the store derives the cpu.* labels, as from a real agent), else none."""
        for i in range(n):
            dev = f"{prefix}{i:03d}"
            self.variant[dev] = BASE
            own = {"region": "eu", "hw": "rpi5" if i % 2 else "jetson", **(labels or {})}
            if cpu_class is None:
                self.store.apply_status(StatusPayload(device_id=dev, state="online",
                                                      boot_epoch=1, reason="birth",
                                                      ts=self.now))
                self.store.set_labels(dev, own)
                self.cpu_class[dev] = UNKNOWN_CLASS
            else:
                self.store.apply_status(StatusPayload(
                    device_id=dev, state="online", boot_epoch=1, reason="birth", ts=self.now,
                    labels=own, hardware=fingerprint(cpu_class)))
                self.cpu_class[dev] = cpu_class
            self.report(dev, "healthy")

    def report(self, dev: str, state: str, target: str | None = None) -> None:
        self.store.apply_state(DeviceStatePayload(
            device_id=dev, boot_epoch=1, variant=self.variant[dev], update_state=state,
            target=target, ts=self.now))

    def assign(self, ids: Sequence[str], variant: str, rollout_id: str) -> None:
        """What DesiredState.set_variant does: store the desired state, send it."""
        for d in ids:
            self.store.put_desired(d, lambda rev, d=d: _desired(d, rev, variant))
        self.pending.extend((d, variant) for d in ids)

    def devices_act(self) -> None:
        keep = []
        for dev, variant in self.pending:
            if dev in self.offline:
                keep.append((dev, variant))
            elif dev in self.refuse:
                self.report(dev, "failed", target=variant)
            else:
                self.variant[dev] = variant
                self.report(dev, "healthy")
        self.pending = keep

    def traffic(self, seconds: float, per_device: int) -> None:
        batches = []
        for dev, variant in self.variant.items():
            if dev in self.offline:
                continue
            events = []
            for i in range(per_device):
                s = self.seq[dev] = self.seq.get(dev, 0) + 1
                ts = self.now + seconds * (i + 0.5) / per_device
                where = (variant, self.cpu_class.get(dev, UNKNOWN_CLASS))
                ok = self.rng.random() >= self.fail_rate[variant] + self.class_fail.get(where, 0)
                body = RequestEvent(request_id=f"{dev}-{s}", ts=ts, variant=variant,
                                    latency_s=self.rng.lognormvariate(-1, 0.2)
                                    * self.class_slow.get(where, 1.0),
                                    prompt_tokens=40, completion_tokens=20,
                                    validations=[ValidationOutcome(kind="json_schema",
                                                                   passed=ok)])
                events.append(TelemetryEvent(boot_epoch=1, seq=s, kind="request", ts=ts,
                                             body=body))
            if events:
                batches.append(TelemetryBatch(device_id=dev, sent_at=self.now, events=events))
        self.store.ingest_batches(batches)
        self.now += seconds

    def run(self, engine: RolloutEngine, rollout: str, rounds: int = 60,
            per_device: int = 20) -> str:
        for _ in range(rounds):
            engine.tick()
            self.devices_act()
            self.traffic(60, per_device)
            state = engine.get(rollout)["state"]
            if state not in ("running",):
                return str(state)
        return str(engine.get(rollout)["state"])


@pytest.fixture
def world(store_url: str) -> Iterator[World]:
    """The engine over each store engine (the gates' aggregation is SQL)."""
    store = Store(store_url)
    yield World(store)
    store.close()


def spec(**over: object) -> RolloutSpec:
    doc: dict[str, object] = {
        "name": "r1", "cohort": "region=eu", "from": BASE, "to": GOOD,
        "steps": [1, "25%", "100%"], "bake_s": 240, "min_samples": 150, "holdback": "20%",
        "gates": [{"metric": "validation_failure_rate", "tolerance": 0.03},
                  {"metric": "p95_latency", "tolerance": 0.3}],
        "deadlines": {"download_s": 300, "preflight_s": 300, "activation_s": 60,
                      "soak_s": 300},
    }
    doc.update(over)
    return RolloutSpec.model_validate(doc)


def actions(world: World, rollout: str = "r1") -> list[str]:
    return [a["action"] for a in reversed(world.store.audit_log(f"rollout:{rollout}", 1000))]


def test_a_good_variant_is_promoted_through_every_step(world: World) -> None:
    world.add(20)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec())
    assert world.run(engine, "r1") == "completed"
    members = engine.members("r1")
    controls = [m for m in members if m["role"] == "control"]
    canaries = [m for m in members if m["role"] == "canary"]
    assert len(controls) == 4 and len(canaries) == 16
    assert {world.variant[m["device_id"]] for m in controls} == {BASE}
    assert {world.variant[m["device_id"]] for m in canaries} == {GOOD}
    assert [m["step"] for m in canaries].count(0) == 1  # one device first
    log = actions(world)
    assert log[0] == "rollout.create" and log[-1] == "rollout.complete"
    verdicts = [a for a in world.store.audit_log("rollout:r1", 1000)
                if a["action"] == "rollout.verdict"]
    # One pass per step; a bake may first be extended for data, never failed.
    assert [v["evidence"]["verdict"] for v in verdicts].count("pass") == 3
    assert "fail" not in [v["evidence"]["verdict"] for v in verdicts]
    gate = verdicts[0]["evidence"]["gates"][0]
    assert {"estimate", "low", "high", "canary_n", "control_n", "p_value"} <= gate.keys()


def test_a_bad_variant_is_rolled_back_pinned_and_never_retried(world: World) -> None:
    world.add(20)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec(to=BAD))
    assert world.run(engine, "r1") == "rolled_back"
    world.devices_act()
    assert set(world.variant.values()) == {BASE}  # every device back on the baseline
    r = engine.get("r1")
    assert r["step"] == 0 and "validation_failure_rate" in r["reason"]
    assert engine.pins()[0]["variant"] == BAD
    # No flapping: more ticks change nothing, and the pin blocks a new attempt.
    for _ in range(5):
        engine.tick()
    assert engine.get("r1")["state"] == "rolled_back"
    with pytest.raises(RolloutError, match="pinned off cohort"):
        engine.create(spec(name="r2", to=BAD))
    engine.create(spec(name="r3", to=BAD), unpin=True)
    assert engine.pins() == []


def test_too_little_traffic_is_insufficient_and_never_passes(world: World) -> None:
    world.add(10)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec(max_bake_extensions=2))
    assert world.run(engine, "r1", per_device=1) == "paused"
    r = engine.get("r1")
    assert r["step"] == 0 and "insufficient data after 2 bake extensions" in r["reason"]
    verdicts = [a["evidence"]["verdict"] for a in world.store.audit_log("rollout:r1", 1000)
                if a["action"] == "rollout.verdict"]
    assert verdicts == ["insufficient"] * 3


def test_a_fleet_restart_resumes_the_rollout(world: World) -> None:
    world.add(20)
    first = RolloutEngine(world.store, world.assign, clock=world.clock)
    first.create(spec())
    for _ in range(40):
        first.tick()
        world.devices_act()
        world.traffic(60, 20)
        if first.get("r1")["step"] >= 1:
            break
    mid = first.get("r1")
    assert mid["state"] == "running" and mid["step"] >= 1
    second = RolloutEngine(world.store, world.assign, clock=world.clock)  # a new process
    assert world.run(second, "r1") == "completed"
    assert len([m for m in second.members("r1") if m["role"] == "canary"]) == 16


def test_devices_that_never_report_count_as_failures(world: World) -> None:
    world.add(20)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec(steps=["25%", "100%"], max_failed_devices=1))
    world.offline = {f"d{i:03d}" for i in range(20)}  # everyone drops off after the start
    assert world.run(engine, "r1") == "rolled_back"
    outcomes = {m["outcome"] for m in engine.members("r1") if m["role"] == "canary"}
    assert outcomes == {"rolled_back"}
    timeouts = [o for a in world.store.audit_log("rollout:r1", 1000)
                if a["action"] == "rollout.device" for o in a["evidence"]["outcomes"]]
    assert timeouts and all(o["outcome"] == "timeout" for o in timeouts)


def test_manual_approval_and_abort(world: World) -> None:
    world.add(12)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec(manual_approval=True))
    assert world.run(engine, "r1") == "awaiting_approval"
    with pytest.raises(RolloutError, match="not paused"):
        engine.resume("r1")
    engine.promote("r1", actor="alice")
    assert engine.get("r1")["step"] == 1
    assert world.run(engine, "r1") == "awaiting_approval"
    engine.abort("r1", actor="alice", reason="change freeze")
    world.devices_act()
    assert set(world.variant.values()) == {BASE}
    assert engine.get("r1")["state"] == "aborted" and engine.pins() == []
    assert ("alice", "rollout.abort") in [(a["actor"], a["action"])
                                          for a in world.store.audit_log("rollout:r1")]


def test_a_device_that_refuses_the_update_fails_the_step(world: World) -> None:
    world.add(10)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    world.refuse = {f"d{i:03d}" for i in range(10)}
    engine.create(spec(steps=[2, "100%"]))
    assert world.run(engine, "r1") == "rolled_back"
    assert "device update(s) failed" in engine.get("r1")["reason"]


def test_an_assignment_cut_short_by_a_restart_is_completed(world: World) -> None:
    world.add(20)

    class Crash(Exception):
        pass

    sent: list[str] = []

    def flaky_assign(ids: Sequence[str], variant: str, rollout_id: str) -> None:
        for i, d in enumerate(ids):
            if i == 2:
                raise Crash  # the fleet dies after two devices got their desired state
            world.store.put_desired(d, lambda rev, d=d: _desired(d, rev, variant))
            sent.append(d)
            world.pending.append((d, variant))

    first = RolloutEngine(world.store, flaky_assign, clock=world.clock)
    first.create(spec(steps=["25%", "100%"]))
    first.tick()  # logs the crash, the rows are written
    assert len(sent) == 2

    second = RolloutEngine(world.store, world.assign, clock=world.clock)
    assert world.run(second, "r1") == "completed"


def _desired(device: str, revision: int, variant: str) -> DesiredPayload:
    return DesiredPayload(device_id=device, revision=revision, variant=variant,
                          backend="llama.cpp", sha256="0" * 64, size_bytes=1,
                          url="http://fleet/x", signature="s", issued_at=0.0,
                          key_id="0" * 16)


def test_a_cohort_with_no_device_on_the_baseline_pauses_at_once(world: World) -> None:
    world.add(5, labels={"region": "us"})  # nobody in region=eu
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(spec())
    assert world.run(engine, "r1", rounds=3) == "paused"
    r = engine.get("r1")
    assert r["phase"] == "assigning" and "0 in the cohort" in r["reason"], r
    assert "rollout.verdict" not in actions(world) and world.pending == []
    # Devices arrive; the operator resumes; the rollout goes on from its first step.
    world.add(20, prefix="eu")
    engine.resume("r1")
    assert world.run(engine, "r1") == "completed"
