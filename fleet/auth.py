"""Who may use the fleet's HTTP server: operator tokens, device credentials, roles.

Tokens are 256-bit random strings made here (``new_token``); the fleet's config
holds only their sha256, so a config or a credentials file that leaks gives no
one a token. A slow password hash (scrypt, argon2) defends guessable secrets;
these are not guessable, and a fast hash keeps every artifact Range request
cheap on a small fleet host (docs/security.md). A presented token is hashed
and compared with every stored hash in constant time (``hmac.compare_digest``).

Operators carry roles (``read``, ``write``); a device credential carries only
``artifacts``. An endpoint names the role it needs: no or an unknown token is
401 with ``WWW-Authenticate: Bearer``, a known one lacking the role is 403.
``issue_device_credential`` is what enrolment calls to give a device its token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .config import (
    AuthEntries,
    DeviceToken,
    FleetConfigError,
    HttpAuthConfig,
    OperatorRole,
    OperatorToken,
)

log = logging.getLogger(__name__)

Role = Literal["read", "write", "artifacts"]
REALM = "quantfleet"
# RFC 6750 section 2.1: "Bearer" (any case), one or more spaces, a token68.
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*) *")
_PREFIX = {"operator": "qfo_", "device": "qfd_"}


def new_token(kind: Literal["operator", "device"]) -> str:
    """A fresh token; the prefix says what it is when one turns up in a log or a repo."""
    return _PREFIX[kind] + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header; None for anything else."""
    if not header:
        return None
    match = _BEARER.fullmatch(header)
    return match.group(1) if match else None


def issue_operator_token(name: str, roles: list[OperatorRole]) -> tuple[str, OperatorToken]:
    token = new_token("operator")
    return token, OperatorToken(name=name, token_sha256=token_sha256(token), roles=roles)


def issue_device_credential(device_id: str) -> tuple[str, DeviceToken]:
    """A new artifact credential for ``device_id``: the token (give it to the device, once:
    ``$CREDENTIALS_DIRECTORY/artifact-token`` or ``QUANTFLEET_ARTIFACT_TOKEN``) and the entry
    for the fleet's ``[http.auth] devices`` (``toml_entry`` renders it)."""
    token = new_token("device")
    return token, DeviceToken(device_id=device_id, token_sha256=token_sha256(token))


def toml_entry(entry: BaseModel) -> str:
    """One inline table, as it goes in ``operators = [...]``, ``devices = [...]`` or
    ``[console] users = [...]``."""
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ", ".join(f"{k} = {value(v)}" for k, v in entry.model_dump().items()) + "}"


@dataclass(frozen=True)
class Principal:
    kind: Literal["operator", "device"]
    name: str
    roles: frozenset[str]


class Credentials:
    """Every accepted token's hash, and who it belongs to."""

    def __init__(self, entries: AuthEntries) -> None:
        self._by_hash: list[tuple[bytes, Principal]] = [
            (o.token_sha256.encode(), Principal("operator", o.name, frozenset(o.roles)))
            for o in entries.operators]
        self._by_hash += [(d.token_sha256.encode(),
                           Principal("device", d.device_id, frozenset({"artifacts"})))
                          for d in entries.devices]
        self.operators = len(entries.operators)
        self.devices = len(entries.devices)

    def authenticate(self, token: str) -> Principal | None:
        presented = token_sha256(token).encode()
        found = None
        for digest, principal in self._by_hash:  # no early exit: every entry is compared
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


