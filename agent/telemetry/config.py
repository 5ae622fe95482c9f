"""Configuration of the telemetry path: outbox, broker connection, publisher, samplers.

The agent's config file embeds it as its ``[telemetry]`` table; ``telemetry
run`` also reads a file holding only this table.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantfleet.agent.wire import DEVICE_ID_PATTERN, TOPIC_ROOT

MAX_BATCH_BYTES = 64 * 1024


class ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quantfleet"


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """``(tls, host, port)`` of ``mqtt://host[:port]`` or ``mqtts://host[:port]``.

    Raises ValueError with a one-line message naming the URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"broker {url!r}: not a URL ({exc})") from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker {url!r}: port must be a number 1-65535") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker {url!r}: scheme must be mqtt or mqtts, not {parts.scheme!r}")
    host = parts.hostname
    if not host or re.search(r"[\s/]", host):
        raise ValueError(f"broker {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"broker {url!r}: only scheme, host and port are allowed "
                         "(credentials go in the config)")
    tls = scheme == "mqtts"
    if port is None:
        port = 8883 if tls else 1883
    if not 1 <= port <= 65535:
        raise ValueError(f"broker {url!r}: port must be 1-65535")
    return tls, host, port


class MqttConfig(ConfigBase):
    """How to reach the broker."""

    broker: str = Field("mqtt://127.0.0.1:1883",
                        description="mqtt://host[:port] or mqtts://host[:port] (TLS).")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: str | None = Field(None, description="Client id (default: qf-<device_id>).")
    username: str | None = Field(None, description="Username for password authentication.")
    password_env: str | None = Field(
        None, description="Environment variable holding the password (read at start)."
    )
    password_file: Path | None = Field(
        None, description="File holding the password (e.g. under $CREDENTIALS_DIRECTORY)."
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts (default: system CAs).")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mqtts.")
    key_file: Path | None = Field(None, description="Client key (PEM) for mqtts.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    topic_root: str = Field(TOPIC_ROOT, description="Topic prefix before /devices/{device}/.")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        parse_broker_url(self.broker)
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        return self

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.broker)[0]

    def password(self) -> str | None:
        """The password from the environment or its file; read now, never logged."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"mqtt.password_env: ${self.password_env} is not set")
            return value
        if self.password_file:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"mqtt.password_file {self.password_file}: {exc}") from None
        return None


class OutboxConfig(ConfigBase):
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
        50_000, ge=100, description="Appends held in memory before a commit is forced."
    )


class PublisherConfig(ConfigBase):
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


class TelemetryConfig(ConfigBase):
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
