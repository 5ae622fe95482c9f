"""The rollout's transition table (fleet/rollouts/states.py) as the specification: what
each state may do, the refusals an operator sees, a decision made from a stale row, and
the engine's only way to the store (the repository)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantfleet.fleet.rollouts import states
from quantfleet.fleet.rollouts.engine import RolloutEngine, RolloutError
from quantfleet.fleet.rollouts.states import ENDED, STATES, TRANSITIONS, check

from .test_rollout_engine import BAD, World, actions, spec
from .test_rollout_engine import world as world  # the fixture: both stores

ROOT = Path(__file__).resolve().parents[2]


def row(state: str, phase: str = "assigning") -> dict[str, str]:
    return {"state": state, "phase": phase}


def test_the_table_names_only_known_states_and_the_ends_are_final() -> None:
    for (source, _event), targets in TRANSITIONS.items():
        assert source in STATES and targets <= set(STATES)
    assert not [k for k in TRANSITIONS if k[0] in ENDED]  # nothing leaves an end
    # Every state but the ends can be left, and every end can be reached.
    assert {s for s, _ in TRANSITIONS} == set(STATES) - set(ENDED)
    assert set(ENDED) <= {t for ts in TRANSITIONS.values() for t in ts}


@pytest.mark.parametrize(("now", "action", "message"), [
    (row("completed", "baking"), "promote",
     "cannot promote rollout 'r1': it is completed, not awaiting_approval or paused; a "
     "rollout that has ended never moves again (create a new one)"),
    (row("rolled_back", "waiting"), "resume",
     "cannot resume rollout 'r1': it is rolled_back, not paused; a rollout that has "
     "ended never moves again (create a new one)"),
    (row("aborted"), "abort",
     "cannot abort rollout 'r1': it is aborted, not running, awaiting_approval or "
     "paused; a rollout that has ended never moves again (create a new one)"),
    (row("awaiting_approval", "baking"), "resume",
     "cannot resume rollout 'r1': it is awaiting_approval, not paused"),
    (row("paused"), "pause", "cannot pause rollout 'r1': it is paused, not running"),
    (row("running", "waiting"), "promote",
     "cannot promote rollout 'r1': it is running (waiting), not awaiting_approval or "
     "paused"),
])
def test_an_illegal_transition_names_the_rollout_its_state_and_the_action(
        now: dict[str, str], action: str, message: str) -> None:
    with pytest.raises(RolloutError) as refused:
        check("r1", now, action, "assigning")
    assert str(refused.value) == message


def test_an_event_can_only_lead_where_the_table_says() -> None:
    check("r1", row("running", "baking"), "advance", "awaiting_approval")
    with pytest.raises(RolloutError, match="internal: advance cannot take rollout 'r1' "
                       "from baking to rolled_back"):
        check("r1", row("running", "baking"), "advance", "rolled_back")
    with pytest.raises(RolloutError, match="'jump' is not a rollout event"):
        check("r1", row("running"), "jump", "completed")


def test_the_engine_refuses_operator_actions_that_do_not_apply(world: World) -> None:
    world.add(12)
    assigned: list[tuple[str, ...]] = []

    def assign(ids: object, variant: str, rollout_id: str) -> None:
        assigned.append(tuple(ids))  # type: ignore[arg-type]
        world.assign(ids, variant, rollout_id)  # type: ignore[arg-type]

    engine = RolloutEngine(world.store, assign, clock=world.clock)
    engine.create(spec(steps=["100%"]))
    assert world.run(engine, "r1") == "completed"
    before, sent = (engine.get("r1"), actions(world)), len(assigned)
    for action in ("promote", "resume", "pause", "abort"):
        with pytest.raises(RolloutError, match=f"cannot {action} rollout 'r1': it is "
                           "completed, not .*; a rollout that has ended never moves again"):
            getattr(engine, action)("r1")
    # Refused before anything was written or sent.
    assert (engine.get("r1"), actions(world)) == before and len(assigned) == sent

    engine.create(spec(name="r2", to=BAD))
    assert world.run(engine, "r2") == "rolled_back"
    with pytest.raises(RolloutError, match="cannot resume rollout 'r2': it is rolled_back, "
                       "not paused"):
        engine.resume("r2")
    with pytest.raises(RolloutError, match="cannot promote rollout 'r2': it is rolled_back"):
        engine.promote("r2")


def test_a_decision_on_a_stale_row_is_refused_and_the_operator_wins(world: World) -> None:
    """The fleet ticks while an operator pauses the rollout from another process: the
    tick's transition (assigning -> waiting) finds the row changed and writes nothing."""
    world.add(10)
    operator = RolloutEngine(world.store, world.assign, clock=world.clock)

    def assign_then_pause(ids: object, variant: str, rollout_id: str) -> None:
        world.assign(ids, variant, rollout_id)  # type: ignore[arg-type]
        operator.pause(rollout_id, actor="alice")  # meanwhile, in the other process

    fleet = RolloutEngine(world.store, assign_then_pause, clock=world.clock)
    fleet.create(spec(steps=[2, "100%"]))
    fleet.tick()  # logs the refusal; retried next tick
    r = fleet.get("r1")
    assert (r["state"], r["phase"], r["reason"]) == ("paused", "assigning", "paused by alice")
    # The picks are recorded with the members, before their desired state is set.
    assert actions(world) == ["rollout.create", "rollout.assign", "rollout.pause"]
    with pytest.raises(RolloutError, match=r"rollout 'r1' changed while this was decided "
                       r"\(it was running/assigning, it is paused/assigning\)"):
        fleet._move({**r, "state": "running"}, "assign", "waiting")
    # Resumed, the rollout carries on from where it is, with the canaries it has.
    fleet.assign = world.assign
    operator.resume("r1")
    fleet.tick()
    r = fleet.get("r1")
    assert (r["state"], r["phase"]) == ("running", "waiting")
    assert len([m for m in fleet.members("r1") if m["role"] == "canary"]) == 2
    assert actions(world).count("rollout.assign") == 1


def test_the_engine_reaches_the_store_only_through_its_repository() -> None:
    source = (ROOT / "fleet" / "rollouts" / "engine.py").read_text()
    assert not re.search(r"store\.engine|schema\.|sqlalchemy", source)


def test_docs_print_the_transition_table() -> None:
    """docs/rollouts.md's table of transitions is the code's."""
    doc = (ROOT / "docs" / "rollouts.md").read_text()
    table = doc.split("<!-- transitions -->")[1].split("<!-- /transitions -->")[0]
    rows = [[c.strip(" `") for c in line.strip("|").split("|")]
            for line in table.strip().splitlines()[2:] if line.startswith("|")]
    documented = {(s.strip(" `"), event): frozenset(t.strip(" `") for t in to.split(","))
                  for sources, event, to, *_ in rows for s in sources.split(",")}
    assert documented == states.TRANSITIONS