def load_credentials(cfg: HttpAuthConfig) -> Credentials:
    """[http.auth]'s entries with those of the credentials file(s), validated together."""
    sources: list[tuple[str, Path]] = []
    creds_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds_dir and (Path(creds_dir) / cfg.credential).is_file():
        sources.append(("$CREDENTIALS_DIRECTORY", Path(creds_dir) / cfg.credential))
    if cfg.credentials_file is not None:
        sources.append(("http.auth.credentials_file", cfg.credentials_file))
    operators = [o.model_dump() for o in cfg.operators]
    devices = [d.model_dump() for d in cfg.devices]
    for where, path in sources:
        try:
            raw = tomllib.loads(path.read_text())
            more = AuthEntries.model_validate(raw)
        except OSError as exc:
            raise FleetConfigError(f"{where} {path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise FleetConfigError(f"{where} {path}: not TOML ({exc})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise FleetConfigError(f"{where} {path}: {loc}: {err['msg']}") from None
        operators += [o.model_dump() for o in more.operators]
        devices += [d.model_dump() for d in more.devices]
    try:
        merged = AuthEntries.model_validate({"operators": operators, "devices": devices})
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise FleetConfigError(f"http.auth (with its credentials files): {msg}") from None
    return Credentials(merged)


Endpoint = Callable[[Request], Awaitable[Response]]


class HttpAuth:
    """The check every guarded endpoint runs; ``HttpAuth(None)`` lets everyone in."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials

    @property
    def enabled(self) -> bool:
        return self.credentials is not None

    def principal(self, request: Request) -> Principal | None:
        token = parse_bearer(request.headers.get("authorization"))
        if token is None or self.credentials is None:
            return None
        return self.credentials.authenticate(token)

    def allows(self, request: Request, role: Role) -> bool:
        if self.credentials is None:
            return True
        who = self.principal(request)
        return who is not None and role in who.roles

    def refusal(self, request: Request, role: Role) -> Response | None:
        """None when the request may go on; else the 401 or 403 to answer."""
        if self.credentials is None:
            return None
        header = request.headers.get("authorization")
        token = parse_bearer(header)
        if token is None:
            # RFC 6750 3.1: no error code when no credentials were sent at all.
            challenge = f'Bearer realm="{REALM}"' if not header else \
                f'Bearer realm="{REALM}", error="invalid_request"'
            return _refuse(401, "an Authorization: Bearer token is required", challenge)
        who = self.credentials.authenticate(token)
        if who is None:
            log.warning("refused %s %s: unknown token", request.method, request.url.path)
            return _refuse(401, "the token is not valid",
                           f'Bearer realm="{REALM}", error="invalid_token"')
        if role not in who.roles:
            log.warning("refused %s %s: %s %s lacks the %s role", request.method,
                        request.url.path, who.kind, who.name, role)
            return _refuse(403, f"{who.kind} {who.name!r} lacks the {role!r} role",
                           f'Bearer realm="{REALM}", error="insufficient_scope", '
                           f'scope="{role}"')
        return None

    def guard(self, role: Role, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            refused = self.refusal(request, role)
            return refused if refused is not None else await endpoint(request)

        guarded.__name__ = getattr(endpoint, "__name__", "guarded")
        guarded.__doc__ = endpoint.__doc__
        return guarded


def _refuse(status: int, message: str, challenge: str) -> Response:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status,
                        headers={"WWW-Authenticate": challenge})


def public_health(auth: HttpAuth, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """/healthz stays open for liveness probes; without the read role it keeps the counts
    and drops what names devices (the unacknowledged deliveries and their errors) and
    rollouts (those this replica leads become their number)."""
    if auth.allows(request, "read"):
        return body
    desired = body.get("desired")
    if isinstance(desired, dict) and "unacknowledged" in desired:
        body = {**body, "desired": {k: v for k, v in desired.items() if k != "unacknowledged"}}
    rollouts = body.get("rollouts")
    if isinstance(rollouts, dict) and isinstance(rollouts.get("leads"), dict):
        body = {**body, "rollouts": {**rollouts, "leads": len(rollouts["leads"])}}
    return body


def is_loopback(host: str) -> bool:
    """Whether ``[http] host`` listens on loopback only (no warning is needed then)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["Credentials", "HttpAuth", "Principal", "is_loopback", "issue_device_credential",
           "issue_operator_token", "load_credentials", "new_token", "parse_bearer",
           "public_health", "token_sha256", "toml_entry"]
