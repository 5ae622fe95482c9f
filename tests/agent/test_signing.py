"""ed25519 keys and signatures (agent/update/signing.py, on libsodium): the PEM files are
the standard ones, so keys and signatures made by OpenSSL and by ``cryptography`` work
here and the other way round; every malformed key file is refused by name."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfleet.agent.update.signing import (
    Keyring,
    PrivateKey,
    SignatureError,
    desired_message,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    sign_desired,
    signed_message,
    verify,
)

FIELDS = {"variant": "smollm2-135m-Q4_K_M", "backend": "llama.cpp", "sha256": "ab" * 32,
          "size_bytes": 105_000_000}


def test_keys_made_here_are_read_by_cryptography_and_verify_there(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path)
    assert private_path.stat().st_mode & 0o777 == 0o600
    theirs = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(theirs, ed25519.Ed25519PrivateKey)
    their_public = serialization.load_pem_public_key(public_path.read_bytes())
    assert isinstance(their_public, ed25519.Ed25519PublicKey)
    ours = load_private_key(private_path)
    assert ours.public_key().raw == their_public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = base64.b64decode(sign(ours, FIELDS))
    their_public.verify(signature, signed_message(FIELDS))  # raises when it does not match


def test_keys_and_signatures_made_by_cryptography_verify_here(tmp_path: Path) -> None:
    theirs = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(theirs.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "k.pub").write_bytes(theirs.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    public = load_public_key(tmp_path / "k.pub")
    assert load_private_key(tmp_path / "k.pem").public_key() == public
    doc = {"device_id": "d1", "revision": 3, "variant": "Q8_0", "key_id": key_id(public),
           "issued_at": 1.0}
    signature = base64.b64encode(theirs.sign(desired_message(doc))).decode()
    Keyring(public).verify_desired(doc, signature)
    with pytest.raises(SignatureError, match="does not match this desired state"):
        Keyring(public).verify_desired({**doc, "revision": 4}, signature)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_key_from_openssl_genpkey_signs_what_the_device_accepts(tmp_path: Path) -> None:
    key = tmp_path / "openssl.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)],
                   check=True, capture_output=True)
    pub = tmp_path / "openssl.pub"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    private, public = load_private_key(key), load_public_key(pub)
    assert private.public_key() == public
    doc = {"device_id": "d1", "revision": 1, "key_id": key_id(public), "issued_at": 1.0}
    Keyring(public).verify_desired(doc, sign_desired(private, doc))


def test_a_signature_covers_every_signed_field(tmp_path: Path) -> None:
    private = PrivateKey.generate()
    signature = sign(private, FIELDS)
    verify(private.public_key(), FIELDS, signature)
    for name in FIELDS:
        edited = {**FIELDS, name: "x"}
        with pytest.raises(SignatureError, match="does not match variant"):
            verify(private.public_key(), edited, signature)
    with pytest.raises(SignatureError, match="does not match"):
        verify(PrivateKey.generate().public_key(), FIELDS, signature)
    with pytest.raises(SignatureError, match="not base64"):
        verify(private.public_key(), FIELDS, "***")
    with pytest.raises(SignatureError, match="does not match"):
        verify(private.public_key(), FIELDS, base64.b64encode(b"short").decode())


def test_the_private_seed_is_never_printed() -> None:
    private = PrivateKey.generate()
    assert private.seed.hex() not in repr(private)
    assert key_id(private.public_key()) in repr(private)


def _pem(path: Path, label: str, der: bytes) -> Path:
    body = base64.b64encode(der).decode()
    path.write_text(f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    return path


def test_every_other_kind_of_key_file_is_refused_by_name(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    cases = {
        "rsa.key": (rsa_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), "not an ed25519 key"),
        "ec.key": (ec_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()), "not an ed25519 key"),
        "enc.key": (ed_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")),
                    "encrypted private key; decrypt it first"),
        "pub-as-private.key": (ed_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "no '-----BEGIN PRIVATE KEY-----'"),
        "binary.key": (b"\xff\xfe\x00garbage", "not a readable PEM file"),
        "notbase64.key": (b"-----BEGIN PRIVATE KEY-----\n@@@@\n-----END PRIVATE KEY-----\n",
                          "not base64"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SignatureError, match=message) as err:
            load_private_key(path)
        assert str(path) in str(err.value)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match=f"{rsa_pub}: not an ed25519 key"):
        load_public_key(rsa_pub)
    with pytest.raises(SignatureError, match="not a readable PEM file"):
        load_public_key(tmp_path / "missing.pub")


def test_a_pkcs8_v2_key_must_carry_its_own_public_key(tmp_path: Path) -> None:
    seed = PrivateKey.generate()
    v2 = bytes.fromhex("3051020101300506032b657004220420") + seed.seed + bytes.fromhex("812100")
    good = _pem(tmp_path / "good.key", "PRIVATE KEY", v2 + seed.public_key().raw)
    assert load_private_key(good) == seed
    other = PrivateKey.generate().public_key().raw
    bad = _pem(tmp_path / "bad.key", "PRIVATE KEY", v2 + other)
    with pytest.raises(SignatureError, match="not its private key's"):
        load_private_key(bad)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(der=st.binary(max_size=120), label=st.sampled_from(["PRIVATE KEY", "PUBLIC KEY"]))
def test_any_bytes_in_a_pem_block_are_a_key_or_a_named_refusal(
        tmp_path: Path, der: bytes, label: str) -> None:
    path = _pem(tmp_path / "fuzz.pem", label, der)
    load = load_private_key if label == "PRIVATE KEY" else load_public_key
    try:
        key = load(path)
    except SignatureError as exc:
        assert str(path) in str(exc)
    else:
        assert len(getattr(key, "seed", getattr(key, "raw", b""))) == 32
