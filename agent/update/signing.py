"""Artifact signatures: the fleet signs what a variant is, the device checks it.

The signed message is a canonical JSON document of the fields that decide
what a device will run — variant name, backend, sha256 and size — so a
desired-state message whose URL points at a swapped file, or whose hash was
edited in flight, fails verification on the device. Keys are ed25519
(``cryptography``); the fleet holds the private key, devices are configured
with the public key.
"""

from __future__ import annotations

import base64
import json
import os
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
