"""What several benchmarks share: a free port, waiting for a server to answer,
stopping a process they started, and a PostgreSQL database of their own.

httpx and SQLAlchemy are imported where they are used only: bench_agent_memory.py measures other
processes and keeps its own imports to the standard library and psutil."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The server's maintenance database, from which the benchmarks' own are made.
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[Any], what: str, timeout_s: float = 180) -> None:
    """Return once ``url`` answers below 500; exit the benchmark if ``proc`` dies first."""
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited during start-up")
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start")


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 30 s; nothing is left running."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def pg_database(admin_url: str = PG_ADMIN) -> Iterator[str]:
    """The URL of a fresh database on ``admin_url``'s server, dropped afterwards with
    whatever sessions it still has."""
    from sqlalchemy import create_engine, text

    name = f"qf_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
