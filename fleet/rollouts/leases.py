"""Which fleet replica runs each rollout's engine: leases with fencing tokens.

Any number of ``quantfleet serve`` replicas share one PostgreSQL store; each
running rollout is advanced by exactly one of them, the holder of its row in
``rollout_leases``. A replica takes a lease that is free or expired, and renews
the ones it holds before each tick of their rollout; a lease not renewed for
``lease_s`` expires and the next replica to tick takes it over, with the
token one higher. Times are the database's clock, so replicas whose clocks
disagree still agree on expiry.

Expiry alone cannot stop a leader that was paused (SIGSTOP, a long GC, a
frozen VM, a network that came back) and resumes mid-tick believing it still
leads. So every write the engine makes for a rollout — members, outcomes,
state changes, audit records and the desired state it sets — first updates the
lease row in its own transaction, only where it still names this replica with
the token it acquired (renewing it: a leader busy writing keeps its lease),
and is refused with ``LeaseLost`` when no such row is left. The update locks
the row until the write commits, so a write either commits before a takeover
or not at all, and the new holder reads the state after it.

A leader paused in the middle of a write transaction holds that lock; the
service's PostgreSQL sessions end a transaction left idle for ``lease_s``
(``idle_in_transaction_session_timeout``), which frees the row for a takeover
and leaves the paused write with nothing to commit into.

Taking a lease over from another replica writes a ``rollout.leader`` audit
record (holder, token, the previous holder and when its lease expired) in the
same transaction: the rollout's history shows every handover.

With SQLite (``exclusive``: one ``quantfleet serve`` per file, see
``fleet/store/single_writer.py``) a lease left by a previous process is taken
over at once — the file lock proves that process is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from ..store import Store, schema
from .states import RolloutError

log = logging.getLogger(__name__)

Fence = Callable[[Connection], None]  # raises LeaseLost inside a write transaction


class LeaseLost(RolloutError):
    """This replica no longer holds the rollout's lease: the write was not made."""


@dataclass(frozen=True)
class Lease:
    """A rollout's lease as stored; ``expires_in`` is seconds from the database's now
    (negative: expired)."""

    rollout_id: str
    holder: str
    token: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    expires_in: float

    @property
    def live(self) -> bool:
        return self.expires_in > 0

    def to_json(self) -> dict[str, Any]:
        return {"holder": self.holder, "token": self.token, "live": self.live,
                "acquired_at": self.acquired_at, "renewed_at": self.renewed_at,
                "expires_at": self.expires_at, "expires_in_s": round(self.expires_in, 1)}


def replica_id() -> str:
    """Who this process is in ``rollout_leases.holder``: host, pid and a random part
    (a pid is reused after a restart; the random part is not)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def db_now(conn: Connection) -> float:
    """The database's clock in Unix seconds (PostgreSQL's; SQLite's is this machine's)."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(text(
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
        )).scalar_one())
    return time.time()


def leases(store: Store, rollout_ids: Iterable[str] | None = None) -> dict[str, Lease]:
    """The stored leases (of ``rollout_ids``), by rollout: who leads, or last led, each."""
    t = schema.rollout_leases
    q = select(t)
    if rollout_ids is not None:
        q = q.where(t.c.rollout_id.in_(list(rollout_ids)))
    with store.engine.connect() as conn:
        now = db_now(conn)
        return {r.rollout_id: Lease(r.rollout_id, r.holder, int(r.token), r.acquired_at,
                                    r.renewed_at, r.expires_at, r.expires_at - now)
                for r in conn.execute(q)}


