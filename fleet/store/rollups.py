"""Per-device, per-variant, per-minute rollups of request events, kept exactly once.

``roll_up`` aggregates, in SQL, the request events committed since its
watermark into ``request_rollups`` (the counts every gate rate is made of) and
``request_rollup_bins`` (latency by the gates' bin, ``stats.latency_bin``, with
the smallest and largest latency in each; attempt tokens by exact value), adding
to the rows already there (``ON CONFLICT DO UPDATE SET n = n + excluded.n``). A
late (historical, backfilled) event lands in the minute of its own ``ts``.

Marks (what a watermark records) are where exactly-once rests:

- SQLite has one writer, so rowid order is commit order: a mark is an id, and
  ``max(id) + 1`` read inside the write transaction bounds everything committed;
  a run reads ids in ``[previous, current)``.
- PostgreSQL's ingest processes (several replicas) commit out of id order, so an
  ``id > watermark`` would miss a row whose transaction began first and committed
  last. Every row there carries ``events.txid``, the id of the transaction that
  wrote it (the column's default, m006), and a mark is a snapshot
  (``pg_current_snapshot()``): a run reads the rows whose transaction is committed in
  the current snapshot and was not in the previous one (``pg_visible_in_snapshot``;
  not in the previous one: at or past its xmax, or in its running list). Nothing
  waits for, or scans back to, the oldest open transaction — the cluster's ``xmin``
  can be held back by any session in any database. Rows
  written before m006 have no txid and are taken by the first run.

A consumer's watermark moves in the same transaction as the sums it wrote, with its
row locked: two replicas rolling up at once serialise on it and neither counts a
range twice.

Nothing here runs on ingest's path: ``quantfleet serve`` calls ``roll_up`` on its
ticker (fleet/service.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

from ..rollouts.stats import LATENCY_BIN_FLOOR_S, LN_LATENCY_BIN_GROWTH
from . import schema

#: The watermark of the rollups themselves (``rollup_watermarks.name``).
ROLLUPS = "request_rollups"


@dataclass(frozen=True)
class RollupRun:
    """What one ``roll_up`` did: from which mark to which, and the events between."""

    start: str | None
    end: str
    events: int


def current_mark(conn: Connection) -> str:
    """Where ``events`` stands now, as a consumer records it: on SQLite the next id
    (``max(id) + 1``), on PostgreSQL the snapshot (``pg_current_snapshot()``)."""
    if conn.dialect.name == "postgresql":
        return str(conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one())
    return str(conn.execute(text(
        f"SELECT coalesce(max(id), 0) + 1 FROM {schema.events.name}")).scalar_one())


def mark_floor(dialect: str, mark: str | None) -> int:
    """A position every row below which a consumer at ``mark`` has read: the id on
    SQLite, the snapshot's xmin (a txid) on PostgreSQL."""
    if mark is None:
        return 0
    return int(mark.split(":")[0]) if dialect == "postgresql" else int(mark)


_VISIBLE = "pg_visible_in_snapshot(CAST(CAST(txid AS text) AS xid8), CAST(:{} AS pg_snapshot))"


def rows_between(dialect: str, prev: str | None, cur: str) -> tuple[str, dict[str, Any]]:
    """SQL (and its parameters) selecting the rows of ``events`` a consumer moving from
    mark ``prev`` (None: from the start) to ``cur`` has not read yet and now reads.

    On PostgreSQL: committed in snapshot ``cur`` and not in ``prev`` — a transaction
    is committed in a snapshot unless it started at or after the snapshot's xmax or was
    in its list of running ones. The statement's own snapshot is newer than ``cur``, so
    it sees them all; a row is in exactly one such range."""
    if dialect == "postgresql":
        params: dict[str, Any] = {"m_cur": cur}
        now = f"(txid IS NULL OR {_VISIBLE.format('m_cur')})"  # NULL: before m006
        if prev is None:
            return now, params
        # Not committed in ``prev``: started at or after its xmax, or running then (its
        # xip list). Both are index lookups, however old the cluster's xmin is.
        _, xmax, xip = prev.split(":")
        running = [int(x) for x in xip.split(",") if x]
        params["m_prev_xmax"] = int(xmax)
        unseen = "txid >= :m_prev_xmax" + (
            f" OR txid IN ({', '.join(map(str, running))})" if running else "")
        return f"(({unseen}) AND {_VISIBLE.format('m_cur')})", params
    return "(id >= :m_prev AND id < :m_cur)", {"m_prev": int(prev or 0), "m_cur": int(cur)}


def rows_below(dialect: str, cur: str) -> tuple[str, dict[str, Any]]:
    """SQL selecting every row of ``events`` a consumer at ``cur`` has read."""
    if dialect == "postgresql":
        return (f"(txid IS NULL OR txid < :m_cur_xmin OR {_VISIBLE.format('m_cur')})",
                {"m_cur": cur, "m_cur_xmin": mark_floor(dialect, cur)})
    return "(id < :m_cur)", {"m_cur": int(cur)}


def events_by_position(dialect: str) -> str:
    """``events`` as a FROM item for a read by mark. On SQLite, NOT INDEXED: the planner
    would otherwise take the request-signals index for ``kind = 'request'`` (or a ts
    bound) and scan every request in it, where the id range is a rowid range; PostgreSQL
    finds the txid range in ``ix_events_txid`` by its statistics."""
    return schema.events.name + (" NOT INDEXED" if dialect == "sqlite" else "")


