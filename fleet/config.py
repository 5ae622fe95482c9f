"""The fleet service's configuration file (TOML), validated strictly.

Every option has a default or is required, and a description that the
documentation is written from. Relative paths are resolved against the
config file's folder, so a config works wherever it is started from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.strict import Strict, explain


class StoreConfig(Strict):
    url: str = Field("sqlite:///fleet.db", description="SQLAlchemy URL: sqlite:///PATH or "
                     "postgresql+psycopg://user@host:5432/db. A relative SQLite path is "
                     "relative to the config file.")

    @field_validator("url")
    @classmethod
    def _engine(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith("postgresql")):
            raise ValueError("must start with sqlite:/// or postgresql")
        return v


class IngestConfig(Strict):
    share_group: str = Field("quantfleet", pattern=r"^[A-Za-z0-9_-]{0,64}$",
                             description="Shared-subscription group: fleet instances with the "
                             "same group split the telemetry between them. Empty: a plain "
                             "subscription, for one instance on a broker without $share "
                             "(e.g. amqtt).")
    client_id: str = Field("quantfleet-fleet", min_length=1, max_length=64,
                           description="MQTT client id; unique per fleet instance (the broker "
                           "keeps this instance's session while it restarts).")
    session_expiry_s: int = Field(7 * 86400, ge=0, description="How long the broker keeps "
                                  "the session (and queues telemetry) while the fleet is away.")


class ArtifactsConfig(Strict):
    models_dir: Path = Field(Path("models"), description="The models directory (catalog.json "
                             "and the variant files) served to devices.")
    signing_key: Path = Field(Path("signing.key"), description="ed25519 private key (PEM) that "
                              "signs desired state; `quantfleet keys generate` makes one.")
    base_url: str = Field("http://127.0.0.1:8600", pattern=r"^https?://",
                          description="How devices reach this fleet's HTTP server.")


OperatorRole = Literal["read", "write"]


class OperatorToken(Strict):
    """An operator's bearer token, by its hash (``quantfleet auth token NAME`` makes one)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$",
                      description="Who holds it (logged with each refusal, never the token).")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the "
                              "token; the token itself is never in a config.")
    roles: list[OperatorRole] = Field(
        default_factory=lambda: list[OperatorRole](["read"]),
        description="read: the read API (/v1/devices, /v1/signals, /v1/desired, the whole "
        "/healthz); write: changes (the console, later). Each role is granted on its own.")


class DeviceToken(Strict):
    """A device's artifact credential, by its hash (``issue_device_credential``)."""

    device_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                           description="The device it was issued to.")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the "
                              "token the device sends ([update] artifact token).")


class AuthEntries(Strict):
    """Operator tokens and device credentials (in [http.auth] or a credentials file)."""

    operators: list[OperatorToken] = Field(default_factory=list,
                                           description="Who may use the read API.")
    devices: list[DeviceToken] = Field(default_factory=list,
                                       description="Who may fetch artifacts and manifests.")

    @model_validator(mode="after")
    def _unique(self) -> AuthEntries:
        for what, names in [("operator name", [o.name for o in self.operators]),
                            ("device_id", [d.device_id for d in self.devices]),
                            ("token_sha256", [o.token_sha256 for o in self.operators]
                             + [d.token_sha256 for d in self.devices])]:
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{what} given twice: {', '.join(twice)}")
        return self


class HttpAuthConfig(AuthEntries):
    credential: str = Field("quantfleet-http-auth", min_length=1, pattern=r"^[^/]+$",
                            description="File name in systemd's $CREDENTIALS_DIRECTORY "
                            "(LoadCredential=) with more operators and devices, in this "
                            "table's TOML form; read at start when present.")
    credentials_file: Path | None = Field(None, description="A file with more operators and "
                                          "devices (same form), for a fleet not run by "
                                          "systemd; must exist when set.")


class HttpConfig(Strict):
    host: str = Field("127.0.0.1", description="Address the fleet's HTTP server listens on.")
    port: int = Field(8600, ge=1, le=65535, description="Its port.")
    auth: HttpAuthConfig | None = Field(None, description="Present: the read API needs an "
                                        "operator token and artifacts a device credential "
                                        "(docs/security.md). Absent: no authentication.")
    tls_cert: Path | None = Field(None, description="Serve HTTPS with this certificate (PEM, "
                                  "the chain after it); devices trust its CA with [update] "
                                  "ca_file. Needs tls_key.")
    tls_key: Path | None = Field(None, description="The certificate's private key (PEM).")

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class RolloutsConfig(Strict):
    tick_s: float = Field(10.0, gt=0, le=3600, description="How often running rollouts are "
                          "advanced (assign, check device states, judge a finished bake).")
    lease_s: float = Field(30.0, gt=0, le=7200, description="How long a replica leads a "
                           "rollout without renewing its lease (renewed at each of the "
                           "rollout's ticks and writes). A replica that stops (kill -9, a "
                           "pause, a lost network) hands its rollouts to another within "
                           "lease_s + tick_s; at least twice tick_s (docs/scaling.md, "
                           "Replicas).")

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> RolloutsConfig:
        if self.lease_s < 2 * self.tick_s:
            raise ValueError(f"lease_s ({self.lease_s:g}) must be at least twice tick_s "
                             f"({self.tick_s:g}): a leader renews its lease once a tick")
        return self


