"""Signatures: the fleet signs what a device will act on, the device checks it.

Two things are signed with the fleet's ed25519 key (the fleet holds the private
key, devices are configured with public keys):

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

The signatures are libsodium's (PyNaCl): on a device, where every megabyte is
the model's, it costs 1 MB of memory where ``cryptography`` (OpenSSL) cost 8
(docs/api.md, Memory). Keys are the standard PEM files of RFC 8410 —
``openssl genpkey -algorithm ed25519`` makes the same — and an ed25519 key in
PEM has one fixed DER layout, so reading one is checking a 12- or 16-byte
prefix and taking the 32 key bytes after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

SIGNED_FIELDS = ("variant", "backend", "sha256", "size_bytes")

# RFC 8410: SubjectPublicKeyInfo and PKCS #8 of an ed25519 key (OID 1.3.101.112).
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
# PKCS #8 v2 (OneAsymmetricKey, RFC 5958) carries the public key after the seed.
_PKCS8_V2_PREFIX = bytes.fromhex("3051020101300506032b657004220420")
_PKCS8_V2_PUBLIC = bytes.fromhex("812100")


class SignatureError(ValueError):
    """A key cannot be read, or a signature does not match; the message says which."""


@dataclass(frozen=True)
class PublicKey:
    """An ed25519 public key (32 bytes)."""

    raw: bytes

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` signs ``message`` under this key."""
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    """An ed25519 private key (its 32-byte seed)."""

    seed: bytes

    def __repr__(self) -> str:  # never print the seed
        return f"PrivateKey(key_id={key_id(self.public_key())})"

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    def public_key(self) -> PublicKey:
        return PublicKey(bytes(nacl.signing.SigningKey(self.seed).verify_key))

    def sign(self, message: bytes) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).sign(message).signature)


def signed_message(fields: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: the decisive fields, canonical JSON."""
    missing = [k for k in SIGNED_FIELDS if k not in fields]
    if missing:
        raise SignatureError(f"cannot sign or verify without {', '.join(missing)}")
    doc = {k: fields[k] for k in SIGNED_FIELDS}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(private_key: PrivateKey, fields: dict[str, Any]) -> str:
    return base64.b64encode(private_key.sign(signed_message(fields))).decode("ascii")


def verify(public_key: PublicKey, fields: dict[str, Any], signature: str) -> None:
    """Raise SignatureError unless ``signature`` signs exactly these fields."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        raise SignatureError("signature is not base64") from None
    if not public_key.verify(raw, signed_message(fields)):
        raise SignatureError(
            f"signature does not match variant {fields.get('variant')!r} "
            f"(sha256 {str(fields.get('sha256'))[:12]}…): refusing the artifact"
        )


def key_id(public_key: PublicKey) -> str:
    """A public key's id: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(public_key.raw).hexdigest()[:16]


def desired_message(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a desired state's signature covers: every field but the signature,
    as canonical JSON (the payload's ``model_dump(mode="json")``)."""
    doc = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sign_desired(private_key: PrivateKey, fields: Mapping[str, Any]) -> str:
    """Sign a desired state's fields; they must name this key (``key_id``)."""
    kid = key_id(private_key.public_key())
    if fields.get("key_id") != kid:
        raise SignatureError(f"key_id {fields.get('key_id')!r} is not the signing key's "
                             f"({kid})")
    return base64.b64encode(private_key.sign(desired_message(fields))).decode("ascii")


@dataclass(frozen=True)
class TrustedKey:
    key: PublicKey
    accept_until: float | None = None  # None: the current key, no deadline

    @property
    def key_id(self) -> str:
        return key_id(self.key)


class Keyring:
    """The keys a device accepts desired states from: its current key, and the keys it
    is retiring, each until its deadline."""

    def __init__(self, current: PublicKey,
                 retired: Sequence[tuple[PublicKey, float]] = ()) -> None:
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
        if not trusted.key.verify(raw, desired_message(fields)):
            raise SignatureError(
                f"signature does not match this desired state (device "
                f"{fields.get('device_id')!r}, revision {fields.get('revision')}, variant "
                f"{fields.get('variant')!r}): refusing it")


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
            + "\n").encode("ascii")


def _read_pem(path: Path, label: str) -> bytes:
    """The DER inside ``path``'s one ``label`` block; SignatureError naming what is wrong."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM file ({exc})") from None
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if "-----BEGIN ENCRYPTED PRIVATE KEY-----" in text:
        raise SignatureError(f"{path}: an encrypted private key; decrypt it first "
                             f"(openssl pkey -in {path} -out plain.key)")
    start = text.find(begin)
    stop = text.find(end, start + len(begin))
    if start < 0 or stop < 0:
        raise SignatureError(f"{path}: no '{begin}' ... '{end}' block")
    try:
        return base64.b64decode("".join(text[start + len(begin):stop].split()), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{path}: the {label} block is not base64") from None


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (private, mode 0600) and ``signing.pub`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    private_path = directory / "signing.key"
    public_path = directory / "signing.pub"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_pem("PRIVATE KEY", _PKCS8_PREFIX + key.seed))
    public_path.write_bytes(_pem("PUBLIC KEY", _SPKI_PREFIX + key.public_key().raw))
    return private_path, public_path


def load_private_key(path: Path) -> PrivateKey:
    """An ed25519 private key from PEM PKCS #8 (v1, or v2 with its public key)."""
    der = _read_pem(path, "PRIVATE KEY")
    if len(der) == 48 and der.startswith(_PKCS8_PREFIX):
        return PrivateKey(der[16:])
    if len(der) == 83 and der.startswith(_PKCS8_V2_PREFIX) and der[48:51] == _PKCS8_V2_PUBLIC:
        key = PrivateKey(der[16:48])
        if key.public_key().raw != der[51:]:
            raise SignatureError(f"{path}: the public key it carries is not its private "
                                 "key's")
        return key
    raise SignatureError(f"{path}: not an ed25519 key (a PKCS #8 ed25519 key is 48 bytes "
                         f"of DER starting {_PKCS8_PREFIX.hex()}; this is {len(der)} bytes "
                         f"starting {der[:16].hex()})")


def load_public_key(path: Path) -> PublicKey:
    """An ed25519 public key from PEM SubjectPublicKeyInfo."""
    der = _read_pem(path, "PUBLIC KEY")
    if len(der) == 44 and der.startswith(_SPKI_PREFIX):
        return PublicKey(der[12:])
    raise SignatureError(f"{path}: not an ed25519 key (an ed25519 public key is 44 bytes "
                         f"of DER starting {_SPKI_PREFIX.hex()}; this is {len(der)} bytes "
                         f"starting {der[:12].hex()})")
