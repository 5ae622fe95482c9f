"""The agent's configuration file (TOML), validated by pydantic.

``AgentConfig`` is the one owner of what ``agent.toml`` may contain; every
field's ``description`` is its documentation (docs/config.md is generated
from it and a test fails when they drift). Unknown keys are refused, so a
misspelt option is an error naming it, not a silently ignored line.

``load_config(path)`` reads and validates a file and raises ``ConfigError``
with one line naming the option and the problem. Secrets (the bearer token,
the artifact credential) are read from the environment or systemd's ``$CREDENTIALS_DIRECTORY`` when
the file is loaded, never stored in the file itself.
"""

from __future__ import annotations

import os
import socket
import tomllib
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from quantfleet.agent.telemetry.config import TelemetryConfig
from quantfleet.models.catalog import default_models_dir
from quantfleet.strict import Strict, explain

from .serving.validation import DEFAULT_CITATION_PATTERN, DEFAULT_REFUSAL_PATTERNS

CONFIG_ENV = "QUANTFLEET_AGENT_CONFIG"

FallbackKind = Literal["json_parse", "json_schema", "tool_call", "refusal", "citation", "length",
                       "finish_reason"]
_DEFAULT_FALLBACK: tuple[FallbackKind, ...] = ("json_parse", "json_schema", "tool_call")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the option."""


class _Section(Strict):
    """A table of agent.toml: an unknown option is an error naming it."""


class DeviceConfig(_Section):
    id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128,
                    pattern=r"^[A-Za-z0-9._-]+$",
                    description="This device's id in the fleet (MQTT topic segment); "
                                "defaults to the host name.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels cohorts select on, e.g. {site = \"lab\"}. The fleet adds cpu.* "
                    "labels derived from the hardware fingerprint (cpu.arch, cpu.class, "
                    "cpu.vnni, ...); they win over a label of the same key set here "
                    "(docs/hardware.md).")


class ModelsConfig(_Section):
    dir: Path = Field(default_factory=default_models_dir,
                      description="Directory with the variant files and catalog.json.")
    active: str = Field("Q4_K_M", min_length=1,
                        description="The variant served by default (name or precision label).")
    fallback: str | None = Field("Q8_0", description="Variant retried once when an answer "
                                 "fails validation; empty or absent disables fallback.")
    fallback_load: Literal["lazy", "eager", "on_demand"] = Field(
        "lazy", description="lazy: load the fallback at its first use and unload it after "
        "fallback_idle_s without one (costs nothing until needed; the first fallback waits "
        "for the load, reported as fallback_load_s); eager: keep it loaded beside the active "
        "variant from the start; on_demand: load it for each fallback and unload it right "
        "after (least memory, slowest). eager turns into lazy at start when available memory "
        "cannot hold both.")
    fallback_idle_s: float = Field(600.0, ge=1, le=86400, description="With lazy loading: "
                                   "unload the fallback after this long without a fallback.")
    n_ctx: int = Field(2048, ge=128, le=131072, description="Context window in tokens.")
    threads: int | None = Field(None, ge=1, le=512,
                                description="CPU threads per generation (default: all cores).")
    workers_per_model: int = Field(1, ge=1, le=16, description="Generations run at the same "
                                   "time per loaded variant (each one is a separate context).")


class ListenConfig(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on (loopback by default).")
    port: int = Field(8088, ge=0, le=65535, description="TCP port (0: any free port).")
    unix_socket: Path | None = Field(None, description="Listen on this Unix socket instead "
                                     "of host/port.")
    max_body_bytes: int = Field(1_000_000, ge=1024, le=64_000_000,
                                description="Largest request body accepted (413 above).")


class AuthConfig(_Section):
    token_env: str = Field("QUANTFLEET_AGENT_TOKEN", description="Environment variable "
                           "holding the bearer token; unset or empty means no token required.")
    token_credential: str = Field("agent-token", description="File name in systemd's "
                                  "$CREDENTIALS_DIRECTORY holding the token (LoadCredential=).")
    client_header: str = Field("X-Client-Id", description="Header naming the client for "
                               "quotas when no API key identifies it.")
    api_keys_env: str = Field("QUANTFLEET_AGENT_API_KEYS", description="Environment "
                              "variable with per-client keys, 'name=key,name2=key2': a "
                              "request bearing one is that client.")


class BudgetConfig(_Section):
    max_prompt_tokens: int = Field(1536, ge=16, description="Prompt budget: older turns "
                                   "are dropped to fit (the system message and the newest "
                                   "turn always stay).")
    max_tokens_ceiling: int = Field(512, ge=1, description="max_tokens above this is "
                                    "clamped to it (and the clamp recorded).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request "
                                    "gives none.")
    tokens_per_minute: int = Field(0, ge=0, description="Per-client tokens (prompt + "
                                   "completion) per rolling minute; 0 is unlimited.")
    tokens_per_day: int = Field(0, ge=0, description="Per-client tokens per rolling day; "
                                "0 is unlimited.")

    @model_validator(mode="after")
    def _defaults_fit(self) -> BudgetConfig:
        if self.default_max_tokens > self.max_tokens_ceiling:
            raise ValueError("default_max_tokens must not exceed max_tokens_ceiling")
        return self


class ValidationConfig(_Section):
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
                                        description="Regular expressions (case-insensitive) "
                                        "that mark an answer as a refusal.")
    citation_pattern: str = Field(DEFAULT_CITATION_PATTERN,
                                  description="Regular expression a citation matches.")
    require_citation: bool = Field(False, description="Policy: every prose answer must cite.")
    fallback_on: list[FallbackKind] = Field(
        default_factory=lambda: list(_DEFAULT_FALLBACK),
        description="Validation failures that trigger the retry on the fallback variant.")
    max_completion_chars: int | None = Field(None, ge=1, description="Answers longer than "
                                             "this fail the length check.")

    @model_validator(mode="after")
    def _patterns_compile(self) -> ValidationConfig:
        import re

        for i, p in enumerate([*self.refusal_patterns, self.citation_pattern]):
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(
                    f"pattern {i} ({p!r}) is not a regular expression: {exc}") from None
        return self


class RoutingConfig(_Section):
    tiers: dict[str, str] = Field(
        default_factory=lambda: {"default": "active", "high": "fallback"},
        description="Quality tier -> variant ('active', 'fallback' or a variant name). "
                    "Unknown tiers are a 400. Without models.fallback, a tier naming "
                    "'fallback' is served by the active variant (config check notes it).")
    tier_header: str = Field("X-Quantfleet-Tier", description="Header naming the tier.")


class ConcurrencyConfig(_Section):
    queue_size: int = Field(8, ge=0, le=10_000, description="Requests waiting per variant "
                            "beyond those running; more get 429 with Retry-After.")
    deadline_s: float = Field(60.0, gt=0, le=3600, description="Per-request deadline from "
                              "arrival: queued past it is 503, generating past it stops.")
    priority_header: str = Field("X-Quantfleet-Priority", description="Header with high, "
                                 "normal or low; higher priorities leave the queue first.")
    drain_timeout_s: float = Field(10.0, ge=0, le=600, description="On SIGTERM, how long "
                                   "in-flight requests may finish before they are cancelled.")


class EventsConfig(_Section):
    events_file: Path | None = Field(None, description="Also append one JSON line per "
                                     "request event here (a local log; [telemetry] is the "
                                     "durable path to the fleet).")
    memory_events: int = Field(1000, ge=0, description="Recent events kept in memory.")
    durable_wait_s: float = Field(
        1.0, ge=0, le=30, description="Before an answer leaves, wait up to this long for "
        "its request event to be committed to the [telemetry] outbox (a group commit: "
        "milliseconds), so no answered request lacks its event after a crash. 0 answers "
        "at once (a crash can then lose the events of the last commit interval).")


class DeprecatedOptionWarning(DeprecationWarning):
    """An option under its old name: it still loads; the message names its new place."""


class ConfigNote(UserWarning):
    """A setting that loads but means less than it says; the message says what it does."""


#: The flat ``[update]`` keys of the first release, and the table and key each moved to.
MOVED_UPDATE_KEYS: dict[str, tuple[str, str]] = {
    "preflight_sample": ("preflight", "sample"),
    "preflight_golden": ("preflight", "golden"),
    "preflight_seed": ("preflight", "seed"),
    "preflight_threads": ("preflight", "threads"),
    "preflight_policy": ("preflight", "policy"),
    "soak_s": ("soak", "duration_s"),
    "soak_poll_s": ("soak", "poll_s"),
    "soak_min_requests": ("soak", "min_requests"),
    "soak_max_validation_increase": ("soak", "max_validation_increase"),
    "soak_max_error_increase": ("soak", "max_error_increase"),
    "soak_max_latency_ratio": ("soak", "max_latency_ratio"),
}


class RetiredKey(_Section):
    """A fleet key this device still accepts, until a deadline (key rotation)."""

    path: Path = Field(description="The retiring ed25519 public key (PEM).")
    accept_until: datetime = Field(description="Desired states signed by it are accepted "
                                   "before this time only, and only if issued before it "
                                   "(a TOML date-time with its offset, e.g. "
                                   "2027-03-01T00:00:00Z).")

    @field_validator("accept_until")
    @classmethod
    def _has_offset(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset (e.g. 2027-03-01T00:00:00Z)")
        return value


class UpdateConfig(_Section):
    """How this device follows the fleet's desired variant (docs/updates.md)."""

    public_key: Path = Field(description="The fleet's ed25519 public key (PEM, as written by "
                             "`quantfleet keys generate`): desired states not signed by it are "
                             "refused.")
    retired_keys: list[RetiredKey] = Field(
        default_factory=list, description="Keys being rotated out, each accepted until its "
        "deadline: `[[update.retired_keys]]` with `path` and `accept_until` (docs/security.md).")
    state_file: Path | None = Field(None, description="Where the updater remembers the "
                                    "revision acted on and the known-good variant (default: "
                                    "updater.json in models.dir).")
    bandwidth_bps: float | None = Field(None, gt=0, description="Download limit in bytes per "
                                        "second (unset: unlimited).")
    min_free_mb: int = Field(256, ge=0, description="Free disk space that must remain after a "
                             "download; checked before the first byte.")
    keep_variants: int = Field(3, ge=1, le=100, description="Downloaded variant files kept on "
                               "disk (the current and known-good ones always are).")
    download_timeout_s: float = Field(3600.0, gt=0, description="Give up on a download "
                                      "after this long.")
    artifact_token_env: str = Field("QUANTFLEET_ARTIFACT_TOKEN", description="Environment "
                                    "variable holding this device's artifact credential, sent "
                                    "as `Authorization: Bearer` to the fleet's artifact server "
                                    "(`quantfleet auth device-token`); unset or empty: none "
                                    "sent. Never written in this file.")
    artifact_token_credential: str = Field("artifact-token", description="File name in "
                                           "systemd's $CREDENTIALS_DIRECTORY holding it "
                                           "(LoadCredential=), read when the variable is "
                                           "unset.")
    ca_file: Path | None = Field(None, description="CA certificate(s) (PEM) that the fleet's "
                                 "HTTPS certificate must chain to; unset: the system's "
                                 "trust store.")
    preflight: PreflightConfig = Field(
        default_factory=lambda: PreflightConfig(), description="The pre-flight: the "
        "candidate and the serving variant answer the same golden items; only a pass is "
        "activated.")
    soak: SoakConfig = Field(
        default_factory=lambda: SoakConfig(), description="The soak: live requests on the new "
        "variant against the previous one's; a breach rolls back to the known-good variant.")

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_keys(cls, data: Any) -> Any:
        """The first release's flat keys (``soak_s``) still load, each with a
        DeprecatedOptionWarning naming its new place (``quantfleet-agent`` prints them)."""
        if not isinstance(data, dict) or not data.keys() & MOVED_UPDATE_KEYS.keys():
            return data
        data = dict(data)
        for old in [k for k in data if k in MOVED_UPDATE_KEYS]:  # in the file's order
            table, key = MOVED_UPDATE_KEYS[old]
            section = data.get(table, {})
            if not isinstance(section, dict):
                continue  # not a table: [update.<table>]'s own error names the problem
            if key in section:
                raise ValueError(f"update.{old} and update.{table}.{key} both set; keep "
                                 f"update.{table}.{key}")
            data[table] = {**section, key: data.pop(old)}
            warnings.warn(f"update.{old} is deprecated: use [update.{table}] {key}",
                          DeprecatedOptionWarning, stacklevel=2)
        return data


