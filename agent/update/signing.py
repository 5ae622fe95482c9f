"""Signatures: the fleet signs what a device will act on, the device checks it.

Two things are signed with the fleet's ed25519 key (``cryptography``; the
fleet holds the private key, devices are configured with public keys):

- **A desired state** (``DesiredPayload``, schema version 2): every field the
  device acts on — device id, revision, variant, backend, sha256, size, URL,
  rollout, issue time and the signing key's id — as canonical JSON of the
  whole payload but its signature. A message re-addressed to another device,
  given a higher revision, pointed at another URL or replayed under another
  key fails verification; an older genuine one is stale by its revision.
- **An artifact manifest** (``signed_message``/``sign``/``verify``): what a
  variant is — name, backend, sha256 and size — so a manifest whose hash was
  edited fails.

Keys rotate without a flag day: a device trusts its current key and, until a
deadline each, the keys it is retiring (``Keyring``); a desired state names
the key that signed it (``key_id``), and one signed by a retired key is
accepted only before that key's deadline and only if it was issued before it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNED_FIELDS = ("variant", "backend", "sha256", "size_bytes")


class SignatureError(ValueError):
    """A key cannot be read, or a signature does not match; the message says which."""


def signed_message(fields: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: the decisive fields, canonical JSON."""
    missing = [k for k in SIGNED_FIELDS if k not in fields]
    if missing:
        raise SignatureError(f"cannot sign or verify without {', '.join(missing)}")
    doc = {k: fields[k] for k in SIGNED_FIELDS}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(private_key: Ed25519PrivateKey, fields: dict[str, Any]) -> str:
    return base64.b64encode(private_key.sign(signed_message(fields))).decode("ascii")


def verify(public_key: Ed25519PublicKey, fields: dict[str, Any], signature: str) -> None:
    """Raise SignatureError unless ``signature`` signs exactly these fields."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        raise SignatureError("signature is not base64") from None
    try:
        public_key.verify(raw, signed_message(fields))
    except InvalidSignature:
        raise SignatureError(
            f"signature does not match variant {fields.get('variant')!r} "
            f"(sha256 {str(fields.get('sha256'))[:12]}…): refusing the artifact"
        ) from None


def key_id(public_key: Ed25519PublicKey) -> str:
    """A public key's id: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def desired_message(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a desired state's signature covers: every field but the signature,
    as canonical JSON (the payload's ``model_dump(mode="json")``)."""
    doc = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sign_desired(private_key: Ed25519PrivateKey, fields: Mapping[str, Any]) -> str:
    """Sign a desired state's fields; they must name this key (``key_id``)."""
    kid = key_id(private_key.public_key())
    if fields.get("key_id") != kid:
        raise SignatureError(f"key_id {fields.get('key_id')!r} is not the signing key's "
                             f"({kid})")
    return base64.b64encode(private_key.sign(desired_message(fields))).decode("ascii")


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    accept_until: float | None = None  # None: the current key, no deadline

    @property
    def key_id(self) -> str:
        return key_id(self.key)


class Keyring:
    """The keys a device accepts desired states from: its current key, and the keys it
    is retiring, each until its deadline."""

    def __init__(self, current: Ed25519PublicKey,
                 retired: Sequence[tuple[Ed25519PublicKey, float]] = ()) -> None:
        self.keys = {k.key_id: k for k in
                     [TrustedKey(current), *(TrustedKey(k, until) for k, until in retired)]}

    def verify_desired(self, fields: Mapping[str, Any], signature: str,
                       now: float | None = None) -> None:
        """Raise SignatureError unless a trusted key signed exactly these fields."""
        kid = str(fields.get("key_id") or "")
        trusted = self.keys.get(kid)
        if trusted is None:
            raise SignatureError(f"signed by key {kid or '(none)'}, which this device does not "
                                 f"trust (it trusts {', '.join(sorted(self.keys))})")
        if trusted.accept_until is not None:
            at = time.time() if now is None else now
            until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(trusted.accept_until))
            if at >= trusted.accept_until:
                raise SignatureError(f"signed by key {kid}, retired on {until}")
            if float(fields.get("issued_at", 0)) >= trusted.accept_until:
                raise SignatureError(f"signed by key {kid} after its retirement on {until}")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (ValueError, TypeError):
            raise SignatureError("signature is not base64") from None
        try:
            trusted.key.verify(raw, desired_message(fields))
        except InvalidSignature:
            raise SignatureError(
                f"signature does not match this desired state (device "
                f"{fields.get('device_id')!r}, revision {fields.get('revision')}, variant "
                f"{fields.get('variant')!r}): refusing it") from None


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (private, mode 0600) and ``signing.pub`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_path = directory / "signing.key"
    public_path = directory / "signing.pub"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an ed25519 key")
    return key