class RolloutLeases:
    """This replica's leases: acquire, renew, release, and the fence every engine
    write passes.

    Used by one thread (the fleet's rollout ticker); ``held`` may be read from others.
    """

    def __init__(self, store: Store, lease_s: float, *, holder: str | None = None,
                 exclusive: bool = False) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store = store
        self.lease_s = lease_s
        self.holder = holder or replica_id()
        self.exclusive = exclusive
        self._held: dict[str, int] = {}  # rollout -> token

    @property
    def held(self) -> dict[str, int]:
        """The rollouts this replica leads, with their tokens (a copy)."""
        return dict(self._held)

    def hold(self, rollout_id: str) -> int | None:
        """Renew this replica's lease on the rollout, or take it when it is free or
        expired; the token, or None when another replica holds it."""
        t = schema.rollout_leases
        with self.store.engine.begin() as conn:
            now = db_now(conn)
            # SKIP LOCKED: a row locked by a write of its holder is in use — taking it
            # would wait on that write (forever, for a holder paused mid-transaction
            # until PostgreSQL ends the transaction: Store's idle_in_transaction_s).
            exists = conn.execute(select(t.c.token)
                                  .where(t.c.rollout_id == rollout_id)).first() is not None
            row = conn.execute(select(t).where(t.c.rollout_id == rollout_id)
                               .with_for_update(skip_locked=True)).first()
            until = now + self.lease_s
            if row is None and exists:  # locked: its holder is writing under it
                return None
            if row is None:
                ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)
                done = conn.execute(ins(t).values(
                    rollout_id=rollout_id, holder=self.holder, token=1, acquired_at=now,
                    renewed_at=now, expires_at=until).on_conflict_do_nothing()
                    .returning(t.c.token)).first()
                if done is None:  # another replica has it (inserted, or locked)
                    self._held.pop(rollout_id, None)
                    return None
                token = 1
                self._audit(conn, rollout_id, token, None, now)
            elif row.holder == self.holder and self._held.get(rollout_id) == row.token:
                # Ours, even if it ran out meanwhile: nobody took it, so nobody wrote.
                conn.execute(update(t).where(t.c.rollout_id == rollout_id)
                             .values(renewed_at=now, expires_at=until))
                token = int(row.token)
            elif row.expires_at <= now or self.exclusive:
                token = int(row.token) + 1
                conn.execute(update(t).where(t.c.rollout_id == rollout_id).values(
                    holder=self.holder, token=token, acquired_at=now, renewed_at=now,
                    expires_at=until))
                self._audit(conn, rollout_id, token, row, now)
            else:
                if rollout_id in self._held:
                    log.warning("rollout %s: lease lost to replica %s (token %d); this "
                                "replica no longer advances it", rollout_id, row.holder,
                                row.token)
                self._held.pop(rollout_id, None)
                return None
        if self._held.get(rollout_id) != token:
            log.info("rollout %s: this replica (%s) leads it now, lease token %d",
                     rollout_id, self.holder, token)
        self._held[rollout_id] = token
        return token

    def _audit(self, conn: Connection, rollout_id: str, token: int, previous: Any,
               now: float) -> None:
        evidence: dict[str, Any] = {"holder": self.holder, "token": token,
                                    "lease_s": self.lease_s}
        if previous is not None:
            evidence["previous"] = {
                "holder": previous.holder, "token": int(previous.token),
                "expired_s_ago": round(now - previous.expires_at, 3),
                "released": previous.expires_at <= previous.renewed_at}
            if previous.expires_at > now:
                evidence["previous"]["taken_because"] = "exclusive store: its process is gone"
            if previous.holder != self.holder:
                log.warning("rollout %s: taken over from replica %s (token %d) by %s "
                            "(token %d)", rollout_id, previous.holder, previous.token,
                            self.holder, token)
        conn.execute(schema.audit.insert().values(
            ts=time.time(), actor="engine", action="rollout.leader",
            subject=f"rollout:{rollout_id}", evidence=evidence))

    def release(self, rollout_id: str) -> None:
        """Give the lease up (the rollout stopped running, or the replica stops): it
        expires now, so another replica takes it at its next tick. The row keeps who
        held it last."""
        token = self._held.pop(rollout_id, None)
        if token is None:
            return
        t = schema.rollout_leases
        with self.store.engine.begin() as conn:
            now = db_now(conn)
            conn.execute(update(t).where(and_(
                t.c.rollout_id == rollout_id, t.c.holder == self.holder, t.c.token == token))
                .values(expires_at=now, renewed_at=now))

    def release_all(self, keep: Iterable[str] = ()) -> None:
        """Release every lease held, except those of ``keep``."""
        kept = set(keep)
        for rollout_id in [r for r in self._held if r not in kept]:
            self.release(rollout_id)

    def check(self, conn: Connection, rollout_id: str) -> None:
        """Inside a write transaction: refuse it unless this replica still holds the
        rollout's lease with the token it acquired, and renew the lease (a leader busy
        writing keeps it however long its tick). The update locks the row until the
        transaction ends: a takeover skips a row being written under, and a write waits
        for a takeover under way, then finds the new token."""
        token = self._held.get(rollout_id)
        t = schema.rollout_leases
        if token is not None:
            now = db_now(conn)
            mine = conn.execute(update(t).where(and_(
                t.c.rollout_id == rollout_id, t.c.holder == self.holder, t.c.token == token))
                .values(renewed_at=now, expires_at=now + self.lease_s)
                .returning(t.c.token)).first()
            if mine is not None:
                return
        self._held.pop(rollout_id, None)
        row = conn.execute(select(t.c.holder, t.c.token)
                           .where(t.c.rollout_id == rollout_id)).first()
        who = "nobody" if row is None else f"replica {row.holder} (token {row.token})"
        raise LeaseLost(f"rollout {rollout_id!r}: this replica ({self.holder}) no longer "
                        f"leads it — {who} does; nothing was written")

    def fence(self, rollout_id: str) -> Fence:
        """``check`` for one rollout, for a write made elsewhere (``Store.put_desired``)."""
        return lambda conn: self.check(conn, rollout_id)


__all__ = ["Fence", "Lease", "LeaseLost", "RolloutLeases", "db_now", "leases", "replica_id"]