# [update]'s own tables follow it (read top-down: the table, then its parts).
class PreflightConfig(_Section):
    """The candidate against the serving variant on golden items, before activation."""

    sample: int = Field(12, ge=0, le=1000, description="Golden items the candidate and the "
                        "current variant both answer before activation; 0 skips the "
                        "pre-flight.")
    golden: Path | None = Field(None, description="Golden set for the pre-flight (default: "
                                "the starter set shipped with quantfleet).")
    seed: int = Field(0, description="Seed of the pre-flight's sample.")
    threads: int = Field(1, ge=1, le=512, description="CPU threads of the pre-flight's "
                         "generations (1 leaves the rest to serving).")
    policy: dict[str, Any] = Field(
        default_factory=dict, description="VerdictPolicy overrides for the pre-flight (see "
        "docs/eval.md), e.g. {max_kld_p99_structured = 0.8}; the device defaults are in "
        "docs/updates.md.")

    @field_validator("policy")
    @classmethod
    def _policy_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from quantfleet.agent.quality.verdict import VerdictPolicy

        try:
            VerdictPolicy.model_validate(value)
        except ValidationError as exc:
            raise ValueError(explain(exc, unknown="unknown option")) from None
        return value


class SoakConfig(_Section):
    """The watch on live requests after activation: the device's own rollback trigger."""

    duration_s: float = Field(300.0, ge=0, description="How long a new variant is watched "
                              "before it is reported healthy and becomes the known-good one.")
    poll_s: float = Field(5.0, gt=0, description="How often the soak compares signals.")
    min_requests: int = Field(20, ge=1, description="Requests on the new variant before the "
                              "soak judges a rate or a latency.")
    max_validation_increase: float = Field(
        0.10, ge=0, le=1, description="Breach when the new variant's validation failure rate "
        "exceeds the previous one's by more than this (Wilson lower bound against the "
        "previous rate).")
    max_error_increase: float = Field(
        0.05, ge=0, le=1, description="Breach when the new variant's error rate (5xx) exceeds "
        "the previous one's by more than this (Wilson lower bound).")
    max_latency_ratio: float = Field(
        2.0, gt=0, description="Breach when the new variant's p95 latency exceeds the previous "
        "variant's p95 times this.")


