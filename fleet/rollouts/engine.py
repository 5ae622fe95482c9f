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
               window — pooled, per hardware class and per stratum
               (``verdict.py``): pass → next step (or wait for approval), fail
               → roll the canaries back, pin the candidate for the cohort and
               stop, insufficient → extend the bake, up to
               ``max_bake_extensions``, then pause for an operator. Nothing
               passes by default, and a rolled-back rollout never restarts by
               itself.

Picks are spread round-robin over cells (hardware class x stratum), and a
spec's per-class minimum of canaries is picked first.

Every transition and verdict goes to the audit log with its evidence.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import and_, delete, select, update

from quantfleet.fleet.cohorts import Selector
from quantfleet.fleet.store import Store, schema

from .gates import combine
from .samples import Member, read_samples
from .spec import UNKNOWN_CLASS, RolloutSpec, resolve_count
from .verdict import (
    Cell,
    GroupKey,
    GroupSamples,
    StepVerdict,
    cell_of,
    cell_reader,
    decide,
    dimensions,
    merge_cells,
)

log = logging.getLogger(__name__)

Assign = Callable[[Sequence[str], str, str], None]  # (device ids, variant, rollout id)
Resolve = Callable[[str], str]  # variant label -> catalog name

ACTIVE = ("running", "awaiting_approval", "paused")
FAILED_OUTCOMES = ("failed", "timeout")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")  # a selector's value (cohorts.py)

__all__ = ["RolloutEngine", "RolloutError", "StepVerdict"]