def latency_bin_sql(column: str = "latency_s") -> str:
    """``stats.latency_bin`` in SQL (as ``samples.py`` computes it), with ``:bin_floor``
    and ``:bin_ln_growth`` parameters (``bin_params``)."""
    x = f"coalesce({column}, 0.0)"
    return (f"CASE WHEN {x} < :bin_floor THEN 0 "
            f"ELSE 1 + floor(ln({x} / :bin_floor) / :bin_ln_growth) END")


def bin_params() -> dict[str, float]:
    return {"bin_floor": LATENCY_BIN_FLOOR_S, "bin_ln_growth": LN_LATENCY_BIN_GROWTH}


#: The counts of a group of request rows, in ``request_rollups``' column order.
COUNTS = ("requests", "validation_failures", "tool_calls", "tool_calls_ok", "refusals",
          "fallbacks", "errors", "successes")
COUNT_SQL = (
    "count(*)",
    "count(*) FILTER (WHERE validation_failed)",
    "count(tool_call_ok)",
    "count(*) FILTER (WHERE tool_call_ok)",
    "count(*) FILTER (WHERE refused)",
    "count(*) FILTER (WHERE fallback)",
    "count(*) FILTER (WHERE status >= 400)",
    "count(*) FILTER (WHERE coalesce(status, 0) < 400 AND NOT coalesce(validation_failed, "
    "false))",
)


def _upsert_sql(dialect: str, where: str) -> list[str]:
    least, greatest = ("LEAST", "GREATEST") if dialect == "postgresql" else ("min", "max")
    r, b = schema.request_rollups.name, schema.request_rollup_bins.name
    minute = "CAST(floor(ts / 60.0) AS BIGINT)"
    requests = (f"FROM {events_by_position(dialect)} WHERE kind = 'request' "
                f"AND variant IS NOT NULL AND {where}")
    counts = (
        f"INSERT INTO {r} (device_id, variant, minute, {', '.join(COUNTS)}) "
        f"SELECT device_id, variant, {minute} AS m, {', '.join(COUNT_SQL)} {requests} "
        "GROUP BY device_id, variant, m "
        "ON CONFLICT (device_id, variant, minute) DO UPDATE SET "
        + ", ".join(f"{c} = {r}.{c} + excluded.{c}" for c in COUNTS))
    merge = (" ON CONFLICT (device_id, variant, minute, dist, key) DO UPDATE SET "
             f"n = {b}.n + excluded.n, low = {least}({b}.low, excluded.low), "
             f"high = {greatest}({b}.high, excluded.high)")
    latency = (
        f"INSERT INTO {b} (device_id, variant, minute, dist, key, n, low, high) "
        "SELECT device_id, variant, m, 0, k, count(*), min(x), max(x) FROM ("
        f"SELECT device_id, variant, {minute} AS m, CAST({latency_bin_sql()} AS BIGINT) AS k, "
        f"coalesce(latency_s, 0.0) AS x {requests}) AS q WHERE true "
        "GROUP BY device_id, variant, m, k" + merge)
    tokens = (
        f"INSERT INTO {b} (device_id, variant, minute, dist, key, n, low, high) "
        "SELECT device_id, variant, m, 1, k, count(*), min(k), max(k) FROM ("
        f"SELECT device_id, variant, {minute} AS m, CAST(coalesce(attempt_tokens, 0) AS BIGINT)"
        f" AS k {requests}) AS q WHERE true GROUP BY device_id, variant, m, k" + merge)
    return [counts, latency, tokens]


def _claim(conn: Connection, name: str) -> str | None:
    """The consumer's mark (None: it never ran), its row locked until the transaction
    ends."""
    w = schema.rollup_watermarks.name
    conn.execute(text(f"INSERT INTO {w} (name, mark, updated_at) VALUES (:n, NULL, :t) "
                      "ON CONFLICT (name) DO NOTHING"), {"n": name, "t": time.time()})
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    got = conn.execute(text(f"SELECT mark FROM {w} WHERE name = :n{lock}"),
                       {"n": name}).scalar_one()
    return None if got is None else str(got)


def watermark(conn: Connection, name: str = ROLLUPS) -> str | None:
    """Where the consumer ``name`` stands (None: it never ran)."""
    w = schema.rollup_watermarks.name
    got = conn.execute(text(f"SELECT mark FROM {w} WHERE name = :n"), {"n": name}).first()
    return None if got is None or got[0] is None else str(got[0])


def roll_up(engine: Engine) -> RollupRun:
    """Add the request events committed since the watermark to the rollups, and move the
    watermark past them, in one transaction."""
    with engine.begin() as conn:
        # On SQLite the watermark row's INSERT takes the write lock first: max(id)
        # read after it bounds every committed row, and no writer commits meanwhile.
        start = _claim(conn, ROLLUPS)
        end = current_mark(conn)
        if end == start:
            return RollupRun(start, end, 0)
        where, params = rows_between(conn.dialect.name, start, end)
        params.update(bin_params())
        n = int(conn.execute(text(
            f"SELECT count(*) FROM {events_by_position(conn.dialect.name)} "
            f"WHERE kind = 'request' AND variant IS NOT NULL AND {where}"),
            params).scalar_one())
        if n:
            for sql in _upsert_sql(conn.dialect.name, where):
                conn.execute(text(sql), params)
        conn.execute(text(f"UPDATE {schema.rollup_watermarks.name} SET mark = :m, "
                          "updated_at = :t WHERE name = :n"),
                     {"m": end, "t": time.time(), "n": ROLLUPS})
        return RollupRun(start, end, n)


__all__ = ["COUNTS", "COUNT_SQL", "ROLLUPS", "RollupRun", "bin_params", "current_mark",
           "events_by_position",
           "latency_bin_sql", "mark_floor", "roll_up", "rows_below", "rows_between",
           "watermark"]
