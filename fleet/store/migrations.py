"""Named migrations of the fleet store, applied in order when a store opens.

Each migration is written out as it was released: its own frozen table
definitions (a ``MetaData`` of its own, never ``schema.metadata``) or its own
DDL, so a store built by the migrations today is the store they built then,
and blank → latest runs the real history. ``schema.py`` declares what the
latest migration leaves; tests/fleet/test_migrations.py checks the two agree
on SQLite and PostgreSQL.

Each migration runs in one transaction together with the row that records
it, so a crash leaves either both or neither. A migration is never edited
once released: changes come as a new one, appended to ``MIGRATIONS``
(migrations run in the order of that list, not of their names; m001a alone
sits earlier, where its changes were made, see there). Before the
first pending migration touches an existing SQLite file, the file is copied
to ``<file>.bak-<migration>``; backing up PostgreSQL is the operator's job.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.schema import CreateColumn

log = logging.getLogger(__name__)

Migration = Callable[[Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    name = fn.__name__
    if any(n == name for n, _ in MIGRATIONS):
        raise ValueError(f"duplicate migration {name}")
    MIGRATIONS.append((name, fn))
    return fn


# -- the record of what ran -------------------------------------------------

_BOOKKEEPING = MetaData()
_migrations = Table(
    "quantfleet_migrations", _BOOKKEEPING,
    Column("name", String(128), primary_key=True),
    Column("applied_at", Float, nullable=False),
)


# -- m001 (195a140): the store as first released -----------------------------

_M001 = MetaData()
Table(
    "devices", _M001,
    Column("device_id", String(64), primary_key=True),
    Column("labels", JSON, nullable=False, default=dict),
    Column("hardware", JSON, nullable=False, default=dict),
    Column("online", Boolean, nullable=False, default=False),
    Column("boot_epoch", BigInteger, nullable=False, default=0),
    Column("status_reason", String(16), nullable=False, default=""),
    Column("agent_version", String(64), nullable=False, default=""),
    Column("variant", String(128), nullable=True),
    Column("update_state", String(32), nullable=True),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)
_m001_events = Table(
    "events", _M001,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("boot_epoch", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("historical", Boolean, nullable=False, default=False),
    Column("variant", String(128), nullable=True),
    Column("status", Integer, nullable=True),
    Column("latency_s", Float, nullable=True),
    Column("ttft_s", Float, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("attempt_tokens", Integer, nullable=True),
    Column("validation_failed", Boolean, nullable=True),
    Column("tool_call_ok", Boolean, nullable=True),
    Column("refusal_ok", Boolean, nullable=True),
    Column("fallback", Boolean, nullable=True),
    Column("truncated", Integer, nullable=True),
    Column("body", JSON, nullable=False),
    UniqueConstraint("device_id", "boot_epoch", "seq", name="uq_events_triple"),
)
Index("ix_events_kind_variant_ts", _m001_events.c.kind, _m001_events.c.variant,
      _m001_events.c.ts)
Index("ix_events_device_seq", _m001_events.c.device_id, _m001_events.c.seq)
Table(
    "ingest_rejections", _M001,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("topic", Text, nullable=False),
    Column("reason", Text, nullable=False),
)
Table(
    "desired", _M001,
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)
_m001_audit = Table(
    "audit", _M001,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("evidence", JSON, nullable=False),
)
Index("ix_audit_subject_ts", _m001_audit.c.subject, _m001_audit.c.ts)


@migration
def m001_initial(conn: Connection) -> None:
    _M001.create_all(conn)


# -- m001a: what schema.py changed after m001 without a migration -------------
#
# Between m001 and m002, three commits changed tables m001 had created by
# editing schema.py alone (m001 then built them from schema.py, so only stores
# created afterwards got the change): 896bffa events.body JSON -> TEXT,
# 8e9328a devices.state/state_ts and desired.revision, 766cf72 events.refusal_ok
# (every refusal check passed) -> events.refused (the answer was a refusal).
# m001a brings any of those shapes to the last one. It sits before m002 in the
# list, where the changes were made, because m003's index needs events.refused;
# on a store that already has them (any store created since 766cf72) it does
# nothing.

_M001A = MetaData()
_m001a_events = Table(
    "events", _M001A,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("boot_epoch", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("historical", Boolean, nullable=False, default=False),
    Column("variant", String(128), nullable=True),
    Column("status", Integer, nullable=True),
    Column("latency_s", Float, nullable=True),
    Column("ttft_s", Float, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("attempt_tokens", Integer, nullable=True),
    Column("validation_failed", Boolean, nullable=True),
    Column("tool_call_ok", Boolean, nullable=True),
    Column("refused", Boolean, nullable=True),
    Column("fallback", Boolean, nullable=True),
    Column("truncated", Integer, nullable=True),
    Column("body", Text, nullable=False),
    UniqueConstraint("device_id", "boot_epoch", "seq", name="uq_events_triple"),
)
_m001a_desired = Table(
    "desired", _M001A,
    Column("device_id", String(64), primary_key=True),
    Column("revision", BigInteger, nullable=False),
    Column("variant", String(128), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)
_m001a_devices_added = Table(
    "devices", _M001A,
    Column("state", JSON, nullable=True),
    Column("state_ts", Float, nullable=True),
)


@migration
def m001a_columns_changed_without_a_migration(conn: Connection) -> None:
    """events.body TEXT, events.refused (computed from the body) for refusal_ok,
    desired.revision (the payload's), devices.state and state_ts: each only if missing.
    SQLite rebuilds the tables whose columns change; PostgreSQL alters them."""
    insp = inspect(conn)
    events = {c["name"]: c for c in insp.get_columns("events")}
    desired = {c["name"] for c in insp.get_columns("desired")}
    devices = {c["name"] for c in insp.get_columns("devices")}
    body_is_json = isinstance(events["body"]["type"], sqltypes.JSON)
    sqlite = conn.dialect.name == "sqlite"

    if sqlite and (body_is_json or "refused" not in events or "refusal_ok" in events):
        _sqlite_rebuild(conn, _m001a_events, {} if "refused" in events else {"refused": "NULL"})
    elif not sqlite:
        if body_is_json:
            conn.execute(text("ALTER TABLE events ALTER COLUMN body TYPE TEXT "
                              "USING CAST(body AS TEXT)"))
        if "refused" not in events:
            conn.execute(text("ALTER TABLE events ADD COLUMN refused BOOLEAN"))
        if "refusal_ok" in events:
            conn.execute(text("ALTER TABLE events DROP COLUMN refusal_ok"))
    if "refused" not in events:
        _each(conn, "events", "id", "body", "refused", _m001a_refused,
              where="kind = 'request'")

    if "revision" not in desired:
        if sqlite:
            _sqlite_rebuild(conn, _m001a_desired, {"revision": "1"})
        else:
            conn.execute(text("ALTER TABLE desired ADD COLUMN revision BIGINT"))
        _each(conn, "desired", "device_id", "payload", "revision", _m001a_revision)
        if not sqlite:
            conn.execute(text("ALTER TABLE desired ALTER COLUMN revision SET NOT NULL"))

    for column in _m001a_devices_added.columns:
        if column.name not in devices:
            _add_column(conn, column)


def _m001a_refused(body: Any) -> bool:
    """refused as the store computes it since 766cf72: a refusal check whose detail is
    "refused" (NULL, as the column is left, for events other than requests)."""
    validations = _json(body).get("validations") or []
    return any(isinstance(v, dict) and v.get("kind") == "refusal"
               and v.get("detail") == "refused" for v in validations)


def _m001a_revision(payload: Any) -> int:
    """A desired row's revision: its payload's when that is a valid one, else 1."""
    revision = _json(payload).get("revision")
    return revision if type(revision) is int and revision >= 1 else 1


# -- m002 (25e27a1): rollouts ------------------------------------------------

_M002 = MetaData()
Table(
    "rollouts", _M002,
    Column("id", String(64), primary_key=True),
    Column("spec", JSON, nullable=False),
    Column("state", String(24), nullable=False),
    Column("step", Integer, nullable=False),
    Column("phase", String(16), nullable=False),
    Column("phase_started_at", Float, nullable=False),
    Column("bake_extensions", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Table(
    "rollout_devices", _M002,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("role", String(8), nullable=False),
    Column("step", Integer, nullable=False),
    Column("stratum", String(64), nullable=False),
    Column("assigned_at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=False),
)
Table(
    "pins", _M002,
    Column("cohort", String(512), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("rollout_id", String(64), nullable=False),
    Column("pinned_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
)


@migration
def m002_rollouts(conn: Connection) -> None:
    _M002.create_all(conn)


# -- m003 (2a2fd7c): the request-signals index --------------------------------

@migration
def m003_events_request_signals_index(conn: Connection) -> None:
    """Replace (kind, variant, ts) by an index that also holds every signal the gates
    count: a window's aggregation reads the index, not the rows (docs/rollouts.md)."""
    conn.execute(text(
        "CREATE INDEX IF NOT EXISTS ix_events_request_signals ON events (kind, variant, ts, "
        "device_id, latency_s, attempt_tokens, status, validation_failed, tool_call_ok, "
        "refused, fallback)"))
    conn.execute(text("DROP INDEX IF EXISTS ix_events_kind_variant_ts"))


# -- m004: dead letters --------------------------------------------------------

_M004 = MetaData()
_m004_dead_letters = Table(
    "dead_letters", _M004,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("topic", Text, nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=False),
)
Index("ix_dead_letters_device_ts", _m004_dead_letters.c.device_id, _m004_dead_letters.c.ts)


@migration
def m004_dead_letters(conn: Connection) -> None:
    """What ingest could not commit — a message, or one event of a batch — with its topic,
    device and the engine's reason, instead of halting ingest (docs/store.md)."""
    _M004.create_all(conn)


# -- m005: rollout leases ---------------------------------------------------------

_M005 = MetaData()
Table(
    "rollout_leases", _M005,
    Column("rollout_id", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)


@migration
def m005_rollout_leases(conn: Connection) -> None:
    """Which fleet replica runs each rollout's engine, until when, and the fencing token
    every engine write is checked against (docs/scaling.md, Replicas)."""
    _M005.create_all(conn)


# -- m006: per-minute rollups of request events ----------------------------------

_M006 = MetaData()
Table(
    "request_rollups", _M006,
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    *(Column(c, BigInteger, nullable=False) for c in (
        "requests", "validation_failures", "tool_calls", "tool_calls_ok", "refusals",
        "fallbacks", "errors", "successes")),
    Index("ix_request_rollups_minute", "minute"),
)
Table(
    "request_rollup_bins", _M006,
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    Column("dist", Integer, primary_key=True),
    Column("key", BigInteger, primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    Index("ix_request_rollup_bins_minute", "minute"),
)
Table(
    "rollup_watermarks", _M006,
    Column("name", String(64), primary_key=True),
    Column("mark", Text, nullable=True),  # None: never ran
    Column("updated_at", Float, nullable=False),
)


@migration
def m006_request_rollups(conn: Connection) -> None:
    """Per-minute rollups of request events and the position they advance by: on
    PostgreSQL ``events.txid``, the writing transaction's id, by default (existing rows
    keep NULL, which the first roll-up takes; adding the column with its volatile
    default would rewrite the table). docs/store.md, Rollups."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE events ADD COLUMN txid BIGINT"))
        conn.execute(text("ALTER TABLE events ALTER COLUMN txid SET DEFAULT "
                          "(pg_current_xact_id())::text::bigint"))
    else:
        conn.execute(text("ALTER TABLE events ADD COLUMN txid BIGINT DEFAULT NULL"))
    conn.execute(text("CREATE INDEX ix_events_txid ON events (txid) WHERE txid IS NOT NULL"))
    _M006.create_all(conn)


@migration
def m007_drop_events_device_seq_index(conn: Connection) -> None:
    """``ix_events_device_seq`` (device, seq) goes: the unique (device, boot epoch, seq)
    index serves every read by device as well — ``Store.seq_gaps``' order included — and
    each event paid for a second index keyed by device, at a random place of the file
    (docs/store.md, Ingest)."""
    conn.execute(text("DROP INDEX IF EXISTS ix_events_device_seq"))


# -- helpers the migrations use (they change only by adding to them) --------

def _add_column(conn: Connection, column: Column[Any]) -> None:
    ddl = CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE {column.table.name} ADD COLUMN {ddl}"))


def _json(value: Any) -> dict[str, Any]:
    """A JSON column's value as read back: parsed by the driver, or its text."""
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    return parsed if isinstance(parsed, dict) else {}


def _each(conn: Connection, table: str, key: str, column: str, target: str,
          compute: Callable[[Any], Any], where: str = "TRUE", chunk: int = 5000) -> None:
    """Set ``target`` to ``compute(column)`` on every row of ``table`` matching ``where``,
    in chunks of ``chunk`` rows read in ``key`` order. Plain Python, so no engine needs
    its JSON functions for it."""
    select_page = (f"SELECT {key}, {column} FROM {table} WHERE ({where}) AND {key} > :last "
                   f"ORDER BY {key} LIMIT {chunk}")
    first_page = f"SELECT {key}, {column} FROM {table} WHERE {where} ORDER BY {key} LIMIT {chunk}"
    update = text(f"UPDATE {table} SET {target} = :value WHERE {key} = :key")
    rows = conn.execute(text(first_page)).all()
    while rows:
        conn.execute(update, [{"key": r[0], "value": compute(r[1])} for r in rows])
        rows = conn.execute(text(select_page), {"last": rows[-1][0]}).all()


def _sqlite_rebuild(conn: Connection, table: Table, exprs: dict[str, str]) -> None:
    """Rebuild ``table.name`` as ``table`` declares it, the way SQLite's manual says to
    (https://www.sqlite.org/lang_altertable.html#otheralter): create the new table,
    copy the rows, drop the old one, rename, recreate the old one's indexes.

    Each new column is filled from the old one of its name unless ``exprs`` gives an
    SQL expression over the old table's columns for it.
    """
    indexes = inspect(conn).get_indexes(table.name)
    new = table.to_metadata(MetaData(), name=f"{table.name}__new")
    new.create(conn)
    names = [c.name for c in table.columns]
    conn.execute(text(
        f"INSERT INTO {new.name} ({', '.join(names)}) "
        f"SELECT {', '.join(exprs.get(n, n) for n in names)} FROM {table.name}"))
    conn.execute(text(f"DROP TABLE {table.name}"))
    conn.execute(text(f"ALTER TABLE {new.name} RENAME TO {table.name}"))
    for ix in indexes:
        unique = "UNIQUE " if ix["unique"] else ""
        columns = ", ".join(str(c) for c in ix["column_names"])
        conn.execute(text(f"CREATE {unique}INDEX {ix['name']} ON {table.name} ({columns})"))


# -- running them -----------------------------------------------------------

# Serialises migrating processes on PostgreSQL (several fleet instances starting at once).
_PG_LOCK_KEY = 0x7166_6D69_6772  # "qfmigr"


def applied(engine: Engine) -> list[str]:
    """The migrations recorded in the store, in the order they were applied."""
    if not inspect(engine).has_table(_migrations.name):
        return []
    with engine.connect() as conn:
        rows = conn.execute(select(_migrations.c.name)
                            .order_by(_migrations.c.applied_at, _migrations.c.name))
        return [r[0] for r in rows]


def migrate(engine: Engine, migrations: list[tuple[str, Migration]] | None = None) -> list[str]:
    """Apply the pending migrations of ``migrations`` (by default all of them) in order;
    return the names applied now.

    A selection is for tests building a store as older code left it.
    """
    wanted = MIGRATIONS if migrations is None else migrations
    names = {n for n, _ in MIGRATIONS}
    done = set(applied(engine))
    unknown = sorted(done - names)
    if unknown:
        log.warning("store: %s recorded in the store but unknown to this code "
                    "(migrated by a newer version?)", ", ".join(unknown))
    pending = [(n, fn) for n, fn in wanted if n not in done]
    if not pending:
        return []
    back_up(engine, before=pending[0][0])
    now_applied = []
    for name, fn in pending:
        with _transaction(engine) as conn:
            _BOOKKEEPING.create_all(conn)
            if conn.execute(select(_migrations.c.name)
                            .where(_migrations.c.name == name)).first() is not None:
                continue  # another process applied it since we looked
            fn(conn)
            conn.execute(_migrations.insert().values(name=name, applied_at=time.time()))
        log.info("store: applied %s", name)
        now_applied.append(name)
    return now_applied


@contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds DDL too, and only one migrating process at a time.

    pysqlite opens a transaction only before INSERT/UPDATE/DELETE, so DDL at the start
    of a migration would commit on its own: on SQLite the connection is put in the
    driver's autocommit mode and the transaction is begun explicitly (IMMEDIATE: the
    write lock is taken first, so a second process waits rather than fails midway).
    """
    with engine.connect() as conn:
        if engine.dialect.name != "sqlite":
            with conn.begin():
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                yield conn
            return
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def back_up(engine: Engine, before: str) -> Path | None:
    """Copy an existing, non-empty SQLite store to ``<file>.bak-<before>``; return the copy.

    The copy is made with SQLite's backup API (a consistent snapshot, WAL included),
    written beside the file and renamed into place. A blank or in-memory store is not
    copied; on PostgreSQL the operator backs up (pg_dump) and this only says so.
    """
    url = engine.url
    if not inspect(engine).get_table_names():
        return None  # a blank store: nothing to lose
    if engine.dialect.name != "sqlite":
        log.warning("store: applying %s and what follows it to %s; the store backs up only "
                    "SQLite files, so back PostgreSQL up yourself (pg_dump) before upgrading",
                    before, url.render_as_string(hide_password=True))
        return None
    path = url.database
    if not path or path == ":memory:" or url.query.get("uri") or not os.path.isfile(path):
        return None
    target = Path(f"{path}.bak-{before}")
    partial = target.with_name(target.name + ".partial")
    src, dst = sqlite3.connect(path), sqlite3.connect(partial)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    os.replace(partial, target)
    log.info("store: backed %s up to %s before applying %s", path, target, before)
    return target
