"""Rollout leases on both engines: one replica leads a rollout at a time, a lease not
renewed is taken over with the next token, and a leader that lost its lease — paused in
the middle of a tick, then resumed — writes nothing (fleet/rollouts/leases.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.rollouts.leases import LeaseLost, RolloutLeases, leases
from quantfleet.fleet.rollouts.repository import AuditRecord
from quantfleet.fleet.store import Store

from .test_rollout_engine import GOOD, World, _desired, spec

LEASE_S = 1.0


def handovers(store: Store, rollout: str = "r1") -> list[dict[str, object]]:
    return [a["evidence"] for a in reversed(store.audit_log(f"rollout:{rollout}", 1000))
            if a["action"] == "rollout.leader"]


def test_one_replica_holds_a_lease_until_it_expires_then_the_next_takes_it_over(
        store_url: str) -> None:
    store = Store(store_url)
    a = RolloutLeases(store, LEASE_S, holder="replica-a")
    b = RolloutLeases(store, LEASE_S, holder="replica-b")
    try:
        assert a.hold("r1") == 1
        assert b.hold("r1") is None  # live: A's
        assert a.hold("r1") == 1  # renewed, same token
        assert b.hold("r2") == 1  # another rollout is free
        time.sleep(LEASE_S + 0.2)  # A stops renewing r1
        assert b.hold("r1") == 2
        assert a.hold("r1") is None and a.held == {}
        assert b.held == {"r1": 2, "r2": 1}
        stored = leases(store)
        assert (stored["r1"].holder, stored["r1"].token, stored["r1"].live) == (
            "replica-b", 2, True)
        trail = handovers(store)
        assert [(e["holder"], e["token"]) for e in trail] == [("replica-a", 1), ("replica-b", 2)]
        previous = trail[1]["previous"]
        assert isinstance(previous, dict)
        assert previous["holder"] == "replica-a" and previous["token"] == 1
        assert previous["expired_s_ago"] >= 0 and previous["released"] is False
    finally:
        store.close()


def test_a_released_lease_is_taken_at_the_next_replicas_tick(store_url: str) -> None:
    store = Store(store_url)
    a = RolloutLeases(store, 60, holder="replica-a")
    b = RolloutLeases(store, 60, holder="replica-b")
    try:
        assert a.hold("r1") == 1
        a.release_all()
        assert b.hold("r1") == 2  # no waiting out the 60 s
        assert handovers(store)[-1]["previous"]["released"] is True  # type: ignore[index]
    finally:
        store.close()


def test_on_an_exclusive_store_a_live_lease_of_a_process_gone_is_taken_at_once(
        tmp_path: object) -> None:
    store = Store(f"sqlite:///{tmp_path}/fleet.db")
    try:
        assert RolloutLeases(store, 60, holder="before-kill-9").hold("r1") == 1
        again = RolloutLeases(store, 60, holder="after-restart", exclusive=True)
        assert again.hold("r1") == 2
        assert "its process is gone" in str(handovers(store)[-1]["previous"])
    finally:
        store.close()


def test_writes_of_a_replica_without_the_lease_are_refused_in_their_transaction(
        store_url: str) -> None:
    store = Store(store_url)
    a = RolloutLeases(store, LEASE_S, holder="replica-a")
    b = RolloutLeases(store, LEASE_S, holder="replica-b")
    engine_a = RolloutEngine(store, lambda *_: None, leases=a)
    try:
        engine_a.create(spec())
        assert a.hold("r1") == 1
        engine_a.repo.audit("r1", [AuditRecord("test.note", {"by": "a"})])
        time.sleep(LEASE_S + 0.2)
        assert b.hold("r1") == 2
        before = len(store.audit_log("rollout:r1"))
        with pytest.raises(LeaseLost, match="replica-b"):
            engine_a.repo.audit("r1", [AuditRecord("test.note", {"by": "a, stale"})])
        row = engine_a.get("r1")
        with pytest.raises(LeaseLost):
            engine_a.repo.transition("r1", row, {"reason": "stale"})
        with pytest.raises(LeaseLost):
            store.put_desired("d000", lambda rev: _desired("d000", rev, GOOD), a.fence("r1"))
        assert len(store.audit_log("rollout:r1")) == before
        assert engine_a.get("r1")["reason"] == "" and store.desired(["d000"]) == []
    finally:
        store.close()


class PausingWorld(World):
    """Replica A's assignment pauses (as a stopped process would) until it is let go;
    each replica's assignment writes desired state through its own lease's fence, as
    the fleet service's does."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.paused = threading.Event()
        self.go_on = threading.Event()
        self.errors: list[BaseException] = []

    def assign_by(self, lease: RolloutLeases, pause: bool):  # type: ignore[no-untyped-def]
        def assign(ids: Sequence[str], variant: str, rollout_id: str) -> None:
            if pause:
                self.paused.set()
                self.go_on.wait(30)
            for d in ids:
                self.store.put_desired(d, lambda rev, d=d: _desired(d, rev, variant),
                                       lease.fence(rollout_id))
            self.pending.extend((d, variant) for d in ids)
        return assign


