"""HTTP authentication: operator tokens with roles, device credentials, the header parser.

Served for real (uvicorn on a socket): the read API over a real SQLite store and the
artifact server over the real ladder, each behind ``HttpAuth``. The whole
``quantfleet serve`` with ``[http.auth]`` is in test_service.py.
"""

from __future__ import annotations

import json
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

from quantfleet.agent.update.download import DownloadError, download
from quantfleet.agent.update.signing import generate_keypair, load_private_key
from quantfleet.fleet.artifacts import create_artifact_app
from quantfleet.fleet.auth import (
    Credentials,
    HttpAuth,
    is_loopback,
    issue_device_credential,
    issue_operator_token,
    load_credentials,
    parse_bearer,
    token_sha256,
    toml_entry,
)
from quantfleet.fleet.cli import cli
from quantfleet.fleet.config import AuthEntries, FleetConfigError, HttpAuthConfig, HttpConfig
from quantfleet.fleet.service import read_api
from quantfleet.fleet.store import Store
from quantfleet.models.catalog import Catalog
from tests.support import serve

READER, READER_ENTRY = issue_operator_token("alice", ["read"])
WRITER, WRITER_ENTRY = issue_operator_token("bob", ["write"])
DEVICE, DEVICE_ENTRY = issue_device_credential("kiosk-17")
ENTRIES = AuthEntries(operators=[READER_ENTRY, WRITER_ENTRY], devices=[DEVICE_ENTRY])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(ladder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = generate_keypair(tmp_path_factory.mktemp("keys"))
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'fleet.db'}")
    auth = HttpAuth(Credentials(ENTRIES))
    artifacts = create_artifact_app(ladder_dir, load_private_key(keys[0]), "http://fleet", auth)
    app = Starlette(routes=[*read_api(store, auth), Mount("/", app=artifacts)])
    with serve(app) as url:
        yield url
    store.close()


@pytest.mark.parametrize("path", ["/v1/devices", "/v1/signals"])
def test_reads_need_an_operator_token_with_the_read_role(server: str, path: str) -> None:
    none = httpx.get(server + path)
    assert none.status_code == 401
    assert none.headers["www-authenticate"] == 'Bearer realm="quantfleet"'
    bad = httpx.get(server + path, headers=bearer("qfo_not-a-token"))
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert bad.json()["error"]["message"] == "the token is not valid"
    malformed = httpx.get(server + path, headers={"Authorization": f"Basic {READER}"})
    assert malformed.status_code == 401
    assert 'error="invalid_request"' in malformed.headers["www-authenticate"]
    wrong_role = httpx.get(server + path, headers=bearer(WRITER))
    assert wrong_role.status_code == 403
    assert wrong_role.json()["error"]["message"] == "operator 'bob' lacks the 'read' role"
    assert 'error="insufficient_scope"' in wrong_role.headers["www-authenticate"]
    # A device credential is known, but it is not an operator's.
    assert httpx.get(server + path, headers=bearer(DEVICE)).status_code == 403
    ok = httpx.get(server + path, headers=bearer(READER))
    assert ok.status_code == 200, ok.text
    # The scheme is case-insensitive (RFC 6750 / RFC 7235).
    assert httpx.get(server + path, headers={"Authorization": f"bearer {READER}"}
                     ).status_code == 200


def test_artifacts_need_a_device_credential_and_range_works_with_one(
        server: str, catalog: Catalog) -> None:
    entry = catalog.resolve("Q2_K")
    file_url = f"{server}/v1/artifacts/{entry.name}"
    for url in (f"{server}/v1/artifacts", f"{file_url}/manifest", file_url):
        assert httpx.get(url).status_code == 401, url
        assert httpx.get(url, headers=bearer("qfd_forged")).status_code == 401, url
        assert httpx.get(url, headers=bearer(READER)).status_code == 403, url
        assert httpx.get(url, headers=bearer(DEVICE)).status_code in (200,), url
    assert httpx.head(file_url).status_code == 401
    data = entry.path(catalog.dir).read_bytes()
    r = httpx.get(file_url, headers={**bearer(DEVICE), "Range": "bytes=1000-1999"})
    assert r.status_code == 206 and r.content == data[1000:2000]
    assert httpx.get(file_url, headers={"Range": "bytes=1000-1999"}).status_code == 401
    manifest = httpx.get(f"{file_url}/manifest", headers=bearer(DEVICE)).json()
    assert manifest["sha256"] == entry.sha256


def test_download_sends_the_device_credential_and_resumes_with_it(
        server: str, catalog: Catalog, tmp_path: Path) -> None:
    entry = catalog.resolve("Q2_K")
    url = f"{server}/v1/artifacts/{entry.name}"
    dest = tmp_path / "q2.gguf"
    with pytest.raises(DownloadError, match="HTTP 401: the fleet wants an artifact credential"):
        download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes)
    with pytest.raises(DownloadError, match="HTTP 401: the fleet refused this device's"):
        download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes, token="qfd_x")
    seen: list[int] = []
    with pytest.raises(DownloadError, match="stopped at"):
        download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes, token=DEVICE,
                 progress=lambda have, total: seen.append(have),
                 stop=lambda: bool(seen) and seen[-1] > 10_000_000)
    result = download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes,
                      token=DEVICE)
    assert result.resumed_from > 10_000_000  # the Range request carried the credential
    assert dest.stat().st_size == entry.size_bytes


