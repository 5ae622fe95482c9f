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
    UniqueConstraint("device_id", "boot_epoch", "seq", name="uq_events_triple"),
)
# m003: the rollout gates aggregate a window's requests per variant from this
# index alone (kind, variant, ts select; the rest is what they count), never
# visiting the table's rows with their JSON bodies.
Index("ix_events_request_signals", events.c.kind, events.c.variant, events.c.ts,
      events.c.device_id, events.c.latency_s, events.c.attempt_tokens, events.c.status,
      events.c.validation_failed, events.c.tool_call_ok, events.c.refused, events.c.fallback)
Index("ix_events_device_seq", events.c.device_id, events.c.seq)

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
