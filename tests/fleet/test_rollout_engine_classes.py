"""The engine judges each hardware class, on a real store (SQLite and PostgreSQL).

Devices are born with real fingerprints (the store derives ``cpu.class``), and
a candidate regresses on one class only. The world is the engine tests' one:
devices simulated at the store's edge, the engine seeing only the store.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select

from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.spec import UNKNOWN_CLASS
from quantfleet.fleet.store import schema

from .test_rollout_engine import BASE, GOOD, World, spec
from .test_rollout_engine import world as world  # the fixture: both stores

CLASSES = ("x86-avx512-vnni", "x86-avx2", "arm-dotprod")


def fleet(world: World, per_class: int = 30, classes: tuple[str, ...] = CLASSES) -> None:
    for i, cls in enumerate(classes):
        world.add(per_class, prefix=f"c{i}-", cpu_class=cls)


def class_spec(**over: object) -> Any:
    doc: dict[str, object] = {
        "steps": ["20%", "100%"], "bake_s": 240,
        "gates": [{"metric": "validation_failure_rate", "tolerance": 0.1},
                  {"metric": "p95_latency", "tolerance": 0.3}]}
    doc.update(over)
    return spec(**doc)


def audit(world: World, action: str, rollout: str = "r1") -> list[dict[str, Any]]:
    return [a["evidence"] for a in reversed(world.store.audit_log(f"rollout:{rollout}", 1000))
            if a["action"] == action]


def test_a_regression_on_one_class_is_rolled_back_and_named(world: World) -> None:
    fleet(world)
    world.class_fail[(GOOD, "x86-avx2")] = 0.2  # int8 on AVX2-only devices, say
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec(stratify_by="hw"))
    assert world.run(engine, "r1") == "rolled_back"
    r = engine.get("r1")
    assert r["step"] == 0
    assert r["reason"].startswith("gate failed on cpu.class=x86-avx2 only ("), r["reason"]
    assert "validation_failure_rate: canary +" in r["reason"]

    verdict = audit(world, "rollout.verdict")[-1]
    assert verdict["verdict"] == "fail" and verdict["failed"] == ["cpu.class=x86-avx2"]
    # Averaged over the three classes, the same regression is within tolerance.
    pooled = {g["metric"]: g["verdict"] for g in verdict["gates"]}
    assert pooled["validation_failure_rate"] != "fail", verdict["gates"]
    assert {k: v["verdict"] for k, v in verdict["classes"].items()} == {
        "arm-dotprod": "pass", "x86-avx2": "fail", "x86-avx512-vnni": "pass"}
    # Canaries were spread over the classes, and each compared with its own class.
    avx2 = verdict["classes"]["x86-avx2"]
    assert avx2["canary_devices"] == 5 and avx2["control_devices"] == 25  # 15 of 72, 90 - 15
    # The stratum dimension is judged too, from the same read.
    assert set(verdict["stratum_verdicts"]) == {"rpi5", "jetson"}

    back = audit(world, "rollout.rolled_back")[-1]
    assert back["pinned"] and list(back["failed_classes"]) == ["x86-avx2"]
    assert back["failed_classes"]["x86-avx2"]["gates"][0]["metric"] == \
        "validation_failure_rate"
    assert back["cohort_without_failed_classes"] == "region=eu,cpu.class!=x86-avx2"
    pin = engine.pins()[0]
    assert pin["variant"] == GOOD and "cpu.class=x86-avx2" in pin["reason"]
    world.devices_act()
    assert set(world.variant.values()) == {BASE}
    with world.store.engine.connect() as conn:
        strata = {row.stratum for row in conn.execute(select(schema.rollout_devices))}
    assert "x86-avx2|rpi5" in strata  # where each device was picked, for the record

    # The other classes can still move: the cohort without the failed one is not pinned.
    engine.create(class_spec(name="r2", cohort=back["cohort_without_failed_classes"]))
    assert world.run(engine, "r2") == "completed"
    moved = Counter(world.cpu_class[d] for d, v in world.variant.items() if v == GOOD)
    assert set(moved) == {"x86-avx512-vnni", "arm-dotprod"}


def test_the_same_candidate_without_the_regression_passes(world: World) -> None:
    fleet(world)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec())
    assert world.run(engine, "r1") == "completed"
    for verdict in audit(world, "rollout.verdict"):
        assert verdict["failed"] == []
    first = audit(world, "rollout.verdict")[0]
    assert set(first["classes"]) == set(CLASSES)


def test_a_required_minimum_per_class_is_picked_first(world: World) -> None:
    fleet(world, per_class=10)
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    # The first step is one device; three per class are required: nine go first.
    engine.create(class_spec(steps=[1, "100%"], min_canaries_per_class=3))
    assert world.run(engine, "r1") == "completed"
    first = [m for m in engine.members("r1") if m["role"] == "canary" and m["step"] == 0]
    assert Counter(world.cpu_class[m["device_id"]] for m in first) == dict.fromkeys(CLASSES, 3)
    assign = audit(world, "rollout.assign")[0]
    assert assign["classes"] == dict.fromkeys(CLASSES, 3)
    verdict = audit(world, "rollout.verdict")[0]
    assert {v["required"] for v in verdict["classes"].values()} == {3}


def test_a_required_class_the_cohort_lacks_pauses_the_rollout_naming_it(world: World) -> None:
    fleet(world, per_class=10, classes=("x86-avx2", "arm-dotprod"))
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec(required_classes=["arm-i8mm"], max_bake_extensions=1))
    assert world.run(engine, "r1") == "paused"
    r = engine.get("r1")
    assert r["step"] == 0 and "insufficient data after 1 bake extensions" in r["reason"]
    assert "cpu.class=arm-i8mm (required): 0 of 1 required healthy canaries" in r["reason"]
    verdicts = audit(world, "rollout.verdict")
    assert [v["verdict"] for v in verdicts] == ["insufficient", "insufficient"]
    assert verdicts[0]["insufficient"] == ["cpu.class=arm-i8mm"]
    # The other classes passed on their own data.
    assert {k: v["verdict"] for k, v in verdicts[0]["classes"].items()} == {
        "arm-dotprod": "pass", "arm-i8mm": "insufficient", "x86-avx2": "pass"}


def test_old_agents_are_the_unknown_class_and_judged_as_one(world: World) -> None:
    fleet(world, per_class=30, classes=("x86-avx2", "arm-dotprod"))
    world.add(30, prefix="old-")  # no hardware in their births
    world.class_fail[(GOOD, UNKNOWN_CLASS)] = 0.2
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec())
    assert world.run(engine, "r1") == "rolled_back"
    verdict = audit(world, "rollout.verdict")[-1]
    assert verdict["failed"] == ["cpu.class=(unknown)"]
    back = audit(world, "rollout.rolled_back")[-1]
    # Only devices that report a class: the selector cannot name "(unknown)".
    assert back["cohort_without_failed_classes"] == "region=eu,cpu.class"


def test_judging_per_class_can_be_turned_off(world: World) -> None:
    fleet(world)
    world.class_fail[(GOOD, "x86-avx2")] = 0.2
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec(hardware_label=None))
    # Pooled only: the regression is averaged away, as before this judging existed.
    assert world.run(engine, "r1") == "completed"
    assert all(v["classes"] == {} for v in audit(world, "rollout.verdict"))


def test_a_class_short_of_data_is_named_and_holds_nothing_up(world: World) -> None:
    world.add(30, prefix="x-", cpu_class="x86-avx2")
    world.add(2, prefix="n-", cpu_class="arm-neon")  # one canary, one control: too little
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec())
    assert world.run(engine, "r1") == "completed"
    verdicts = audit(world, "rollout.verdict")
    assert [v["verdict"] for v in verdicts] == ["pass", "pass"]
    assert all(v["insufficient"] == ["cpu.class=arm-neon"] for v in verdicts)
    reason = engine.get("r1")["reason"]
    assert reason.startswith("every step passed (passed; insufficient for cpu.class=arm-neon: "
                             "validation_failure_rate: "), reason
    assert "150 needed" in reason
    # The holdback is taken per class, never a class's last device: one control, one canary.
    roles = Counter((world.cpu_class[m["device_id"]], m["role"]) for m in engine.members("r1"))
    assert roles == {("arm-neon", "control"): 1, ("arm-neon", "canary"): 1,
                     ("x86-avx2", "control"): 6, ("x86-avx2", "canary"): 24}


def test_a_holdback_count_is_given_to_the_classes_in_turn(world: World) -> None:
    fleet(world, per_class=4)
    world.add(1, prefix="solo-", cpu_class="arm-neon")
    engine = RolloutEngine(world.store, world.assign, clock=world.clock)
    engine.create(class_spec(holdback=7, steps=["100%"]))
    engine.tick()
    held = Counter(world.cpu_class[m["device_id"]] for m in engine.members("r1")
                   if m["role"] == "control")
    # 7 over four classes in turn; the lone arm-neon device is never held back.
    assert held == {"arm-dotprod": 3, "x86-avx2": 2, "x86-avx512-vnni": 2}