UpdateConfig.model_rebuild()  # its tables are defined now


class AgentConfig(_Section):
    """Everything `quantfleet-agent serve` reads."""

    device: DeviceConfig = Field(default_factory=DeviceConfig, description="Who this is.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="What to serve.")
    listen: ListenConfig = Field(default_factory=ListenConfig, description="Where to listen.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Who may call.")
    budgets: BudgetConfig = Field(default_factory=BudgetConfig, description="Token budgets.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig,
                                         description="Output checks.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Tiers.")
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig,
                                           description="Backpressure.")
    events: EventsConfig = Field(default_factory=EventsConfig,
                                 description="Local copies of the request events.")
    telemetry: TelemetryConfig | None = Field(
        None, description="The durable telemetry path (SQLite outbox forwarded over MQTT); "
        "its options are in docs/telemetry.md. Absent: events stay on the device.")
    update: UpdateConfig | None = Field(
        None, description="Follow the fleet's desired variant over [telemetry]'s broker: "
        "download, verify, pre-flight, hot swap, soak, roll back (docs/updates.md). Absent: "
        "the device serves its configured variants only. The first release's flat names "
        "(preflight_sample, soak_s, ...) still load, each with a warning naming its place "
        "in [update.preflight] or [update.soak].")

    @model_validator(mode="after")
    def _routes_resolve(self) -> AgentConfig:
        if self.models.fallback == "":
            self.models.fallback = None
        if self.models.fallback is None and "tiers" not in self.routing.model_fields_set:
            # The default tiers route "high" to the fallback; without one, only "default".
            self.routing.tiers = {"default": "active"}
        if self.telemetry is not None:
            if "id" not in self.device.model_fields_set:
                self.device.id = self.telemetry.device_id
            elif self.device.id != self.telemetry.device_id:
                raise ValueError(f"telemetry.device_id {self.telemetry.device_id!r} differs "
                                 f"from device.id {self.device.id!r}")
            # One set of labels: the device's, announced with every birth so the
            # fleet's cohorts see them; [telemetry] labels add to them.
            self.telemetry.labels = {**self.device.labels, **self.telemetry.labels}
        if self.update is not None and self.telemetry is None:
            raise ValueError("[update] needs [telemetry]: desired state arrives over its "
                             "broker")
        if "default" not in self.routing.tiers:
            raise ValueError("routing.tiers must define a 'default' tier")
        for tier, target in self.routing.tiers.items():
            if target == "fallback" and self.models.fallback is None:
                # Disabling the fallback must not break the apps that ask for the
                # tier: it is served by the active variant, and config check says so.
                warnings.warn(f"routing.tiers.{tier}: 'fallback' but models.fallback is "
                              f"unset; tier {tier!r} is served by the active variant",
                              ConfigNote, stacklevel=2)
        return self

    def variant_names(self) -> list[str]:
        """Every variant the routes and fallback name (as written, before catalog lookup)."""
        names = [self.models.active]
        if self.models.fallback:
            names.append(self.models.fallback)
        for target in self.routing.tiers.values():
            if target not in ("active", "fallback"):
                names.append(target)
        return list(dict.fromkeys(names))

    def route(self, tier: str) -> str | None:
        target = self.routing.tiers.get(tier)
        if target == "active":
            return self.models.active
        if target == "fallback":
            return self.models.fallback or self.models.active
        return target

    # -- secrets, read when asked, never stored in the file --------------
    def bearer_token(self) -> str | None:
        return read_secret(self.auth.token_env, self.auth.token_credential)

    def artifact_token(self) -> str | None:
        """This device's credential for the fleet's artifact server, if it has one."""
        if self.update is None:
            return None
        return read_secret(self.update.artifact_token_env, self.update.artifact_token_credential)

    def api_keys(self) -> dict[str, str]:
        """key -> client name."""
        raw = os.environ.get(self.auth.api_keys_env, "")
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, key = item.partition("=")
            if not sep or not name or not key:
                raise ConfigError(f"${self.auth.api_keys_env}: expected name=key, got {item!r}")
            out[key] = name
        return out


