"""The rollout engine: a persisted state machine, advanced by idempotent ticks.

Everything a rollout knows lives in the store (``rollouts``,
``rollout_devices``, ``pins``), so a fleet that restarts simply ticks again
and carries on where it was. Per step:

``assigning``  pick devices (online first, spread over strata), point them at
               the candidate — at most ``max_parallel_downloads`` in flight;
``waiting``    until each reports ``healthy`` on the candidate; a device that
               fails, refuses, rolls itself back, or misses its deadline counts
               as a failed update ("installed" is never "healthy");
``baking``     after ``bake_s``, judge canary against control over the same
               window: pass → next step (or wait for approval), fail → roll
               the canaries back, pin the candidate for the cohort and stop,
               insufficient → extend the bake, up to ``max_bake_extensions``,
               then pause for an operator. Nothing passes by default, and a
               rolled-back rollout never restarts by itself.

Every transition and verdict goes to the audit log with its evidence.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, select, update

from quantfleet.fleet.cohorts import Selector
from quantfleet.fleet.store import Store, schema

from .gates import GateResult, Sample, combine, judge
from .samples import Member, read_samples
from .spec import RolloutSpec, resolve_count

log = logging.getLogger(__name__)

Assign = Callable[[Sequence[str], str, str], None]  # (device ids, variant, rollout id)
Resolve = Callable[[str], str]  # variant label -> catalog name

ACTIVE = ("running", "awaiting_approval", "paused")
FAILED_OUTCOMES = ("failed", "timeout")


class RolloutError(ValueError):
    """An operator request that cannot be carried out; the message says why."""


@dataclass
class StepVerdict:
    verdict: str
    gates: list[GateResult]
    strata: dict[str, list[GateResult]]
    window: tuple[float, float]
    canary_devices: int
    control_devices: int

    def evidence(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "window": list(self.window),
            "canary_devices": self.canary_devices,
            "control_devices": self.control_devices,
            "gates": [g.to_json() for g in self.gates],
            "strata": {k: [g.to_json() for g in v] for k, v in self.strata.items()},
        }


def _order(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random order: the same devices are picked after a restart."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()


class RolloutEngine:
    def __init__(self, store: Store, assign: Assign, resolve: Resolve | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.assign = assign
        self.resolve = resolve or (lambda v: v)
        self.clock = clock

    # -- reading ----------------------------------------------------------
    def get(self, rollout_id: str) -> dict[str, Any]:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(schema.rollouts)
                               .where(schema.rollouts.c.id == rollout_id)).first()
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        return dict(row._mapping)

    def spec(self, rollout_id: str) -> RolloutSpec:
        return RolloutSpec.model_validate(self.get(rollout_id)["spec"])

    def rollouts(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(schema.rollouts).order_by(schema.rollouts.c.created_at))
            return [dict(r._mapping) for r in rows]

    def members(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(schema.rollout_devices)
                                .where(schema.rollout_devices.c.rollout_id == rollout_id)
                                .order_by(schema.rollout_devices.c.step,
                                          schema.rollout_devices.c.device_id))
            return [dict(r._mapping) for r in rows]

    def pins(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(schema.pins))]

    # -- writing ----------------------------------------------------------
    def _set(self, rollout_id: str, **values: Any) -> None:
        values["updated_at"] = self.clock()
        with self.store.engine.begin() as conn:
            conn.execute(update(schema.rollouts).where(schema.rollouts.c.id == rollout_id)
                         .values(**values))

    def _audit(self, rollout_id: str, action: str, evidence: dict[str, Any],
               actor: str = "engine") -> None:
        self.store.audit(actor, action, f"rollout:{rollout_id}", evidence)

    def create(self, spec: RolloutSpec, actor: str = "operator", unpin: bool = False) -> None:
        to_name = self.resolve(spec.to_variant)
        from_name = self.resolve(spec.from_variant)
        with self.store.engine.begin() as conn:
            if conn.execute(select(schema.rollouts.c.id)
                            .where(schema.rollouts.c.id == spec.name)).first():
                raise RolloutError(f"a rollout named {spec.name!r} exists; rollout names are "
                                   "never reused (the audit log refers to them)")
            busy = conn.execute(select(schema.rollouts.c.id, schema.rollouts.c.spec)
                                .where(schema.rollouts.c.state.in_(ACTIVE))).all()
            for other_id, other in busy:
                if other["cohort"] == spec.cohort:
                    raise RolloutError(f"rollout {other_id!r} is still active on cohort "
                                       f"{spec.cohort!r}")
            pinned = conn.execute(select(schema.pins).where(and_(
                schema.pins.c.cohort == spec.cohort, schema.pins.c.variant == to_name))).first()
            if pinned and not unpin:
                raise RolloutError(
                    f"{to_name} is pinned off cohort {spec.cohort!r} since rollout "
                    f"{pinned.rollout_id!r} ({pinned.reason}); pass --unpin to try it again")
            if pinned:
                conn.execute(delete(schema.pins).where(and_(
                    schema.pins.c.cohort == spec.cohort, schema.pins.c.variant == to_name)))
            now = self.clock()
            doc = spec.model_dump(mode="json", by_alias=True)
            doc["from"], doc["to"] = from_name, to_name
            conn.execute(schema.rollouts.insert().values(
                id=spec.name, spec=doc, state="running", step=0, phase="assigning",
                phase_started_at=now, bake_extensions=0, reason="", created_at=now,
                updated_at=now))
        self._audit(spec.name, "rollout.create", {"spec": doc, "unpinned": bool(pinned)}, actor)

    # -- operator controls -------------------------------------------------
    def pause(self, rollout_id: str, actor: str = "operator") -> None:
        r = self.get(rollout_id)
        if r["state"] != "running":
            raise RolloutError(f"rollout {rollout_id!r} is {r['state']}, not running")
        self._set(rollout_id, state="paused", reason=f"paused by {actor}")
        self._audit(rollout_id, "rollout.pause", {}, actor)

    def resume(self, rollout_id: str, actor: str = "operator") -> None:
        r = self.get(rollout_id)
        if r["state"] != "paused":
            raise RolloutError(f"rollout {rollout_id!r} is {r['state']}, not paused")
        # A bake that ran out of extensions starts a fresh bake window.
        values: dict[str, Any] = {"state": "running", "reason": ""}
        if r["phase"] == "baking":
            values.update(phase_started_at=self.clock(), bake_extensions=0)
        self._set(rollout_id, **values)
        self._audit(rollout_id, "rollout.resume", {}, actor)

    def promote(self, rollout_id: str, actor: str = "operator") -> None:
        """Approve the next step (manual approval), or push past a paused bake."""
        r = self.get(rollout_id)
        if r["state"] not in ("awaiting_approval", "paused"):
            raise RolloutError(f"rollout {rollout_id!r} is {r['state']}; only a rollout "
                               "awaiting approval or paused can be promoted")
        spec = self.spec(rollout_id)
        self._audit(rollout_id, "rollout.promote", {"step": r["step"]}, actor)
        self._advance(rollout_id, spec, r["step"])

    def abort(self, rollout_id: str, actor: str = "operator", reason: str = "") -> None:
        r = self.get(rollout_id)
        if r["state"] not in ACTIVE:
            raise RolloutError(f"rollout {rollout_id!r} is already {r['state']}")
        self._roll_back(rollout_id, self.spec(rollout_id), state="aborted",
                        reason=reason or f"aborted by {actor}", pin=False)
        self._audit(rollout_id, "rollout.abort", {"reason": reason}, actor)

    # -- the tick ---------------------------------------------------------
    def tick(self) -> None:
        """Advance every running rollout as far as the data allow; safe to call any time."""
        for r in self.rollouts():
            if r["state"] == "running":
                try:
                    self._tick_one(r["id"])
                except Exception:
                    log.exception("rollout %s: tick failed; retried next tick", r["id"])

    def _cohort(self, spec: RolloutSpec) -> list[dict[str, Any]]:
        sel = Selector.parse(spec.cohort)
        devices = self.store.devices(columns=("device_id", "labels", "variant", "online"))
        return [d for d in devices if sel.matches(d["labels"] or {})]

    def _tick_one(self, rollout_id: str) -> None:
        r = self.get(rollout_id)
        spec = self.spec(rollout_id)
        if r["phase"] == "assigning":
            self._assign_step(rollout_id, spec, r)
        elif r["phase"] == "waiting":
            self._wait_step(rollout_id, spec, r)
        elif r["phase"] == "baking":
            self._bake_step(rollout_id, spec, r)

    def _strata(self, spec: RolloutSpec, device: dict[str, Any]) -> str:
        if not spec.stratify_by:
            return "*"
        return str((device["labels"] or {}).get(spec.stratify_by, "(none)"))

    def _spread(self, rollout_id: str, spec: RolloutSpec,
                devices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Online devices first, then round-robin across strata, in a stable order."""
        buckets: dict[tuple[bool, str], list[dict[str, Any]]] = {}
        for d in sorted(devices, key=lambda d: _order(rollout_id, d["device_id"])):
            buckets.setdefault((not d["online"], self._strata(spec, d)), []).append(d)
        out: list[dict[str, Any]] = []
        for offline in (False, True):
            groups = [v for (off, _), v in sorted(buckets.items()) if off == offline]
            while any(groups):
                for g in groups:
                    if g:
                        out.append(g.pop(0))
        return out

    def _assign_step(self, rollout_id: str, spec: RolloutSpec, r: dict[str, Any]) -> None:
        now = self.clock()
        cohort = self._cohort(spec)
        members = {m["device_id"]: m for m in self.members(rollout_id)}
        rows = []
        if r["step"] == 0 and not any(m["role"] == "control" for m in members.values()):
            on_base = [d for d in cohort if d["variant"] in (spec.from_variant, None)]
            n_hold = resolve_count(spec.holdback, len(on_base))
            for d in self._spread(rollout_id, spec, on_base)[:n_hold]:
                rows.append({"rollout_id": rollout_id, "device_id": d["device_id"],
                             "role": "control", "step": 0, "stratum": self._strata(spec, d),
                             "assigned_at": now, "outcome": "control", "reason": ""})
                members[d["device_id"]] = rows[-1]
        controls = sum(1 for m in members.values() if m["role"] == "control")
        eligible_total = max(0, len(cohort) - controls)
        target = resolve_count(spec.steps[r["step"]], eligible_total)
        canaries = [m for m in members.values() if m["role"] == "canary"]
        in_flight = sum(1 for m in canaries if m["outcome"] == "pending")
        budget = max(0, spec.max_parallel_downloads - in_flight)
        need = min(max(0, target - len(canaries)), budget)
        candidates = [d for d in cohort if d["device_id"] not in members
                      and d["variant"] == spec.from_variant]
        picked = self._spread(rollout_id, spec, candidates)[:need]
        for d in picked:
            rows.append({"rollout_id": rollout_id, "device_id": d["device_id"], "role": "canary",
                         "step": r["step"], "stratum": self._strata(spec, d),
                         "assigned_at": now, "outcome": "pending", "reason": ""})
        if rows:
            with self.store.engine.begin() as conn:
                conn.execute(schema.rollout_devices.insert(), rows)
        if picked:
            self.assign([d["device_id"] for d in picked], spec.to_variant, rollout_id)
            self._audit(rollout_id, "rollout.assign", {
                "step": r["step"], "devices": [d["device_id"] for d in picked],
                "target": target, "controls": controls})
        if not canaries and not picked:
            # Nobody to judge: baking 0 canaries against the control would only run
            # out its extensions. Stay at assignment, paused, until an operator resumes.
            on_from = sum(1 for d in cohort if d["variant"] == spec.from_variant)
            reason = (f"no device of cohort {spec.cohort!r} can take step {r['step'] + 1}: "
                      f"{len(cohort)} in the cohort, {on_from} on {spec.from_variant}, "
                      f"{controls} held back as control; resume when devices are back")
            self._set(rollout_id, state="paused", reason=reason)
            self._audit(rollout_id, "rollout.pause", {"step": r["step"], "reason": reason,
                                                      "cohort_size": len(cohort)})
            return
        short = len(canaries) + len(picked) < target and not candidates[len(picked):]
        self._set(rollout_id, phase="waiting", phase_started_at=now,
                  reason=(f"only {len(canaries) + len(picked)} of {target} devices could be "
                          f"assigned (the rest are not on {spec.from_variant})") if short else "")

    def _wait_step(self, rollout_id: str, spec: RolloutSpec, r: dict[str, Any]) -> None:
        now = self.clock()
        self._reassign_lost(rollout_id, spec, now)
        devices = {d["device_id"]: d for d in self.store.devices()}
        changed = []
        for m in self.members(rollout_id):
            if m["role"] != "canary" or m["outcome"] != "pending":
                continue
            d = devices.get(m["device_id"], {})
            state = d.get("state") or {}
            fresh = (d.get("state_ts") or 0) >= m["assigned_at"]
            outcome, reason = "pending", ""
            if fresh and state.get("update_state") == "healthy" and \
                    d.get("variant") == spec.to_variant:
                outcome = "healthy"
            elif fresh and state.get("target") == spec.to_variant and \
                    state.get("update_state") in ("failed", "rolled_back", "refused"):
                outcome, reason = "failed", f"{state['update_state']}: {state.get('reason', '')}"
            elif now - m["assigned_at"] > spec.deadlines.total_s:
                outcome = "timeout"
                reason = (f"no healthy report within {spec.deadlines.total_s:.0f} s "
                          f"(last: {state.get('update_state', 'nothing')})")
            if outcome != "pending":
                changed.append((m["device_id"], outcome, reason))
        if changed:
            with self.store.engine.begin() as conn:
                for device_id, outcome, reason in changed:
                    conn.execute(update(schema.rollout_devices).where(and_(
                        schema.rollout_devices.c.rollout_id == rollout_id,
                        schema.rollout_devices.c.device_id == device_id)).values(
                        outcome=outcome, reason=reason[:1000]))
            self._audit(rollout_id, "rollout.device", {
                "step": r["step"], "outcomes": [
                    {"device": d, "outcome": o, "reason": why} for d, o, why in changed]})
        members = self.members(rollout_id)
        canaries = [m for m in members if m["role"] == "canary"]
        failed = [m for m in canaries if m["outcome"] in FAILED_OUTCOMES]
        if len(failed) > spec.max_failed_devices:
            self._roll_back(rollout_id, spec, state="rolled_back", pin=True,
                            reason=f"{len(failed)} device update(s) failed "
                            f"(tolerated {spec.max_failed_devices}): "
                            + "; ".join(f"{m['device_id']}: {m['reason']}" for m in failed[:5]))
            return
        cohort = self._cohort(spec)
        controls = sum(1 for m in members if m["role"] == "control")
        target = resolve_count(spec.steps[r["step"]], max(0, len(cohort) - controls))
        in_flight = sum(1 for m in canaries if m["outcome"] == "pending")
        known = {m["device_id"] for m in members}
        more = any(d["device_id"] not in known and d["variant"] == spec.from_variant
                   for d in cohort)
        if len(canaries) < target and more and in_flight < spec.max_parallel_downloads:
            self._set(rollout_id, phase="assigning")  # a download slot is free: assign more
            return
        if all(m["outcome"] != "pending" for m in canaries):
            self._set(rollout_id, phase="baking", phase_started_at=now, bake_extensions=0)
            self._audit(rollout_id, "rollout.bake", {"step": r["step"], "healthy": sum(
                1 for m in canaries if m["outcome"] == "healthy")})

    def _reassign_lost(self, rollout_id: str, spec: RolloutSpec, now: float) -> None:
        """Pending canaries whose desired state never went out (the fleet stopped part-way
        through an assignment) are assigned again, with a fresh deadline."""
        pending = [m["device_id"] for m in self.members(rollout_id)
                   if m["role"] == "canary" and m["outcome"] == "pending"]
        if not pending:
            return
        sent = {p.device_id for p in self.store.desired(pending) if p.variant == spec.to_variant}
        lost = [d for d in pending if d not in sent]
        if not lost:
            return
        with self.store.engine.begin() as conn:
            conn.execute(update(schema.rollout_devices).where(and_(
                schema.rollout_devices.c.rollout_id == rollout_id,
                schema.rollout_devices.c.device_id.in_(lost))).values(assigned_at=now))
        self.assign(lost, spec.to_variant, rollout_id)
        self._audit(rollout_id, "rollout.assign", {"devices": lost, "resumed": True})

    def samples(self, rollout_id: str, spec: RolloutSpec, window: tuple[float, float]
                ) -> tuple[dict[str, Sample], dict[str, Sample], int, int]:
        """Canary and control samples per stratum ("*" is all) over the same window.

        The canary is every healthy canary on the candidate; the control every device
        of the cohort still on the baseline that was never a canary. The store
        aggregates their requests (``samples.read_samples``).
        """
        members = self.members(rollout_id)
        canary = {m["device_id"]: m["stratum"] for m in members
                  if m["role"] == "canary" and m["outcome"] == "healthy"}
        ever_canary = {m["device_id"] for m in members if m["role"] == "canary"}
        control = {d["device_id"]: self._strata(spec, d) for d in self._cohort(spec)
                   if d["device_id"] not in ever_canary and d["variant"] == spec.from_variant}
        judged = {d: Member("canary", spec.to_variant, s) for d, s in canary.items()}
        judged.update({d: Member("control", spec.from_variant, s) for d, s in control.items()})
        with self.store.engine.begin() as conn:
            groups = read_samples(conn, judged, window)

        def side(name: str) -> dict[str, Sample]:
            strata = {k: v for (s, k), v in groups.items() if s == name}
            out = {"*": functools.reduce(Sample.merge, strata.values(), Sample())}
            if spec.stratify_by:
                out.update(strata)
            return out

        return side("canary"), side("control"), len(canary), len(control)

    def judge_step(self, rollout_id: str, spec: RolloutSpec,
                   window: tuple[float, float]) -> StepVerdict:
        canary, control, n_canary, n_control = self.samples(rollout_id, spec, window)
        gates = [judge(g.metric, canary["*"], control["*"], g.tolerance,
                       g.min_samples or spec.min_samples, g.alpha) for g in spec.gates]
        strata: dict[str, list[GateResult]] = {}
        for key in sorted(k for k in canary if k != "*"):
            if key in control:
                strata[key] = [judge(g.metric, canary[key], control[key], g.tolerance,
                                     g.min_samples or spec.min_samples, g.alpha)
                               for g in spec.gates]
        # A stratum that fails fails the step; strata with too little data of
        # their own do not hold up a step the overall data decide.
        verdict = combine(gates)
        if any(combine(v) == "fail" for v in strata.values()):
            verdict = "fail"
        return StepVerdict(verdict, gates, strata, window, n_canary, n_control)

    def _bake_step(self, rollout_id: str, spec: RolloutSpec, r: dict[str, Any]) -> None:
        now = self.clock()
        due = r["phase_started_at"] + spec.bake_s * (1 + r["bake_extensions"])
        if now < due:
            return
        result = self.judge_step(rollout_id, spec, (r["phase_started_at"], now))
        self._audit(rollout_id, "rollout.verdict", {"step": r["step"], **result.evidence()})
        if result.verdict == "fail":
            failing = [g for g in result.gates if g.verdict == "fail"] + [
                g for gs in result.strata.values() for g in gs if g.verdict == "fail"]
            self._roll_back(rollout_id, spec, state="rolled_back", pin=True,
                            reason="gate failed: " + "; ".join(
                                f"{g.metric}: {g.reason}" for g in failing[:3]))
        elif result.verdict == "insufficient":
            if r["bake_extensions"] < spec.max_bake_extensions:
                self._set(rollout_id, bake_extensions=r["bake_extensions"] + 1,
                          reason="insufficient data: bake extended")
            else:
                self._set(rollout_id, state="paused",
                          reason=f"insufficient data after {r['bake_extensions']} bake "
                          "extensions; promote or abort")
                self._audit(rollout_id, "rollout.pause", {"reason": "insufficient data"})
        else:
            self._advance(rollout_id, spec, r["step"])

    def _advance(self, rollout_id: str, spec: RolloutSpec, step: int) -> None:
        if step + 1 >= len(spec.steps):
            self._set(rollout_id, state="completed", reason="every step passed")
            self._audit(rollout_id, "rollout.complete", {"steps": len(spec.steps)})
            return
        r = self.get(rollout_id)
        if spec.manual_approval and r["state"] == "running":
            self._set(rollout_id, state="awaiting_approval",
                      reason=f"step {step + 1} passed; `rollout promote` to continue")
            return
        self._set(rollout_id, state="running", step=step + 1, phase="assigning",
                  phase_started_at=self.clock(), bake_extensions=0, reason="")
        self._audit(rollout_id, "rollout.step", {"step": step + 1,
                                                 "target": spec.steps[step + 1]})

    def _roll_back(self, rollout_id: str, spec: RolloutSpec, *, state: str, reason: str,
                   pin: bool) -> None:
        members = [m for m in self.members(rollout_id) if m["role"] == "canary"]
        ids = [m["device_id"] for m in members]
        if ids:
            self.assign(ids, spec.from_variant, rollout_id)
            with self.store.engine.begin() as conn:
                conn.execute(update(schema.rollout_devices).where(and_(
                    schema.rollout_devices.c.rollout_id == rollout_id,
                    schema.rollout_devices.c.role == "canary")).values(outcome="rolled_back"))
        if pin:
            with self.store.engine.begin() as conn:
                exists = conn.execute(select(schema.pins).where(and_(
                    schema.pins.c.cohort == spec.cohort,
                    schema.pins.c.variant == spec.to_variant))).first()
                if not exists:
                    conn.execute(schema.pins.insert().values(
                        cohort=spec.cohort, variant=spec.to_variant, rollout_id=rollout_id,
                        pinned_at=self.clock(), reason=reason[:1000]))
        self._set(rollout_id, state=state, reason=reason[:2000])
        self._audit(rollout_id, f"rollout.{state}", {"reason": reason, "devices": ids,
                                                     "pinned": pin})
