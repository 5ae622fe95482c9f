"""Fetching a variant artifact: resumable, bandwidth-limited, verified before use.

Bytes land in ``<dest>.partial``. A later call resumes from its length with an
HTTP Range request (a server that ignores Range makes us start over, never
append a second copy). When the size is reached the sha256 is checked; a
mismatch deletes the partial file, so a tampered or corrupted artifact never
survives to be loaded. Free disk space is checked before the first byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK = 256 * 1024


class DownloadError(RuntimeError):
    """The artifact could not be fetched or is not the one expected."""


@dataclass
class DownloadResult:
    path: Path
    bytes_fetched: int  # this call; less than the size when it resumed
    resumed_from: int
    seconds: float


class Throttle:
    """Token bucket: keeps the average rate at or under ``rate`` bytes/s."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.start = clock()
        self.sent = 0

    def consume(self, n: int) -> float:
        """Account for ``n`` bytes; sleep as long as needed; return the time slept."""
        self.sent += n
        if not self.rate:
            return 0.0
        due = self.start + self.sent / self.rate
        wait = due - self.clock()
        if wait > 0:
            self.sleep(wait)
            return wait
        return 0.0


def _sha256_prefix(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size_bytes: int,
    bandwidth_bps: float | None = None,
    timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
    token: str | None = None,
    ca_file: Path | None = None,
    min_free_bytes: int = 0,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> DownloadResult:
    """Fetch ``url`` into ``dest`` and prove it is ``sha256``; resume a previous partial.

    ``token`` is sent as ``Authorization: Bearer`` (the device's artifact credential;
    httpx drops it on a redirect to another origin); ``ca_file`` is the CA an HTTPS
    server's certificate must chain to (default: the system's trust store)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    if have > size_bytes:
        log.warning("%s is longer than the artifact; starting over", partial)
        partial.unlink()
        have = 0
    free = shutil.disk_usage(dest.parent).free
    if free - (size_bytes - have) < min_free_bytes:
        raise DownloadError(
            f"not enough disk for {dest.name}: {size_bytes - have} bytes needed, {free} free, "
            f"{min_free_bytes} must stay free"
        )
    started = time.monotonic()
    resumed_from = have
    hasher = _sha256_prefix(partial) if have else hashlib.sha256()
    throttle = Throttle(bandwidth_bps)
    req_headers = dict(headers or {})
    if have:
        req_headers["Range"] = f"bytes={have}-"
    if token:
        req_headers["Authorization"] = f"Bearer {token}"
    # Imported here, not with the module: httpx (with the rich and pygments its
    # command line pulls in) is 3 MB that a device needs only once it downloads an update.
    import httpx

    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    try:
        with httpx.stream("GET", url, headers=req_headers, timeout=timeout_s,
                          follow_redirects=True, verify=verify) as resp:
            if resp.status_code == 416 and have == size_bytes:
                pass  # already complete: fall through to verification
            elif have and resp.status_code == 200:
                log.info("%s ignored the Range request; downloading from the start", url)
                have = resumed_from = 0
                hasher = hashlib.sha256()
                partial.unlink(missing_ok=True)
            elif resp.status_code in (401, 403):
                raise DownloadError(f"{url}: HTTP {resp.status_code}: the fleet refused this "
                                    "device's artifact credential" if token else
                                    f"{url}: HTTP {resp.status_code}: the fleet wants an "
                                    "artifact credential ([update] artifact_token_env)")
            elif resp.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {resp.status_code}")
            if resp.status_code in (200, 206):
                with partial.open("ab") as out:
                    for block in resp.iter_bytes(CHUNK):
                        if stop is not None and stop():
                            raise DownloadError(f"{url}: stopped at {have} bytes")
                        if have + len(block) > size_bytes:
                            raise DownloadError(
                                f"{url}: more than the expected {size_bytes} bytes"
                            )
                        out.write(block)
                        hasher.update(block)
                        have += len(block)
                        throttle.consume(len(block))
                        if progress is not None:
                            progress(have, size_bytes)
                    out.flush()
                    os.fsync(out.fileno())
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: {type(exc).__name__}: {exc} (kept {have} bytes "
                            "to resume)") from None
    if have != size_bytes:
        raise DownloadError(f"{url}: got {have} of {size_bytes} bytes (kept to resume)")
    digest = hasher.hexdigest()
    if digest != sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{dest.name}: sha256 {digest} does not match the expected {sha256}; deleted"
        )
    os.replace(partial, dest)
    return DownloadResult(dest, have - resumed_from, resumed_from, time.monotonic() - started)