def read_secret(env: str, credential: str) -> str | None:
    """``$env``, else the file ``credential`` in systemd's ``$CREDENTIALS_DIRECTORY``."""
    value = os.environ.get(env, "")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not value and creds:
        path = Path(creds) / credential
        if path.is_file():
            value = path.read_text().strip()
    return value or None


def parse_config(data: dict[str, Any], source: str = "config") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, where=source, whole="(top level)",
                                  unknown="unknown option")) from None


def load_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, str(path))


def reference_markdown() -> str:
    """docs/config.md, generated from the field descriptions (a test keeps it in sync)."""
    lines = [
        "# Agent configuration reference",
        "",
        "<!-- Generated by `python -m quantfleet.agent.config > docs/config.md`; do not edit. -->",
        "",
        "`quantfleet-agent serve --config agent.toml` reads one TOML file. Every option has a",
        "default; unknown options are errors. `quantfleet-agent config check` validates a file",
        "and the variants it names, and prints the device's hardware fingerprint",
        "([hardware.md](hardware.md)). A commented example: `packaging/agent.example.toml`.",
        "",
    ]
    sections: dict[str, type[BaseModel]] = {"update": UpdateConfig}
    for name, field in AgentConfig.model_fields.items():
        section = sections.get(name, field.annotation)
        if name == "telemetry":
            lines += [f"## [{name}]", "", field.description or "", ""]
            continue
        assert isinstance(section, type) and issubclass(section, BaseModel)
        lines += _reference_table(name, field.description or "", section)
    return "\n".join(lines)


