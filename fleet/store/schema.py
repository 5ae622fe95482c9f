"""The fleet store's tables, one schema for SQLite and PostgreSQL (SQLAlchemy Core).

Events are kept twice over on purpose: the decisive signals (variant, status,
latency, tokens, validation and fallback outcomes) as typed columns the
gates and dashboards query, and the whole body as JSON for audit and
re-judging. Uniqueness on ``(device_id, boot_epoch, seq)`` is what makes
ingest idempotent.

This is what the latest migration leaves, not what builds the store: the
migrations (migrations.py) create and change the tables from frozen
definitions of their own. A change here comes with a new migration there;
tests/fleet/test_migrations.py fails, naming the table and column, until it does.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class commit_txid(FunctionElement[int]):
    """The writing transaction's id as a bigint on PostgreSQL, NULL elsewhere (a DDL
    default: ``events.txid``)."""

    type = BigInteger()
    inherit_cache = True


@compiles(commit_txid, "postgresql")
def _commit_txid_pg(element: commit_txid, compiler: Any, **kw: Any) -> str:
    return "(pg_current_xact_id())::text::bigint"


@compiles(commit_txid)
def _commit_txid_other(element: commit_txid, compiler: Any, **kw: Any) -> str:
    return "NULL"


metadata = MetaData()

migrations = Table(
    "quantfleet_migrations", metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", Float, nullable=False),
)

devices = Table(
    "devices", metadata,
    Column("device_id", String(64), primary_key=True),
    Column("labels", JSON, nullable=False, default=dict),
    Column("hardware", JSON, nullable=False, default=dict),  # the last birth's fingerprint
    Column("online", Boolean, nullable=False, default=False),
    Column("boot_epoch", BigInteger, nullable=False, default=0),
    Column("status_reason", String(16), nullable=False, default=""),
    Column("agent_version", String(64), nullable=False, default=""),
    Column("variant", String(128), nullable=True),
    Column("update_state", String(32), nullable=True),
    Column("state", JSON, nullable=True),  # the last DeviceStatePayload, whole
    Column("state_ts", Float, nullable=True),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

events = Table(
    "events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("boot_epoch", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("historical", Boolean, nullable=False, default=False),
    # request signals (NULL for other kinds)
    Column("variant", String(128), nullable=True),
    Column("status", Integer, nullable=True),
    Column("latency_s", Float, nullable=True),
    Column("ttft_s", Float, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("attempt_tokens", Integer, nullable=True),
    Column("validation_failed", Boolean, nullable=True),
    Column("tool_call_ok", Boolean, nullable=True),
    Column("refused", Boolean, nullable=True),  # the answer was a refusal
    Column("fallback", Boolean, nullable=True),
    Column("truncated", Integer, nullable=True),
    # The body as the JSON text pydantic wrote: serialising once on the way in
    # (not through the JSON type per row) is most of ingest's speed.
    Column("body", Text, nullable=False),
    # m006: on PostgreSQL the id of the transaction that wrote the row (its default:
    # ingest never sets it), what a consumer's snapshot mark is checked against
    # (rollups.py: ids commit out of order there); NULL on SQLite, whose single writer
    # commits in id order.
    Column("txid", BigInteger, nullable=True, server_default=commit_txid()),
    UniqueConstraint("device_id", "boot_epoch", "seq", name="uq_events_triple"),
)
# m003: the rollout gates aggregate a window's requests per variant from this
# index alone (kind, variant, ts select; the rest is what they count), never
# visiting the table's rows with their JSON bodies.
Index("ix_events_request_signals", events.c.kind, events.c.variant, events.c.ts,
      events.c.device_id, events.c.latency_s, events.c.attempt_tokens, events.c.status,
      events.c.validation_failed, events.c.tool_call_ok, events.c.refused, events.c.fallback)
# m007 dropped ix_events_device_seq: the unique triple's index serves reads by device.
Index("ix_events_txid", events.c.txid, postgresql_where=events.c.txid.isnot(None),
      sqlite_where=events.c.txid.isnot(None))

rejections = Table(
    "ingest_rejections", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("topic", Text, nullable=False),
    Column("reason", Text, nullable=False),
)

# m004: what ingest could not commit (a poison message or event), kept whole.
dead_letters = Table(
    "dead_letters", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("topic", Text, nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=False),
)
Index("ix_dead_letters_device_ts", dead_letters.c.device_id, dead_letters.c.ts)

desired = Table(
    "desired", metadata,
    Column("device_id", String(64), primary_key=True),
    Column("revision", BigInteger, nullable=False),
    Column("variant", String(128), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

audit = Table(
    "audit", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("evidence", JSON, nullable=False),
)
Index("ix_audit_subject_ts", audit.c.subject, audit.c.ts)

# -- m002: rollouts --------------------------------------------------------

rollouts = Table(
    "rollouts", metadata,
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

rollout_devices = Table(
    "rollout_devices", metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("role", String(8), nullable=False),  # canary | control
    Column("step", Integer, nullable=False),
    Column("stratum", String(64), nullable=False),
    Column("assigned_at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=False),
)

pins = Table(
    "pins", metadata,
    Column("cohort", String(512), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("rollout_id", String(64), nullable=False),
    Column("pinned_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
)

# -- m005: which replica runs each rollout's engine (fleet/rollouts/leases.py) --

rollout_leases = Table(
    "rollout_leases", metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),  # the replica: host, pid, start
    Column("token", BigInteger, nullable=False),  # +1 at every change of holder
    Column("acquired_at", Float, nullable=False),  # the database's clock, as the others
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

# -- m006: per-minute rollups of request events (fleet/store/rollups.py) ----------

#: Per device, variant and minute (``floor(ts / 60)``): the counts every gate rate
#: is made of.
request_rollups = Table(
    "request_rollups", metadata,
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("validation_failures", BigInteger, nullable=False),
    Column("tool_calls", BigInteger, nullable=False),
    Column("tool_calls_ok", BigInteger, nullable=False),
    Column("refusals", BigInteger, nullable=False),
    Column("fallbacks", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("successes", BigInteger, nullable=False),
)
Index("ix_request_rollups_minute", request_rollups.c.minute)

#: The distributions of the same requests: ``dist`` 0 is latency by the gates' bin
#: (``stats.latency_bin``) with the smallest and largest latency in it, 1 is attempt
#: tokens by exact value (``low == high == key``).
request_rollup_bins = Table(
    "request_rollup_bins", metadata,
    Column("device_id", String(64), primary_key=True),
    Column("variant", String(128), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    Column("dist", Integer, primary_key=True),
    Column("key", BigInteger, primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
)
Index("ix_request_rollup_bins_minute", request_rollup_bins.c.minute)

#: How far each consumer of ``events`` has read: an id on SQLite, a snapshot on
#: PostgreSQL (rollups.py).
rollup_watermarks = Table(
    "rollup_watermarks", metadata,
    Column("name", String(64), primary_key=True),
    Column("mark", Text, nullable=True),  # None: never ran
    Column("updated_at", Float, nullable=False),
)
