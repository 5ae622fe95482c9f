"""Artifacts: served with Range from the catalog, signed, fetched resumably and verified."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quantfleet.agent.update.download import DownloadError, Throttle, download
from quantfleet.agent.update.signing import (
    SignatureError,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify,
)
from quantfleet.fleet.artifacts import create_artifact_app
from quantfleet.models.catalog import Catalog
from tests.support import serve


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def server(ladder_dir: Path, keys: tuple[Path, Path]) -> Iterator[str]:
    app = create_artifact_app(ladder_dir, load_private_key(keys[0]), "http://fleet.example")
    with serve(app) as url:
        yield url


def test_private_key_is_private(keys: tuple[Path, Path]) -> None:
    assert keys[0].stat().st_mode & 0o077 == 0


def test_manifest_is_signed_over_what_decides_the_artifact(
    server: str, keys: tuple[Path, Path], catalog: Catalog
) -> None:
    entry = catalog.resolve("Q4_K_M")
    m = httpx.get(f"{server}/v1/artifacts/{entry.name}/manifest").json()
    assert m["sha256"] == entry.sha256 and m["size_bytes"] == entry.size_bytes
    assert m["url"] == f"http://fleet.example/v1/artifacts/{entry.name}"
    public = load_public_key(keys[1])
    verify(public, m, m["signature"])
    for field, value in [("sha256", "0" * 64), ("size_bytes", 1), ("variant", "other")]:
        with pytest.raises(SignatureError, match="does not match"):
            verify(public, {**m, field: value}, m["signature"])
    other_public = load_public_key(generate_keypair(keys[0].parent / "other")[1])
    with pytest.raises(SignatureError):
        verify(other_public, m, m["signature"])
    with pytest.raises(SignatureError, match="not base64"):
        verify(public, m, "@@@")
    listing = httpx.get(f"{server}/v1/artifacts").json()["artifacts"]
    assert {a["variant"] for a in listing} == {v.name for v in catalog.variants}


def test_range_requests_return_exactly_the_bytes_asked(server: str, catalog: Catalog) -> None:
    entry = catalog.resolve("Q2_K")
    data = entry.path(catalog.dir).read_bytes()
    r = httpx.get(f"{server}/v1/artifacts/{entry.name}", headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.content == data[1000:2000]
    assert r.headers["content-range"] == f"bytes 1000-1999/{len(data)}"


def test_unknown_variant_and_no_path_traversal(server: str) -> None:
    assert httpx.get(f"{server}/v1/artifacts/nope").status_code == 404
    assert httpx.get(f"{server}/v1/artifacts/..%2Fcatalog.json").status_code == 404
    assert httpx.get(f"{server}/v1/artifacts/catalog.json").status_code == 404


def test_download_verifies_and_resumes_after_an_interruption(
    server: str, catalog: Catalog, tmp_path: Path
) -> None:
    entry = catalog.resolve("Q2_K")
    url = f"{server}/v1/artifacts/{entry.name}"
    dest = tmp_path / "q2.gguf"
    seen: list[int] = []
    with pytest.raises(DownloadError, match="stopped at"):
        download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes,
                 progress=lambda have, total: seen.append(have),
                 stop=lambda: bool(seen) and seen[-1] > 20_000_000)
    partial = dest.with_name("q2.gguf.partial")
    kept = partial.stat().st_size
    assert 20_000_000 < kept < entry.size_bytes and not dest.exists()
    result = download(url, dest, sha256=entry.sha256, size_bytes=entry.size_bytes)
    assert result.resumed_from == kept
    assert result.bytes_fetched == entry.size_bytes - kept
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == entry.sha256
    assert not partial.exists()


def test_a_hash_mismatch_deletes_the_file(server: str, catalog: Catalog, tmp_path: Path) -> None:
    entry = catalog.resolve("Q2_K")
    dest = tmp_path / "q2.gguf"
    with pytest.raises(DownloadError, match="does not match the expected"):
        download(f"{server}/v1/artifacts/{entry.name}", dest, sha256="ab" * 32,
                 size_bytes=entry.size_bytes)
    assert not dest.exists() and not dest.with_name("q2.gguf.partial").exists()


def test_a_wrong_size_and_missing_disk_are_refused(
    server: str, catalog: Catalog, tmp_path: Path
) -> None:
    entry = catalog.resolve("Q2_K")
    url = f"{server}/v1/artifacts/{entry.name}"
    with pytest.raises(DownloadError, match="more than the expected"):
        download(url, tmp_path / "a.gguf", sha256=entry.sha256, size_bytes=1000)
    with pytest.raises(DownloadError, match="not enough disk"):
        download(url, tmp_path / "b.gguf", sha256=entry.sha256, size_bytes=entry.size_bytes,
                 min_free_bytes=10**18)
    assert not (tmp_path / "b.gguf.partial").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/v1/artifacts/nope", tmp_path / "c.gguf", sha256="0" * 64,
                 size_bytes=10)


def test_throttle_keeps_the_average_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    t = Throttle(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        t.consume(500)
    assert now[0] == pytest.approx(5.0)  # 5000 bytes at 1000 B/s
    assert Throttle(None).consume(10**9) == 0.0
