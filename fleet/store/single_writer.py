"""One ``quantfleet serve`` per SQLite file: the embedded store has a single writer.

Two fleet services on one SQLite file would both ingest, publish desired state
and tick every rollout; SQLite serialises their transactions but nothing
makes them agree on who advances a rollout, and its file locks do not reach
across machines sharing a network disk. Replicas need PostgreSQL
(docs/scaling.md). So a service opening a SQLite store first takes an
exclusive ``flock`` on a file beside it, ``<store>.serve.lock``, and writes
who it is there; a second service is refused with a message naming the store
and the process that holds it. The kernel drops the lock when the process
ends, however it ends (``kill -9`` included), so a stale lock file never
blocks a restart. The operator's commands (``quantfleet rollout …``,
``devices label`` …) do not take it: they are short transactions beside the
service, as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url


class StoreInUse(RuntimeError):
    """Another ``quantfleet serve`` writes this SQLite store; the message names it."""


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL; None for PostgreSQL and in-memory stores."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


class SingleWriter:
    """The lock of one SQLite store, held until ``release`` (or the process ends)."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.path = store_path.with_name(store_path.name + ".serve.lock")
        self._file: IO[str] | None = None

    def acquire(self) -> SingleWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the service's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise StoreInUse(
                f"the SQLite store {self.store_path} is already served by another "
                f"`quantfleet serve` ({holder}; lock {self.path}). SQLite takes one fleet "
                "writer: stop that one first, or run replicas on PostgreSQL "
                "(docs/scaling.md, Replicas)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started_at": time.time()}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(text: str) -> str:
    try:
        who = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(who["started_at"])))
        return f"pid {int(who['pid'])} on {who['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


def hold(url: str) -> SingleWriter | None:
    """Take the single-writer lock of a SQLite store (``StoreInUse`` when another service
    has it); None for PostgreSQL, which takes any number of replicas."""
    path = sqlite_path(url)
    return None if path is None else SingleWriter(path).acquire()


__all__ = ["SingleWriter", "StoreInUse", "hold", "sqlite_path"]
