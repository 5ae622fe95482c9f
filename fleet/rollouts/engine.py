"""The rollout engine: a state machine over the store, advanced by idempotent ticks.

Everything a rollout knows lives in the store (``rollouts``,
``rollout_devices``, ``pins``), read and written through ``RolloutRepository``,
so a fleet that restarts simply ticks again and carries on where it was. Every
change of state is an event of the table in ``states.py``, checked before it
is written and written with its audit records. Per step:

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

Pointing devices at a variant (``assign``) stores their desired state and
returns: the fleet's desired-state publisher sends it and retries it
(``fleet/desired.py``), so a tick never waits on the broker.

With ``leases`` (``quantfleet serve``; ``leases.py``) a tick advances only the
rollouts whose lease this replica holds or can take, renewing each lease just
before its rollout's tick, and every write of that tick is fenced by the
lease: several replicas on one store each tick, one of them per rollout.
Without (the operator's commands), writes are guarded by the compare-and-set
on the rollout's state alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..cohorts import Selector
from ..store import Store
from .gates import combine
from .leases import LeaseLost, RolloutLeases
from .repository import AuditRecord, Pin, RolloutRepository
from .samples import Member
from .spec import UNKNOWN_CLASS, RolloutSpec, resolve_count
from .states import RolloutError, check, columns_of
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
Resend = Callable[[Sequence[str]], object]  # device ids: publish their stored desired state
Resolve = Callable[[str], str]  # variant label -> catalog name

FAILED_OUTCOMES = ("failed", "timeout")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")  # a selector's value (cohorts.py)

__all__ = ["RolloutEngine", "RolloutError", "StepVerdict"]


def _order(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random order: the same devices are picked after a restart."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()


class RolloutEngine:
    def __init__(self, store: Store, assign: Assign, resolve: Resolve | None = None,
                 clock: Callable[[], float] = time.time, *,
                 leases: RolloutLeases | None = None, resend: Resend | None = None) -> None:
        self.store = store  # the CLI reads a rollout's audit log from it
        self.leases = leases
        self.resend = resend
        self.repo = RolloutRepository(store, clock,
                                      fence=leases.check if leases is not None else None)
        self.assign = assign
        self.resolve = resolve or (lambda v: v)
        self.clock = clock

    # -- reading ----------------------------------------------------------
    def get(self, rollout_id: str) -> dict[str, Any]:
        row = self.repo.get(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        return row

    def spec(self, rollout_id: str) -> RolloutSpec:
        return RolloutSpec.model_validate(self.get(rollout_id)["spec"])

    def rollouts(self) -> list[dict[str, Any]]:
        return self.repo.rollouts()

    def members(self, rollout_id: str) -> list[dict[str, Any]]:
        return self.repo.members(rollout_id)

    def pins(self) -> list[dict[str, Any]]:
        return self.repo.pins()

    # -- the state machine -------------------------------------------------
    def _move(self, r: Mapping[str, Any], event: str, to: str,
              audits: Sequence[AuditRecord] = (), *, pin: Pin | None = None,
              canaries_rolled_back: bool = False, **values: Any) -> None:
        """Take rollout ``r`` (its row as read) to state ``to`` by ``event`` — refused
        unless the transition table has it — writing ``values`` and ``audits`` with it."""
        check(r["id"], r, event, to)
        self.repo.transition(r["id"], r, {**columns_of(to, r["phase"]), **values}, audits,
                             pin=pin, canaries_rolled_back=canaries_rolled_back)

    def create(self, spec: RolloutSpec, actor: str = "operator", unpin: bool = False) -> None:
        to_name = self.resolve(spec.to_variant)
        from_name = self.resolve(spec.from_variant)
        doc = spec.model_dump(mode="json", by_alias=True)
        doc["from"], doc["to"] = from_name, to_name
        self.repo.create(spec.name, doc, cohort=spec.cohort, candidate=to_name, unpin=unpin,
                         actor=actor)

    # -- operator controls -------------------------------------------------
    def pause(self, rollout_id: str, actor: str = "operator") -> None:
        r = self.get(rollout_id)
        self._move(r, "pause", "paused", [AuditRecord("rollout.pause", {}, actor)],
                   reason=f"paused by {actor}")

    def resume(self, rollout_id: str, actor: str = "operator") -> None:
        r = self.get(rollout_id)
        # A bake that ran out of extensions starts a fresh bake window.
        values: dict[str, Any] = {"reason": ""}
        if r["phase"] == "baking":
            values.update(phase_started_at=self.clock(), bake_extensions=0)
        self._move(r, "resume", r["phase"], [AuditRecord("rollout.resume", {}, actor)],
                   **values)

    def promote(self, rollout_id: str, actor: str = "operator") -> None:
        """Approve the next step (manual approval), or push past a paused bake."""
        r = self.get(rollout_id)
        check(rollout_id, r, "promote", "assigning")  # refused before the spec is read
        self._advance(r, self.spec(rollout_id), "promote",
                      audits=[AuditRecord("rollout.promote", {"step": r["step"]}, actor)])

    def abort(self, rollout_id: str, actor: str = "operator", reason: str = "") -> None:
        r = self.get(rollout_id)
        self._roll_back(r, self.spec(rollout_id), event="abort", to="aborted",
                        reason=reason or f"aborted by {actor}", pin=False,
                        after=[AuditRecord("rollout.abort", {"reason": reason}, actor)])

    # -- the tick ---------------------------------------------------------
    def tick(self) -> None:
        """Advance every running rollout as far as the data allow — with leases, those
        this replica leads (taking the free and expired ones); safe to call any time."""
        running = [r["id"] for r in self.rollouts() if r["state"] == "running"]
        if self.leases is not None:
            self.leases.release_all(keep=running)  # ended, paused, awaiting approval
        for rollout_id in running:
            try:
                if self.leases is not None:
                    before = self.leases.held.get(rollout_id)
                    token = self.leases.hold(rollout_id)
                    if token is None:
                        continue  # another replica leads it
                    if token != before:
                        self._resend_canaries(rollout_id)
                started = time.monotonic()
                self._tick_one(rollout_id)
                took = time.monotonic() - started
                if self.leases is not None and took > self.leases.lease_s / 2:
                    log.warning("rollout %s: a tick took %.1f s, more than half the lease "
                                "(%g s): a pause between two writes that long hands the "
                                "rollout over; raise [rollouts] lease_s", rollout_id, took,
                                self.leases.lease_s)
            except LeaseLost as exc:  # taken over while this tick decided
                log.warning("%s; the new leader carries on", exc)
            except RolloutError as exc:  # e.g. paused by an operator meanwhile
                log.warning("rollout %s: %s; retried next tick", rollout_id, exc)
            except Exception:
                log.exception("rollout %s: tick failed; retried next tick", rollout_id)

    def _resend_canaries(self, rollout_id: str) -> None:
        """A rollout this replica has just taken: its canaries' stored desired state is
        published again (``resend``). The replica that stored it may have stopped before
        the broker acknowledged it — stored counts as sent (``_reassign_lost``), and
        only a restart of that replica would send it otherwise. Same revisions: a
        device that has it already ignores it."""
        if self.resend is None:
            return
        ids = [m["device_id"] for m in self.members(rollout_id) if m["role"] == "canary"]
        if ids:
            self.resend(ids)

    def _cohort(self, spec: RolloutSpec) -> list[dict[str, Any]]:
        sel = Selector.parse(spec.cohort)
        devices = self.repo.devices(columns=("device_id", "labels", "variant", "online"))
        return [d for d in devices if sel.matches(d["labels"] or {})]

    def _tick_one(self, rollout_id: str) -> None:
        r = self.get(rollout_id)
        spec = self.spec(rollout_id)
        if r["phase"] == "assigning":
            self._assign_step(r, spec)
        elif r["phase"] == "waiting":
            self._wait_step(r, spec)
        elif r["phase"] == "baking":
            self._bake_step(r, spec)

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

    def _assign_step(self, r: Mapping[str, Any], spec: RolloutSpec) -> None:
        rollout_id = r["id"]
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
        # The members with the record of the picks first, their desired state after: a
        # fleet that stops in between (or a leader killed there) finds pending canaries
        # without it and sets it again (``_reassign_lost``); the picks are never lost.
        picks: list[AuditRecord] = []
        if picked:
            evidence: dict[str, Any] = {
                "step": r["step"], "devices": [d["device_id"] for d in picked],
                "target": target, "controls": controls}
            if spec.hardware_label:
                evidence["classes"] = dict(sorted(Counter(
                    self._class(spec, d) for d in picked).items()))
            picks.append(AuditRecord("rollout.assign", evidence))
        self.repo.add_members(rows, picks)
        if picked:
            self.assign([d["device_id"] for d in picked], spec.to_variant, rollout_id)
        if not canaries and not picked:
            # Nobody to judge: baking 0 canaries against the control would only run
            # out its extensions. Stay at assignment, paused, until an operator resumes.
            on_from = sum(1 for d in cohort if d["variant"] == spec.from_variant)
            reason = (f"no device of cohort {spec.cohort!r} can take step {r['step'] + 1}: "
                      f"{len(cohort)} in the cohort, {on_from} on {spec.from_variant}, "
                      f"{controls} held back as control; resume when devices are back")
            self._move(r, "pause", "paused", [AuditRecord("rollout.pause", {
                "step": r["step"], "reason": reason, "cohort_size": len(cohort)})],
                reason=reason)
            return
        notes = []
        if len(canaries) + len(picked) < target and len(picked) == len(candidates):
            notes.append(f"only {len(canaries) + len(picked)} of {target} devices could be "
                         f"assigned (the rest are not on {spec.from_variant})")
        notes += class_short
        self._move(r, "assign", "waiting", phase_started_at=now, reason="; ".join(notes))

    def _wait_step(self, r: Mapping[str, Any], spec: RolloutSpec) -> None:
        rollout_id = r["id"]
        now = self.clock()
        self._reassign_lost(rollout_id, spec, now)
        devices = {d["device_id"]: d for d in self.repo.devices()}
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
            self.repo.record_outcomes(rollout_id, changed, AuditRecord("rollout.device", {
                "step": r["step"], "outcomes": [
                    {"device": d, "outcome": o, "reason": why} for d, o, why in changed]}))
        members = self.members(rollout_id)
        canaries = [m for m in members if m["role"] == "canary"]
        failed = [m for m in canaries if m["outcome"] in FAILED_OUTCOMES]
        if len(failed) > spec.max_failed_devices:
            self._roll_back(r, spec, event="roll_back", to="rolled_back", pin=True,
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
            self._move(r, "assign_more", "assigning")  # a download slot is free
            return
        if all(m["outcome"] != "pending" for m in canaries):
            self._move(r, "bake", "baking", [AuditRecord("rollout.bake", {
                "step": r["step"], "healthy": sum(
                    1 for m in canaries if m["outcome"] == "healthy")})],
                phase_started_at=now, bake_extensions=0)

    def _reassign_lost(self, rollout_id: str, spec: RolloutSpec, now: float) -> None:
        """Pending canaries whose desired state was never stored (the fleet stopped
        part-way through an assignment) are assigned again, with a fresh deadline.

        Stored is enough: a desired state the broker has not acknowledged yet is not
        lost — the fleet's publisher retries it, and re-publishes every stored one when
        the fleet starts."""
        pending = [m["device_id"] for m in self.members(rollout_id)
                   if m["role"] == "canary" and m["outcome"] == "pending"]
        if not pending:
            return
        stored = self.repo.desired_variants(pending)
        lost = [d for d in pending if stored.get(d) != spec.to_variant]
        if not lost:
            return
        self.repo.restart_deadlines(rollout_id, lost, now)
        self.assign(lost, spec.to_variant, rollout_id)
        self.repo.audit(rollout_id, [AuditRecord("rollout.assign",
                                                 {"devices": lost, "resumed": True})])

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
        sel = Selector.parse(spec.cohort)
        cell = cell_reader(spec)
        # Every device's labels are read each tick (how the judged set stands now), as
        # the stored JSON text: a fleet has few distinct label sets, each parsed, matched
        # and placed in its cell once, and devices of a cell and side share one Member.
        seen: dict[str | None, tuple[dict[str, str], bool, Cell]] = {}
        shared: dict[tuple[str, str, Cell], Member] = {}

        def info(text: str | None) -> tuple[dict[str, str], bool, Cell]:
            got = seen.get(text)
            if got is None:
                labels = (json.loads(text) if text else None) or {}
                got = seen[text] = (labels, sel.matches(labels), cell(labels))
            return got

        def member(side: str, variant: str, c: Cell) -> Member:
            return shared.setdefault((side, variant, c), Member(side, variant, c))

        rows = self.repo.device_labels()
        texts = {t: info(t) for t in {t for _, t, _ in rows}}
        healthy = {m["device_id"] for m in members
                   if m["role"] == "canary" and m["outcome"] == "healthy"}
        ever_canary = {m["device_id"] for m in members if m["role"] == "canary"}
        canary_cells = {d: texts[t][2] for d, t, _ in rows if d in healthy}
        unknown = cell(None)
        judged = {d: member("canary", spec.to_variant, canary_cells.get(d, unknown))
                  for d in healthy}
        controls = {t: member("control", spec.from_variant, x[2])
                    for t, x in texts.items() if x[1]}
        judged.update({d: controls[t] for d, t, v in rows
                       if v == spec.from_variant and t in controls and d not in ever_canary})
        read = self.repo.judged_samples(judged, window, rollout_id)
        sizes = Counter((m.side, m.cell) for m in judged.values())
        cells = {c: GroupSamples(canary_devices=sizes[("canary", c)],
                                 control_devices=sizes[("control", c)])
                 for c in {c for _, c in sizes}}
        for (side, c), sample in read.items():
            setattr(cells[c], side, sample)
        cohort = ([{"device_id": d, "labels": texts[t][0], "variant": v}
                   for d, t, v in rows if texts[t][1]]
                  if spec.required_classes or spec.min_canaries_per_class else [])
        return (merge_cells(cells, dimensions(spec)),
                self._class_minimum(spec, cohort, members))

    def judge_step(self, rollout_id: str, spec: RolloutSpec,
                   window: tuple[float, float]) -> StepVerdict:
        """Every gate on the pool, each hardware class and each stratum (``verdict``)."""
        groups, required = self.samples(rollout_id, spec, window)
        return decide(spec, groups, window, required)

    def _bake_step(self, r: Mapping[str, Any], spec: RolloutSpec) -> None:
        now = self.clock()
        due = r["phase_started_at"] + spec.bake_s * (1 + r["bake_extensions"])
        if now < due:
            return
        result = self.judge_step(r["id"], spec, (r["phase_started_at"], now))
        verdict = AuditRecord("rollout.verdict", {"step": r["step"], **result.evidence()})
        if result.verdict == "fail":
            self._roll_back(r, spec, event="roll_back", to="rolled_back", pin=True,
                            reason=result.reason, detail=self._failure(spec, result),
                            before=[verdict])
        elif result.verdict == "insufficient":
            if r["bake_extensions"] < spec.max_bake_extensions:
                self._move(r, "extend", "baking", [verdict],
                           bake_extensions=r["bake_extensions"] + 1,
                           reason=f"{result.reason}; bake extended "
                           f"({r['bake_extensions'] + 1} of {spec.max_bake_extensions})")
            else:
                self._move(r, "pause", "paused", [verdict, AuditRecord("rollout.pause", {
                    "reason": "insufficient data", "detail": result.reason,
                    "insufficient": [g.name for g in result.insufficient]})],
                    reason=f"insufficient data after {r['bake_extensions']} bake "
                    f"extensions; promote or abort ({result.reason})")
        else:
            self._advance(r, spec, "advance", note=result.reason, audits=[verdict])

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

    def _advance(self, r: Mapping[str, Any], spec: RolloutSpec, event: str, note: str = "",
                 audits: Sequence[AuditRecord] = ()) -> None:
        """The next step, by ``event``: ``advance`` (a passing bake, which waits for
        approval when the spec asks for it) or ``promote`` (the operator's approval).
        ``note``: what the passing verdict said (classes it passed short of data), kept
        in the reason while the rollout waits or is done."""
        step = r["step"]
        after = f" ({note})" if note else ""
        if step + 1 >= len(spec.steps):
            self._move(r, event, "completed", [*audits, AuditRecord(
                "rollout.complete", {"steps": len(spec.steps)})],
                reason="every step passed" + after)
            return
        if spec.manual_approval and event == "advance":
            self._move(r, event, "awaiting_approval", audits,
                       reason=f"step {step + 1} passed{after}; `rollout promote` to continue")
            return
        self._move(r, event, "assigning", [*audits, AuditRecord(
            "rollout.step", {"step": step + 1, "target": spec.steps[step + 1]})],
            step=step + 1, phase_started_at=self.clock(), bake_extensions=0, reason="")

    def _roll_back(self, r: Mapping[str, Any], spec: RolloutSpec, *, event: str, to: str,
                   reason: str, pin: bool, detail: Mapping[str, Any] | None = None,
                   before: Sequence[AuditRecord] = (),
                   after: Sequence[AuditRecord] = ()) -> None:
        """Every canary back to the baseline, then the rollout to ``to`` (``rolled_back``
        by the engine, pinning the candidate off the cohort, or ``aborted`` by an
        operator). The desired state goes first: a fleet that stops in between judges
        again and rolls back again, never leaves canaries on a rolled-back candidate."""
        check(r["id"], r, event, to)  # refused before any device is pointed anywhere
        ids = [m["device_id"] for m in self.members(r["id"]) if m["role"] == "canary"]
        if ids:
            self.assign(ids, spec.from_variant, r["id"])
        self._move(r, event, to, [*before, AuditRecord(f"rollout.{to}", {
            "reason": reason, "devices": ids, "pinned": pin, **(detail or {})}), *after],
            reason=reason[:2000], canaries_rolled_back=bool(ids),
            pin=Pin(spec.cohort, spec.to_variant, reason) if pin else None)
