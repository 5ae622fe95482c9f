"""Configuration of the telemetry path: outbox, broker connection, publisher, samplers.

The agent's config file embeds it as its ``[telemetry]`` table; ``telemetry
run`` also reads a file holding only this table.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.wire import DEVICE_ID_PATTERN
from quantfleet.strict import Strict

MAX_BATCH_BYTES = 64 * 1024


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quantfleet"


class OutboxConfig(Strict):
    """The durable buffer on the device."""

    path: Path | None = Field(
        None, description="SQLite file (default: $XDG_STATE_HOME/quantfleet/telemetry/outbox.db)."
    )
    max_bytes: int = Field(64 * 1024 * 1024, ge=16 * 1024,
                           description="Cap on the bytes the outbox holds; full means evict.")
    commit_interval_s: float = Field(
        1.0, gt=0, le=30,
        description="Group-commit window: appends are written this often (flash wear vs. "
                    "what a power cut can take).",
    )
    max_buffered: int = Field(
        50_000, ge=100, description="Appends held in memory before a commit is forced; "
        "while the disk cannot be written, the most kept (the rest is shed and reported)."
    )
    min_free_bytes: int = Field(
        32 * 1024 * 1024, ge=0,
        description="Free space the outbox leaves on its file system: it evicts before a "
                    "commit would leave less (0: only max_bytes bounds it).",
    )


class PublisherConfig(Strict):
    """How the outbox is forwarded."""

    batch_max_bytes: int = Field(MAX_BATCH_BYTES, ge=1024, le=MAX_BATCH_BYTES,
                                 description="Largest batch payload in bytes.")
    max_inflight: int = Field(20, ge=1, le=65535,
                              description="Batches awaiting PUBACK (<= broker Receive Maximum).")
    live_window_s: float = Field(
        60.0, ge=0, description="After an outage, events this recent go first (live lane)."
    )
    backfill_batches_per_s: float = Field(
        20.0, ge=0, description="Rate limit of the backlog lane (0: unlimited)."
    )
    backoff_initial_s: float = Field(1.0, gt=0, description="First reconnect/retry delay.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest reconnect/retry delay.")
    will_delay_s: int = Field(
        5, ge=0, description="MQTT 5 Will Delay: flaps shorter than this are not 'offline'."
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="Wait for CONNACK this long.")


class TelemetryConfig(Strict):
    """The telemetry path of one device."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="This device's id.")
    mqtt: MqttConfig = Field(default_factory=lambda: MqttConfig.model_validate({}),
                             description="Broker connection.")
    outbox: OutboxConfig = Field(default_factory=lambda: OutboxConfig.model_validate({}),
                                 description="Durable buffer.")
    publisher: PublisherConfig = Field(
        default_factory=lambda: PublisherConfig.model_validate({}), description="Forwarding."
    )
    aggregate_interval_s: float = Field(
        60.0, gt=0, description="How often finished per-minute aggregates are queued."
    )
    health_interval_s: float = Field(
        30.0, ge=0, description="How often host health is sampled (0: never)."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="The device's labels, sent with every birth."
    )

    def outbox_path(self) -> Path:
        return self.outbox.path or default_state_dir() / "telemetry" / "outbox.db"


def config_reference() -> str:
    """The Markdown table of every option, as docs/telemetry.md shows it (drift-tested)."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("", TelemetryConfig), ("mqtt.", MqttConfig), ("outbox.", OutboxConfig),
        ("publisher.", PublisherConfig)]
    for prefix, model in sections:
        for name, info in model.model_fields.items():
            if name in ("mqtt", "outbox", "publisher"):
                continue
            default = "(required)" if info.is_required() else (
                "" if info.default is None else repr(info.default))
            lines.append(f"| `{prefix}{name}` | `{default}` | {info.description} |"
                         .replace("``", "—"))
    return "\n".join(lines) + "\n"