# Every character a client can put in a header value (no CR, LF or NUL).
HEADER_TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=255,
                                    blacklist_characters="\r\n"), max_size=200)


@given(HEADER_TEXT)
@settings(max_examples=500, deadline=None)
def test_the_header_parser_takes_any_value(value: str) -> None:
    token = parse_bearer(value)
    assert token is None or (token and value.strip().endswith(token))


@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=80))
def test_a_well_formed_bearer_header_parses_to_its_token(token: str) -> None:
    parsed = parse_bearer(f"Bearer {token}")
    if re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token):
        assert parsed == token
    else:
        assert parsed is None


def raw_get(base: str, path: str, authorization: bytes) -> int:
    """A GET with these exact header bytes (httpx refuses control characters; a
    client on the network need not), answered with its status code."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: fleet\r\n"
                     b"Authorization: " + authorization + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@given(st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
@settings(max_examples=60, deadline=None)
def test_arbitrary_authorization_headers_never_500(server: str, raw: bytes) -> None:
    for path in ("/v1/devices", "/v1/artifacts"):
        # 400: the HTTP server refused a header no client may send; 401: we did.
        assert raw_get(server, path, raw) in (400, 401), raw


def test_credentials_from_the_config_and_systemd_credentials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inline = HttpAuthConfig(operators=[READER_ENTRY])
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    creds = load_credentials(inline)
    assert (creds.operators, creds.devices) == (1, 0)
    assert creds.authenticate(READER) is not None and creds.authenticate(DEVICE) is None
    (tmp_path / "quantfleet-http-auth").write_text(f"devices = [{toml_entry(DEVICE_ENTRY)}]\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    creds = load_credentials(inline)
    who = creds.authenticate(DEVICE)
    assert who is not None and (who.kind, who.name, who.roles) == (
        "device", "kiosk-17", frozenset({"artifacts"}))
    # The same device in both places is a mistake.
    both = HttpAuthConfig(operators=[READER_ENTRY], devices=[DEVICE_ENTRY])
    with pytest.raises(FleetConfigError, match="device_id given twice: kiosk-17"):
        load_credentials(both)
    (tmp_path / "quantfleet-http-auth").write_text("devices = [{device_id = 'x'}]\n")
    with pytest.raises(FleetConfigError, match=r"\$CREDENTIALS_DIRECTORY .*devices.0."
                                               "token_sha256: Field required"):
        load_credentials(inline)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    missing = HttpAuthConfig(credentials_file=tmp_path / "nope.toml")
    with pytest.raises(FleetConfigError, match=r"credentials_file .*cannot read"):
        load_credentials(missing)


def test_a_config_holds_hashes_never_tokens() -> None:
    with pytest.raises(ValueError, match="token_sha256"):
        HttpAuthConfig.model_validate({"operators": [{"name": "a", "token": READER}]})
    with pytest.raises(ValueError, match="token_sha256"):
        HttpAuthConfig.model_validate({"operators": [{"name": "a", "token_sha256": READER}]})
    with pytest.raises(ValueError, match="roles"):
        HttpAuthConfig.model_validate({"operators": [{
            "name": "a", "token_sha256": token_sha256(READER), "roles": ["admin"]}]})


def test_tls_needs_a_certificate_and_its_key() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        HttpConfig.model_validate({"tls_cert": "cert.pem"})
    assert HttpConfig.model_validate({"tls_cert": "c.pem", "tls_key": "k.pem"}).tls_key


def test_auth_token_prints_the_token_once_and_the_line_with_its_hash(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["auth", "token", "carol", "--role", "read", "--role",
                                   "write", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    token = doc["token"]
    assert token.startswith("qfo_") and len(token) > 40
    assert doc["operators"] == {"name": "carol", "token_sha256": token_sha256(token),
                                "roles": ["read", "write"]}
    human = CliRunner().invoke(cli, ["auth", "token", "dave"]).output
    line = human.strip().splitlines()[-1].strip()
    # The printed line is valid config as it stands.
    parsed = tomllib.loads(f"operators = [{line}]")
    cfg = HttpAuthConfig.model_validate(parsed)
    shown = human.splitlines()[1].strip()
    assert load_credentials(cfg).authenticate(shown) is not None
    assert shown not in line
    dev = CliRunner().invoke(cli, ["auth", "device-token", "kiosk-9", "--json"])
    assert json.loads(dev.output)["devices"]["device_id"] == "kiosk-9"
    bad = CliRunner().invoke(cli, ["auth", "device-token", "no/slashes"])
    assert bad.exit_code == 2 and "String should match pattern" in bad.output


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
    ("::", False), ("10.0.0.2", False), ("fleet.example", False)])
def test_which_listen_addresses_are_loopback(host: str, loopback: bool) -> None:
    """Anything but loopback (a name included: it may resolve anywhere) gets the warning."""
    assert is_loopback(host) is loopback