class RolloutError(ValueError):
    """An operator request that cannot be carried out; the message says why."""


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

    def _stratum(self, spec: RolloutSpec, device: dict[str, Any]) -> str:
        """What ``rollout_devices.stratum`` records: the device's cell when it was picked
        (hardware class and stratum, "|"-joined; "*" when neither is judged). A record
        only: a step is judged on the labels the devices have then."""
        return "|".join(cell_of(spec, device["labels"]))[:64] or "*"

    def _class(self, spec: RolloutSpec, device: Mapping[str, Any] | None) -> str:
        labels = (device or {}).get("labels") or {}
        return str(labels.get(spec.hardware_label, UNKNOWN_CLASS))

    def _spread(self, rollout_id: str, spec: RolloutSpec,
                devices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Online devices first, then round-robin across cells (hardware class and
        stratum), in a stable order."""
        buckets: dict[tuple[bool, Cell], list[dict[str, Any]]] = {}
        cell = cell_reader(spec)
        for d in sorted(devices, key=lambda d: _order(rollout_id, d["device_id"])):
            buckets.setdefault((not d["online"], cell(d["labels"])), []).append(d)
        out: list[dict[str, Any]] = []
        for offline in (False, True):
            groups = [v for (off, _), v in sorted(buckets.items()) if off == offline]
            while any(groups):
                for g in groups:
                    if g:
                        out.append(g.pop(0))
        return out

    def _holdback(self, rollout_id: str, spec: RolloutSpec,
                  on_base: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The devices kept on the baseline as the concurrent control, in spread order.

        Per hardware class: a percentage of each class (rounded up), a count given to
        the classes in turn — never a class's last device, so a class is never held
        back whole and never goes without a device that can be a canary.
        """
        order = self._spread(rollout_id, spec, on_base)
        if not spec.hardware_label:
            return order[:resolve_count(spec.holdback, len(order))]
        by_class: dict[str, list[dict[str, Any]]] = {}
        for d in order:
            by_class.setdefault(self._class(spec, d), []).append(d)
        room = {c: len(ds) - 1 for c, ds in by_class.items()}
        if isinstance(spec.holdback, str):
            take = {c: min(room[c], resolve_count(spec.holdback, len(ds)))
                    for c, ds in by_class.items()}
        else:
            take = dict.fromkeys(by_class, 0)
            left = min(spec.holdback, sum(room.values()))
            while left:
                for c in sorted(by_class):
                    if left and take[c] < room[c]:
                        take[c], left = take[c] + 1, left - 1
        held = {d["device_id"] for c, ds in by_class.items() for d in ds[:take[c]]}
        return [d for d in order if d["device_id"] in held]

    def _class_minimum(self, spec: RolloutSpec, cohort: Sequence[dict[str, Any]],
                       members: Iterable[Mapping[str, Any]]) -> dict[str, int]:
        """Healthy canaries each required class needs; the classes of the cohort are those
        of its devices on either variant or in the rollout."""
        if not (spec.required_classes or spec.min_canaries_per_class):
            return {}
        known = {m["device_id"] for m in members}
        return spec.class_minimum({
            self._class(spec, d) for d in cohort
            if d["variant"] in (spec.from_variant, spec.to_variant) or d["device_id"] in known})

    def _class_picks(self, rollout_id: str, spec: RolloutSpec,
                     cohort: Sequence[dict[str, Any]], members: Sequence[Mapping[str, Any]],
                     candidates: Sequence[dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], list[str]]:
        """Candidates to pick first so that every required class reaches its minimum of
        canaries (failed ones do not count: they are replaced), and the classes that
        cannot reach it with the devices there are (for the reason)."""
        minimum = self._class_minimum(spec, cohort, members)
        if not minimum:
            return [], []
        by_id = {d["device_id"]: d for d in cohort}
        have = Counter(self._class(spec, by_id.get(m["device_id"])) for m in members
                       if m["role"] == "canary" and m["outcome"] not in FAILED_OUTCOMES)
        order = self._spread(rollout_id, spec, candidates)
        picks: list[dict[str, Any]] = []
        short: list[str] = []
        for cls, n in sorted(minimum.items()):
            if have[cls] >= n:
                continue
            mine = [d for d in order if self._class(spec, d) == cls][:n - have[cls]]
            picks += mine
            if have[cls] + len(mine) < n:
                short.append(f"{spec.hardware_label}={cls} can have {have[cls] + len(mine)} "
                             f"of the {n} canaries it requires")
        return picks, short

    def _assign_step(self, rollout_id: str, spec: RolloutSpec, r: dict[str, Any]) -> None:
        now = self.clock()
        cohort = self._cohort(spec)
        members = {m["device_id"]: m for m in self.members(rollout_id)}
        rows = []
        if r["step"] == 0 and not any(m["role"] == "control" for m in members.values()):
            on_base = [d for d in cohort if d["variant"] in (spec.from_variant, None)]
            for d in self._holdback(rollout_id, spec, on_base):
                rows.append({"rollout_id": rollout_id, "device_id": d["device_id"],
                             "role": "control", "step": 0, "stratum": self._stratum(spec, d),
                             "assigned_at": now, "outcome": "control", "reason": ""})
                members[d["device_id"]] = rows[-1]
        controls = sum(1 for m in members.values() if m["role"] == "control")
        eligible_total = max(0, len(cohort) - controls)
        target = resolve_count(spec.steps[r["step"]], eligible_total)
        canaries = [m for m in members.values() if m["role"] == "canary"]
        in_flight = sum(1 for m in canaries if m["outcome"] == "pending")
        budget = max(0, spec.max_parallel_downloads - in_flight)
        candidates = [d for d in cohort if d["device_id"] not in members
                      and d["variant"] == spec.from_variant]
        # A required class's minimum comes first, even past the step's own count.
        first, class_short = self._class_picks(rollout_id, spec, cohort,
                                               list(members.values()), candidates)
        taken = {d["device_id"] for d in first}
        rest = [d for d in self._spread(rollout_id, spec, candidates)
                if d["device_id"] not in taken]
        need = min(max(target - len(canaries), len(first)), budget)
        picked = (first + rest)[:need]
        for d in picked:
            rows.append({"rollout_id": rollout_id, "device_id": d["device_id"], "role": "canary",
                         "step": r["step"], "stratum": self._stratum(spec, d),
                         "assigned_at": now, "outcome": "pending", "reason": ""})
        if rows:
            with self.store.engine.begin() as conn:
                conn.execute(schema.rollout_devices.insert(), rows)
        if picked:
            self.assign([d["device_id"] for d in picked], spec.to_variant, rollout_id)
            evidence: dict[str, Any] = {
                "step": r["step"], "devices": [d["device_id"] for d in picked],
                "target": target, "controls": controls}
            if spec.hardware_label:
                evidence["classes"] = dict(sorted(Counter(
                    self._class(spec, d) for d in picked).items()))
            self._audit(rollout_id, "rollout.assign", evidence)
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
        notes = []
        if len(canaries) + len(picked) < target and len(picked) == len(candidates):
            notes.append(f"only {len(canaries) + len(picked)} of {target} devices could be "
                         f"assigned (the rest are not on {spec.from_variant})")
        notes += class_short
        self._set(rollout_id, phase="waiting", phase_started_at=now, reason="; ".join(notes))

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
        candidates = [d for d in cohort
                      if d["device_id"] not in known and d["variant"] == spec.from_variant]
        class_first, _ = self._class_picks(rollout_id, spec, cohort, members, candidates)
        if ((len(canaries) < target and candidates) or class_first) and \
                in_flight < spec.max_parallel_downloads:
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
                ) -> tuple[dict[GroupKey, GroupSamples], dict[str, int]]:
        """Canary and control per group — the pool (``verdict.POOL``), each hardware class
        and each stratum — over the same window, and the canaries each required class
        needs.

        The canary is every healthy canary on the candidate; the control every device
        of the cohort still on the baseline that was never a canary; each is in the
        cell its labels say now. The store aggregates their requests per cell in one
        read (``samples.read_samples``), which are summed into the groups here.
        """
        members = self.members(rollout_id)
        devices = self.store.devices(columns=("device_id", "labels", "variant", "online"))
        sel = Selector.parse(spec.cohort)
        labels = {d["device_id"]: d["labels"] or {} for d in devices}
        cohort = [d for d in devices if sel.matches(d["labels"] or {})]
        ever_canary = {m["device_id"] for m in members if m["role"] == "canary"}
        cell = cell_reader(spec)
        judged = {m["device_id"]: Member("canary", spec.to_variant,
                                         cell(labels.get(m["device_id"])))
                  for m in members if m["role"] == "canary" and m["outcome"] == "healthy"}
        judged.update({d["device_id"]: Member("control", spec.from_variant, cell(d["labels"]))
                       for d in cohort if d["device_id"] not in ever_canary
                       and d["variant"] == spec.from_variant})
        with self.store.engine.begin() as conn:
            read = read_samples(conn, judged, window)
        devices = Counter((m.side, m.cell) for m in judged.values())
        cells = {c: GroupSamples(canary_devices=devices[("canary", c)],
                                 control_devices=devices[("control", c)])
                 for c in {c for _, c in devices}}
        for (side, c), sample in read.items():
            setattr(cells[c], side, sample)
        return (merge_cells(cells, dimensions(spec)),
                self._class_minimum(spec, cohort, members))

    def judge_step(self, rollout_id: str, spec: RolloutSpec,
                   window: tuple[float, float]) -> StepVerdict:
        """Every gate on the pool, each hardware class and each stratum (``verdict``)."""
        groups, required = self.samples(rollout_id, spec, window)
        return decide(spec, groups, window, required)

    def _bake_step(self, rollout_id: str, spec: RolloutSpec, r: dict[str, Any]) -> None:
        now = self.clock()
        due = r["phase_started_at"] + spec.bake_s * (1 + r["bake_extensions"])
        if now < due:
            return
        result = self.judge_step(rollout_id, spec, (r["phase_started_at"], now))
        self._audit(rollout_id, "rollout.verdict", {"step": r["step"], **result.evidence()})
        if result.verdict == "fail":
            self._roll_back(rollout_id, spec, state="rolled_back", pin=True,
                            reason=result.reason, detail=self._failure(spec, result))
        elif result.verdict == "insufficient":
            if r["bake_extensions"] < spec.max_bake_extensions:
                self._set(rollout_id, bake_extensions=r["bake_extensions"] + 1,
                          reason=f"{result.reason}; bake extended "
                          f"({r['bake_extensions'] + 1} of {spec.max_bake_extensions})")
            else:
                self._set(rollout_id, state="paused",
                          reason=f"insufficient data after {r['bake_extensions']} bake "
                          f"extensions; promote or abort ({result.reason})")
                self._audit(rollout_id, "rollout.pause", {"reason": "insufficient data",
                                                          "detail": result.reason,
                                                          "insufficient": [
                                                              g.name for g in result.insufficient]})
        else:
            self._advance(rollout_id, spec, r["step"], note=result.reason)

    def _failure(self, spec: RolloutSpec, result: StepVerdict) -> dict[str, Any]:
        """What the rollback record says about the failure: which groups failed, with the
        evidence of each failing gate, and — when only some hardware classes failed — the
        cohort without them (the candidate stays pinned off the whole cohort)."""
        out: dict[str, Any] = {
            "step_verdict": result.verdict, "pooled": combine(result.gates),
            "failed": [g.name for g in result.failed],
            "failed_classes": {g.value: {
                "canary_devices": g.canary_devices, "control_devices": g.control_devices,
                "gates": [x.to_json() for x in g.gates if x.verdict == "fail"]}
                for g in result.classes if g.verdict == "fail"},
        }
        failed = result.failed_classes
        if spec.hardware_label and failed and len(failed) < len(result.classes):
            named = [c for c in failed if c != UNKNOWN_CLASS]
            if all(_TOKEN.match(c) for c in named):
                terms = [] if spec.cohort.strip() == "*" else [spec.cohort.strip()]
                if UNKNOWN_CLASS in failed:
                    terms.append(spec.hardware_label)  # only devices that report a class
                if named:
                    terms.append(f"{spec.hardware_label}!={'|'.join(named)}")
                out["cohort_without_failed_classes"] = ",".join(terms)
        return out

    def _advance(self, rollout_id: str, spec: RolloutSpec, step: int, note: str = "") -> None:
        """The next step; ``note``: what the passing verdict said (classes it passed short
        of data), kept in the reason while the rollout waits or is done."""
        after = f" ({note})" if note else ""
        if step + 1 >= len(spec.steps):
            self._set(rollout_id, state="completed", reason="every step passed" + after)
            self._audit(rollout_id, "rollout.complete", {"steps": len(spec.steps)})
            return
        r = self.get(rollout_id)
        if spec.manual_approval and r["state"] == "running":
            self._set(rollout_id, state="awaiting_approval",
                      reason=f"step {step + 1} passed{after}; `rollout promote` to continue")
            return
        self._set(rollout_id, state="running", step=step + 1, phase="assigning",
                  phase_started_at=self.clock(), bake_extensions=0, reason="")
        self._audit(rollout_id, "rollout.step", {"step": step + 1,
                                                 "target": spec.steps[step + 1]})

    def _roll_back(self, rollout_id: str, spec: RolloutSpec, *, state: str, reason: str,
                   pin: bool, detail: Mapping[str, Any] | None = None) -> None:
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
                                                     "pinned": pin, **(detail or {})})
