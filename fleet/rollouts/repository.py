"""Every read and write the rollout engine makes, in one place: the ``rollouts``,
``rollout_devices`` and ``pins`` tables, the audit rows of a rollout, and what the
engine reads of the rest of the store (devices, stored desired state, judged
samples).

The engine decides; this class only persists, in the transactions that keep a
decision whole: a rollout is created with its uniqueness, active-cohort and pin
checks in one transaction; a state change is written together with its audit
records, and only if the row is still in the state the decision was made from
(a compare-and-set on ``state`` and ``phase``: an operator's command in another
process and a tick of the running fleet never both apply).

A repository made with a ``fence`` (the fleet's ticker: ``leases.py``) passes
every write about a rollout through it first, in the write's transaction: a
replica that lost the rollout's lease writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, delete, select, update

from ..store import Store, schema
from .gates import Sample
from .samples import Member, read_samples
from .states import ACTIVE, RolloutError
from .tally import WindowTallies


@dataclass(frozen=True)
class AuditRecord:
    """One audit row about a rollout (subject ``rollout:{id}``)."""

    action: str
    evidence: dict[str, Any] = field(default_factory=dict)
    actor: str = "engine"


@dataclass(frozen=True)
class Pin:
    """A candidate pinned off a cohort after a rollback."""

    cohort: str
    variant: str
    reason: str


#: Raises (``leases.LeaseLost``) inside a write transaction about the rollout it is
#: given when this process may not write it.
WriteFence = Callable[[Connection, str], None]


class RolloutRepository:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time, *,
                 fence: WriteFence | None = None) -> None:
        self.store = store
        self.clock = clock
        self.fence = fence
        self.tallies = WindowTallies()

    def _fenced(self, conn: Connection, rollout_id: str) -> None:
        if self.fence is not None:
            self.fence(conn, rollout_id)

    # -- reading ----------------------------------------------------------
    def get(self, rollout_id: str) -> dict[str, Any] | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(schema.rollouts)
                               .where(schema.rollouts.c.id == rollout_id)).first()
        return None if row is None else dict(row._mapping)

    def rollouts(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(schema.rollouts).order_by(schema.rollouts.c.created_at))
            return [dict(r._mapping) for r in rows]

    def members(self, rollout_id: str) -> list[dict[str, Any]]:
        rd = schema.rollout_devices
        with self.store.engine.connect() as conn:
            # SQLAlchemy compiles the query; the driver's cursor fetches the rows (a
            # step of 10,000 canaries is read every tick).
            q = (select(rd).where(rd.c.rollout_id == rollout_id)
                 .order_by(rd.c.step, rd.c.device_id))
            compiled = q.compile(dialect=conn.dialect)
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                params = compiled.construct_params()
                if conn.dialect.name == "sqlite":
                    cur.execute(str(compiled), [params[k] for k in compiled.positiontup or []])
                else:
                    cur.execute(str(compiled), params)
                names = [c.name for c in rd.columns]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            finally:
                cur.close()

    def pins(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(schema.pins))]

    def devices(self, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self.store.devices(columns=columns)
        return devices

    def device_labels(self) -> list[tuple[str, str | None, str | None]]:
        """``(device_id, labels as the stored JSON text, variant)`` of every device, from
        the driver's cursor directly: a tick reads them all, and at 100,000 devices
        SQLAlchemy's per-row result handling was most of a decision's time."""
        with self.store.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute("SELECT device_id, CAST(labels AS TEXT), variant FROM devices")
                rows: list[tuple[str, str | None, str | None]] = cur.fetchall()
            finally:
                cur.close()
            return rows

    def desired_variants(self, device_ids: Iterable[str]) -> dict[str, str]:
        """The variant of each device's stored desired state (devices without one are
        absent): stored is what counts, acknowledged or not — the fleet's desired-state
        publisher retries it, and re-publishes all of it when the fleet starts."""
        return {p.device_id: p.variant for p in self.store.desired(device_ids)}

    def judged_samples(self, judged: Mapping[str, Member], window: tuple[float, float],
                       rollout_id: str | None = None
                       ) -> dict[tuple[str, tuple[str, ...]], Sample]:
        """The judged devices' samples per (side, cell), aggregated by the store
        (``samples.read_samples``) — for a ``rollout_id``, kept up to date from one
        call to the next (``tally.WindowTallies``): only what arrived since is read."""
        if rollout_id is not None:
            return self.tallies.samples(self.store.engine, rollout_id, None, judged, window)
        with self.store.engine.begin() as conn:
            return read_samples(conn, judged, window)

    # -- writing ----------------------------------------------------------
    def create(self, rollout_id: str, doc: dict[str, Any], *, cohort: str, candidate: str,
               unpin: bool, actor: str) -> bool:
        """Insert a rollout (``running``, assigning its first step) with its audit record;
        refuse a name used before, a cohort another rollout still holds, and a candidate
        pinned off the cohort unless ``unpin`` (which removes the pin). Checks and insert
        are one transaction. Returns whether a pin was removed."""
        r, p = schema.rollouts, schema.pins
        pinned_here = and_(p.c.cohort == cohort, p.c.variant == candidate)
        with self.store.engine.begin() as conn:
            if conn.execute(select(r.c.id).where(r.c.id == rollout_id)).first():
                raise RolloutError(f"a rollout named {rollout_id!r} exists; rollout names are "
                                   "never reused (the audit log refers to them)")
            busy = conn.execute(select(r.c.id, r.c.spec).where(r.c.state.in_(ACTIVE))).all()
            for other_id, other in busy:
                if other["cohort"] == cohort:
                    raise RolloutError(f"rollout {other_id!r} is still active on cohort "
                                       f"{cohort!r}")
            pinned = conn.execute(select(p).where(pinned_here)).first()
            if pinned and not unpin:
                raise RolloutError(
                    f"{candidate} is pinned off cohort {cohort!r} since rollout "
                    f"{pinned.rollout_id!r} ({pinned.reason}); pass --unpin to try it again")
            if pinned:
                conn.execute(delete(p).where(pinned_here))
            now = self.clock()
            conn.execute(r.insert().values(
                id=rollout_id, spec=doc, state="running", step=0, phase="assigning",
                phase_started_at=now, bake_extensions=0, reason="", created_at=now,
                updated_at=now))
            self._audit(conn, rollout_id, [AuditRecord(
                "rollout.create", {"spec": doc, "unpinned": bool(pinned)}, actor)])
        return bool(pinned)

    def add_members(self, rows: Sequence[Mapping[str, Any]],
                    audits: Sequence[AuditRecord] = ()) -> None:
        """Devices join a rollout (controls, and canaries before their desired state is
        set: a fleet that stops in between finds them pending and sets it again), with
        the audit records of the decision (``audits``, about the rows' rollout)."""
        if rows:
            with self.store.engine.begin() as conn:
                ids = sorted({str(r["rollout_id"]) for r in rows})
                for rollout_id in ids:
                    self._fenced(conn, rollout_id)
                conn.execute(schema.rollout_devices.insert(), [dict(r) for r in rows])
                if audits:
                    if len(ids) != 1:
                        raise ValueError("audit records go with the rows of one rollout")
                    self._audit(conn, ids[0], audits)

    def record_outcomes(self, rollout_id: str, outcomes: Sequence[tuple[str, str, str]],
                        audit: AuditRecord) -> None:
        """``(device, outcome, reason)`` of canaries, and the audit record saying so."""
        rd = schema.rollout_devices
        with self.store.engine.begin() as conn:
            self._fenced(conn, rollout_id)
            for device_id, outcome, reason in outcomes:
                conn.execute(update(rd).where(and_(
                    rd.c.rollout_id == rollout_id, rd.c.device_id == device_id)).values(
                    outcome=outcome, reason=reason[:1000]))
            self._audit(conn, rollout_id, [audit])

    def restart_deadlines(self, rollout_id: str, device_ids: Sequence[str], now: float) -> None:
        """Pending canaries assigned again get a fresh deadline."""
        rd = schema.rollout_devices
        with self.store.engine.begin() as conn:
            self._fenced(conn, rollout_id)
            conn.execute(update(rd).where(and_(
                rd.c.rollout_id == rollout_id, rd.c.device_id.in_(list(device_ids))))
                .values(assigned_at=now))

    def audit(self, rollout_id: str, records: Sequence[AuditRecord]) -> None:
        with self.store.engine.begin() as conn:
            self._fenced(conn, rollout_id)
            self._audit(conn, rollout_id, records)

    def transition(self, rollout_id: str, expect: Mapping[str, Any],
                   values: Mapping[str, Any], audits: Sequence[AuditRecord] = (), *,
                   canaries_rolled_back: bool = False, pin: Pin | None = None) -> None:
        """Write a state change and its audit records in one transaction — only if the
        row still has ``expect``'s ``state`` and ``phase`` (else ``RolloutError``: it
        changed underneath, e.g. an operator paused it while a tick was deciding).

        ``canaries_rolled_back`` marks every canary ``rolled_back``; ``pin`` pins the
        candidate off the cohort (once: an existing pin is kept)."""
        r = schema.rollouts
        with self.store.engine.begin() as conn:
            self._fenced(conn, rollout_id)
            done = conn.execute(update(r).where(and_(
                r.c.id == rollout_id, r.c.state == expect["state"],
                r.c.phase == expect["phase"])).values(**values, updated_at=self.clock()))
            if done.rowcount != 1:
                now = conn.execute(select(r.c.state, r.c.phase)
                                   .where(r.c.id == rollout_id)).first()
                raise RolloutError(
                    f"rollout {rollout_id!r} changed while this was decided (it was "
                    f"{expect['state']}/{expect['phase']}, it is "
                    f"{'gone' if now is None else f'{now.state}/{now.phase}'}); try again")
            if canaries_rolled_back:
                rd = schema.rollout_devices
                conn.execute(update(rd).where(and_(
                    rd.c.rollout_id == rollout_id, rd.c.role == "canary"))
                    .values(outcome="rolled_back"))
            if pin is not None:
                self._pin(conn, rollout_id, pin)
            self._audit(conn, rollout_id, audits)

    def _pin(self, conn: Connection, rollout_id: str, pin: Pin) -> None:
        p = schema.pins
        exists = conn.execute(select(p).where(and_(
            p.c.cohort == pin.cohort, p.c.variant == pin.variant))).first()
        if not exists:
            conn.execute(p.insert().values(cohort=pin.cohort, variant=pin.variant,
                                           rollout_id=rollout_id, pinned_at=self.clock(),
                                           reason=pin.reason[:1000]))

    @staticmethod
    def _audit(conn: Connection, rollout_id: str, records: Sequence[AuditRecord]) -> None:
        # The rows Store.audit writes (wall-clock ts), in the caller's transaction.
        for a in records:
            conn.execute(schema.audit.insert().values(
                ts=time.time(), actor=a.actor, action=a.action,
                subject=f"rollout:{rollout_id}", evidence=a.evidence))


__all__ = ["AuditRecord", "Pin", "RolloutRepository", "WriteFence"]