def test_a_replica_taking_a_rollout_over_sends_its_canaries_desired_state_again(
        store_url: str) -> None:
    """The leader may have stored a canary's desired state and died before the broker
    acknowledged it: the next leader publishes the stored revisions again."""
    store = Store(store_url)
    world = World(store)
    world.add(10)
    a = RolloutLeases(store, LEASE_S, holder="replica-a")
    b = RolloutLeases(store, LEASE_S, holder="replica-b")
    sent: dict[str, list[list[str]]] = {"a": [], "b": []}
    engine_a = RolloutEngine(store, world.assign, clock=world.clock, leases=a,
                             resend=lambda ids: sent["a"].append(list(ids)))
    engine_b = RolloutEngine(store, world.assign, clock=world.clock, leases=b,
                             resend=lambda ids: sent["b"].append(list(ids)))
    try:
        engine_a.create(spec(steps=[2, "100%"]))
        engine_a.tick()  # takes the lease (no canaries yet) and assigns two
        canaries = [m["device_id"] for m in engine_a.members("r1") if m["role"] == "canary"]
        assert len(canaries) == 2 and sent["a"] == []
        engine_a.tick()  # renewed: nothing sent again
        engine_b.tick()
        assert sent["b"] == []  # A leads
        time.sleep(LEASE_S + 0.2)  # A is gone
        engine_b.tick()
        assert sent["b"] == [canaries]
        engine_b.tick()
        assert sent["b"] == [canaries]  # once, at the takeover
        assert {p.revision for p in store.desired(canaries)} == {1}  # re-sent, not re-set
    finally:
        store.close()


def test_a_leader_paused_mid_tick_and_resumed_after_a_takeover_writes_nothing(
        store_url: str) -> None:
    store = Store(store_url)
    world = PausingWorld(store)
    world.add(20)
    a = RolloutLeases(store, LEASE_S, holder="replica-a")
    b = RolloutLeases(store, LEASE_S, holder="replica-b")
    engine_a = RolloutEngine(store, world.assign_by(a, pause=True), clock=world.clock,
                             leases=a)
    engine_b = RolloutEngine(store, world.assign_by(b, pause=False), clock=world.clock,
                             leases=b)
    try:
        engine_a.create(spec(steps=[3, "100%"]))
        # A picks the first step's canaries, stores them as members, and stops before
        # their desired state is written.
        ticking = threading.Thread(target=engine_a.tick)
        ticking.start()
        assert world.paused.wait(10)
        canaries = [m["device_id"] for m in engine_a.members("r1") if m["role"] == "canary"]
        assert len(canaries) == 3 and store.desired(canaries) == []
        time.sleep(LEASE_S + 0.2)
        engine_b.tick()  # takes the lease over: the step is assigned, so it waits
        assert engine_b.get("r1")["phase"] == "waiting" and b.held == {"r1": 2}
        engine_b.tick()  # the canaries without desired state get it, from B
        assert {p.device_id: p.revision for p in store.desired(canaries)} == dict.fromkeys(
            canaries, 1)
        world.go_on.set()  # A resumes where it stopped: every write it tries is refused
        ticking.join(10)
        assert not ticking.is_alive()
        assert {p.device_id: p.revision for p in store.desired(canaries)} == dict.fromkeys(
            canaries, 1)
        assert engine_a.get("r1")["phase"] == "waiting" and a.held == {}
        engine_a.tick()  # and A leaves it to B from now on
        assert a.held == {}
        assigns = [a_["evidence"] for a_ in reversed(store.audit_log("rollout:r1", 1000))
                   if a_["action"] == "rollout.assign"]
        # A's picks, recorded with the members while it led; their desired state by B.
        assert [(e["devices"], e.get("resumed", False)) for e in assigns] == [
            (canaries, False), (canaries, True)]
        # The rest of the rollout goes on under B, each step decided once.
        for _ in range(30):
            engine_b.tick()
            world.devices_act()
            world.traffic(60, 20)
            if engine_b.get("r1")["state"] != "running":
                break
        assert engine_b.get("r1")["state"] == "completed"
        trail = [a_["action"] for a_ in reversed(store.audit_log("rollout:r1", 1000))]
        assert trail.count("rollout.step") == 1 and trail.count("rollout.complete") == 1
        revisions = [p.revision for p in store.desired()]
        assert revisions and max(revisions) == 1  # no device was pointed twice
    finally:
        world.go_on.set()
        store.close()
