"""The MQTT session: one owner for how both sides reach the broker.

The device (telemetry publisher, update channel) and the fleet (ingest,
desired-state publisher, simulator) open their paho sessions here: the broker
URL, TLS, credentials, the protocol version, and MQTT 5's connect options
(session expiry, clean start). What travels over the session — topics and
payloads — is ``wire``'s.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from quantfleet.strict import Strict

from .wire import TOPIC_ROOT

if TYPE_CHECKING:  # paho is imported by the first session: the config alone needs none
    import paho.mqtt.client as mqtt


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


class MqttConfig(Strict):
    """How to reach the broker."""

    broker: str = Field("mqtt://127.0.0.1:1883",
                        description="mqtt://host[:port] or mqtts://host[:port] (TLS).")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: str | None = Field(None, description="Client id (default: qf-<device_id>).")
    username: str | None = Field(None, description="Username for password authentication.")
    update_username: str | None = Field(
        None, description="Username of the update channel's own connection (default: "
        "username); the packaged broker binds each username to one client id and enrolls "
        "it as <device>:update."
    )
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


    def address(self) -> tuple[str, int]:
        """(host, port) of the broker URL."""
        _tls, host, port = parse_broker_url(self.broker)
        return host, port


def make_client(cfg: MqttConfig, client_id: str,
                client_class: type[mqtt.Client] | None = None) -> mqtt.Client:
    """A paho client configured for protocol, TLS and credentials (not connected);
    ``client_class``: a subclass of paho's client to make instead."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    v5 = cfg.protocol == "5"
    client = (client_class or mqtt.Client)(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
    )
    if cfg.tls:
        client.tls_set(
            ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
            certfile=str(cfg.cert_file) if cfg.cert_file else None,
            keyfile=str(cfg.key_file) if cfg.key_file else None,
        )
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password())
    return client


def connect_options(cfg: MqttConfig, *, session_expiry_s: int | None = None,
                    clean_start: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``client.connect``/``connect_async``.

    On MQTT 5, ``session_expiry_s`` keeps the session (its subscriptions and the
    QoS 1 messages queued for it) that long after a disconnect, and
    ``clean_start=False`` resumes a kept one. MQTT 3.1.1 has neither: its clean
    session is set when the client is made.
    """
    options: dict[str, Any] = {"keepalive": cfg.keepalive_s}
    if cfg.protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if session_expiry_s is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry_s
        options.update(clean_start=clean_start, properties=props)
    return options


def will_properties(cfg: MqttConfig, delay_s: int) -> Any:
    """MQTT 5 Will properties delaying the Will by ``delay_s`` (None on 3.1.1)."""
    if cfg.protocol != "5":
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
    props.WillDelayInterval = delay_s
    return props