class RetentionConfig(Strict):
    """How long the store keeps what (docs/store.md, Rollups and Retention)."""

    raw_events_s: float = Field(8 * 86400, ge=3600, description="How long raw events are "
                                "kept after they were received, at least an hour. Never "
                                "deleted sooner: the requests a rollout in progress still "
                                "judges (its bake window) and those not rolled up yet. The "
                                "console's charts and `quantfleet signals` read raw events: "
                                "a window longer than this shows only what is kept (the "
                                "default covers the console's longest, 7 days).")
    rollups_s: float = Field(90 * 86400, gt=0, description="How long the per-minute rollups "
                             "of request events are kept (by their minute); at least "
                             "raw_events_s.")
    rollup_every_s: float = Field(10.0, gt=0, le=3600, description="How often quantfleet "
                                  "serve adds the newly committed request events to the "
                                  "rollups.")
    every_s: float = Field(600.0, gt=0, le=86400, description="How often quantfleet serve "
                           "deletes what the retention lets go.")
    delete: bool = Field(True, description="false: keep everything (the rollups are still "
                         "maintained).")

    @model_validator(mode="after")
    def _rollups_outlive_events(self) -> RetentionConfig:
        if self.rollups_s < self.raw_events_s:
            raise ValueError(f"rollups_s ({self.rollups_s:g}) must be at least raw_events_s "
                             f"({self.raw_events_s:g}): the rollups are what is left of "
                             "deleted events")
        return self


class ConsoleUser(Strict):
    """A console login by name and password (``quantfleet auth password NAME``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$",
                      description="Who logs in; the name the audit trail records.")
    password_scrypt: str = Field(
        pattern=r"^scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$[A-Za-z0-9_-]+=*\$[A-Za-z0-9_-]+=*$",
        description="The password's scrypt hash as `quantfleet auth password` prints it "
        "(scrypt$N$r$p$salt$hash); never the password.")
    roles: list[OperatorRole] = Field(
        default_factory=lambda: list[OperatorRole](["read"]),
        description="read: the console's pages; write: its changes.")


class ConsoleConfig(Strict):
    reports_dir: Path | None = Field(None, description="A folder of eval reports "
                                     "(`quantfleet eval --html`) the console lists and serves "
                                     "under /console/reports/. Absent: no reports page entries.")
    session_ttl_s: float = Field(8 * 3600, gt=0, le=30 * 86400, description="How long a "
                                 "console login lasts (the session cookie's lifetime).")
    users: list[ConsoleUser] = Field(default_factory=list, description="Logins by name and "
                                     "password, besides operator tokens; they need "
                                     "[http.auth] (present, even empty) to be used.")

    @model_validator(mode="after")
    def _unique_users(self) -> ConsoleConfig:
        names = [u.name for u in self.users]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"console users given twice: {', '.join(twice)}")
        return self


class FleetConfig(Strict):
    store: StoreConfig = Field(default_factory=lambda: StoreConfig.model_validate({}),
                               description="Where the fleet keeps its state.")
    mqtt: MqttConfig = Field(default_factory=lambda: MqttConfig.model_validate({}),
                             description="The broker the devices publish to.")
    ingest: IngestConfig = Field(default_factory=lambda: IngestConfig.model_validate({}),
                                 description="How telemetry is taken from the broker.")
    artifacts: ArtifactsConfig = Field(
        default_factory=lambda: ArtifactsConfig.model_validate({}),
        description="Model artifacts and their signing.")
    http: HttpConfig = Field(default_factory=lambda: HttpConfig.model_validate({}),
                             description="The artifact and read API server.")
    rollouts: RolloutsConfig = Field(default_factory=lambda: RolloutsConfig.model_validate({}),
                                     description="The rollout engine.")
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig.model_validate({}),
        description="How long raw events and rollups are kept.")
    console: ConsoleConfig = Field(default_factory=lambda: ConsoleConfig.model_validate({}),
                                   description="The web console at /console/ (docs/console.md).")

    def resolve_paths(self, base: Path) -> FleetConfig:
        a = self.artifacts
        if not a.models_dir.is_absolute():
            a.models_dir = base / a.models_dir
        if not a.signing_key.is_absolute():
            a.signing_key = base / a.signing_key
        for name in ("tls_cert", "tls_key"):
            value = getattr(self.http, name)
            if value is not None and not value.is_absolute():
                setattr(self.http, name, base / value)
        auth = self.http.auth
        if auth is not None and auth.credentials_file is not None \
                and not auth.credentials_file.is_absolute():
            auth.credentials_file = base / auth.credentials_file
        reports = self.console.reports_dir
        if reports is not None and not reports.is_absolute():
            self.console.reports_dir = base / reports
        prefix = "sqlite:///"
        if self.store.url.startswith(prefix):
            path = Path(self.store.url[len(prefix):])
            if not path.is_absolute():
                self.store.url = prefix + str(base / path)
        return self


class FleetConfigError(ValueError):
    """The config file is unusable; the message names the file and the option."""


def load_fleet_config(path: Path) -> FleetConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise FleetConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetConfigError(f"{path}: not TOML ({exc})") from None
    try:
        cfg = FleetConfig.model_validate(raw)
    except ValidationError as exc:
        raise FleetConfigError(explain(exc, where=str(path), pydantic_words=True,
                                       rest="list")) from None
    return cfg.resolve_paths(Path(path).resolve().parent)
