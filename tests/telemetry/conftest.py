"""Telemetry fixtures: a private Mosquitto that tests may stop, restart and reconfigure."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support import Mosquitto


@pytest.fixture(scope="session")
def _session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.write_config()
    broker.start()
    yield broker
    broker.stop()


def _running_with_defaults(broker: Mosquitto) -> None:
    if broker.proc is None or broker.proc.poll() is not None:
        broker.write_config()
        broker.start()


@pytest.fixture
def private_broker(_session_broker: Mosquitto) -> Iterator[Mosquitto]:
    """ONE private mosquitto per session, for the tests that stop or reconfigure it.

    Tests that change it must leave it running with the default config; one that fails
    before it can (a broker stopped mid-test) gets it restarted with the default config
    here, so that its failure does not become the next test's.
    """
    _running_with_defaults(_session_broker)
    yield _session_broker
    _running_with_defaults(_session_broker)


@pytest.fixture
def topic_root() -> str:
    """A unique topic root per test, so tests sharing a broker never see each other."""
    return f"qftest-{uuid.uuid4().hex[:10]}/v1"


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.05,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