def _reference_table(name: str, description: str, section: type[BaseModel],
                     array: bool = False) -> list[str]:
    """One table's options; a table inside it ([update.soak]) or an array of tables
    ([[update.retired_keys]]) follows as its own section."""
    header = f"## [[{name}]]" if array else f"## [{name}]"
    lines = [header, "", description, "",
             "| option | type | default | meaning |", "|---|---|---|---|"]
    tables: list[str] = []
    for opt, f in section.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            tables += _reference_table(f"{name}.{opt}", f.description or "", f.annotation)
            continue
        item = get_args(f.annotation)[0] if get_origin(f.annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            lines.append(f"| `{opt}` | array of tables | `[]` | {f.description or ''} |")
            tables += _reference_table(f"{name}.{opt}", item.__doc__ or "", item, array=True)
            continue
        default = f.get_default(call_default_factory=True)
        if f.is_required():
            shown = "required"
        elif opt == "id" or opt == "dir":
            shown = "(see meaning)"
        elif isinstance(default, list) and len(str(default)) > 60:
            shown = f"(built-in list of {len(default)})"
        elif isinstance(default, str) and len(default) > 40:
            shown = "(built-in)"
        else:
            shown = f"`{default!r}`" if default is not None else "unset"
        ann = getattr(f.annotation, "__name__", None) if isinstance(f.annotation, type) \
            else None
        ann = ann or str(f.annotation).replace("typing.", "").replace("pathlib._local.", "")
        ann = ann.replace("pathlib.", "").replace("|", "or")
        lines.append(f"| `{opt}` | {ann} | {shown} | {f.description or ''} |")
    lines.append("")
    return lines + tables


if __name__ == "__main__":  # pragma: no cover
    print(reference_markdown(), end="")
