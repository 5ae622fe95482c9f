"""SQLite takes one `quantfleet serve`: a second one on the same file is refused, naming
the file and the process that serves it; the lock dies with its process, kill -9
included, so a restart is never blocked (fleet/store/single_writer.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantfleet.fleet.store.single_writer import StoreInUse, hold, sqlite_path
from tests.support import Mosquitto

from .test_service import make_fleet


def test_a_second_writer_of_a_sqlite_store_is_refused_until_the_first_releases(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    first = hold(url)
    assert first is not None
    try:
        with pytest.raises(StoreInUse) as refused:
            hold(url)
        message = str(refused.value)
        assert str(tmp_path / "fleet.db") in message and f"pid {os.getpid()}" in message
        assert "PostgreSQL" in message
    finally:
        first.release()
    again = hold(url)
    assert again is not None
    again.release()


def test_postgresql_and_in_memory_stores_take_no_lock() -> None:
    assert hold("postgresql+psycopg://postgres@127.0.0.1:5432/test") is None
    assert sqlite_path("sqlite:///:memory:") is None


def test_the_lock_of_a_killed_process_does_not_outlive_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from quantfleet.fleet.store.single_writer import hold\n"
         f"lock = hold({url!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUse, match=f"pid {child.pid} "):
            hold(url)
        child.kill()
        child.wait(10)
        lock = hold(url)  # the lock file is still there; the lock is not
        assert lock is not None and lock.path.exists()
        lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_a_second_quantfleet_serve_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    db = tmp_path / "fleet.db"
    (tmp_path / "models").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = make_fleet(tmp_path / "a", f"sqlite:///{db}", tmp_path / "models", broker=url)
    second, _ = make_fleet(tmp_path / "b", f"sqlite:///{db}", tmp_path / "models", broker=url)
    try:
        first.start()
        assert first.proc is not None
        refused = subprocess.run(
            [sys.executable, "-m", "quantfleet.fleet.cli", "serve", "--config",
             str(second.config)], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1, refused.stderr
        assert str(db) in refused.stderr and f"pid {first.proc.pid} " in refused.stderr, \
            refused.stderr
        assert "SQLite takes one fleet writer" in refused.stderr
        assert first.proc.poll() is None  # the first one serves on
        first.stop()
        second.start()  # and once it is gone, the next one may
    finally:
        second.stop()
        first.stop()
        broker.stop()
