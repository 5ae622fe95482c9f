"""Fleet-side fixtures: a store URL for each engine (SQLite file, fresh PostgreSQL db)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        with create_engine(PG_ADMIN).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_ok() -> bool:
    return _pg_available()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, pg_ok: bool) -> Iterator[str]:
    """The same tests run on both engines; PostgreSQL gets a database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    if not pg_ok:
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432")
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_url(pg_ok: bool) -> Iterator[str]:
    """A fresh PostgreSQL database, for what only PostgreSQL does (fleet replicas)."""
    if not pg_ok:
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432")
    with fresh_pg_database() as url:
        yield url


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """The URL of a database of its own, dropped afterwards (its sessions with it)."""
    name = f"qf_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
