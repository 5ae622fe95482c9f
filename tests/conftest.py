"""Shared fixtures: the real model ladder is built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantfleet.agent.backends import Backend, LoadOptions, load_backend
from quantfleet.models.build import build_ladder
from quantfleet.models.catalog import Catalog


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which kernels this run exercises: the CI log says it on its first lines."""
    from quantfleet.agent.hardware import fingerprint

    hw = fingerprint()
    return [
        f"cpu: {hw.cpu_model} ({hw.arch}, class {hw.cpu_class}; {' '.join(hw.features)})",
        f"llama.cpp kernels: {hw.llama_cpp_system_info or 'not installed'} (the portable "
        "build of scripts/bootstrap.sh: the same on every CPU of the class)",
        f"onnxruntime {hw.onnxruntime}: this CPU's kernels natively; the AVX2 path without "
        "VNNI under qemu-x86_64 -cpu Haswell (tests/onnx)",
    ]


# -- the reliability campaign: faults injected, and what became of every event ---------

FAULTS: list[dict[str, object]] = []


@pytest.fixture
def fault_record() -> object:
    """``fault_record(fault, produced=, stored=, reported_lost=, dead_lettered=, lost=)``:
    a test that injects a fault says what happened to every event; the session prints
    the table (docs/reliability.md quotes it). ``lost`` is what went unreported."""

    def record(fault: str, *, produced: int, stored: int, reported_lost: int = 0,
               dead_lettered: int = 0, lost: int | None = None) -> None:
        unreported = produced - stored - reported_lost - dead_lettered if lost is None \
            else lost
        FAULTS.append({"fault": fault, "produced": produced, "stored": stored,
                       "reported_lost": reported_lost, "dead_lettered": dead_lettered,
                       "lost": unreported})

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FAULTS:
        return
    tr = terminalreporter
    tr.section("reliability: faults injected, and every event accounted for")
    tr.write_line(f"{'fault':<72} {'produced':>9} {'stored':>8} {'reported':>9} "
                  f"{'dead-let.':>9} {'lost':>5}")
    for f in FAULTS:
        tr.write_line(f"{f['fault']!s:<72} {f['produced']:>9} {f['stored']:>8} "
                      f"{f['reported_lost']:>9} {f['dead_lettered']:>9} {f['lost']:>5}")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's real state directories."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("QUANTFLEET_MODELS_DIR", str(tmp_path / "models-unset"))


@pytest.fixture(scope="session")
def ladder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's full precision ladder, built for real with llama.cpp.

    ``QUANTFLEET_TEST_LADDER=DIR`` keeps it in DIR across sessions (the build is
    idempotent: a second session only checks it), for quick local iterations.
    """
    kept = os.environ.get("QUANTFLEET_TEST_LADDER")
    models = Path(kept) if kept else tmp_path_factory.mktemp("ladder")
    build_ladder(models)
    return models


@pytest.fixture(scope="session")
def catalog(ladder_dir: Path) -> Catalog:
    return Catalog(ladder_dir)


@pytest.fixture(scope="session")
def loaded(catalog: Catalog) -> Iterator[dict[str, Backend]]:
    """Backends by precision label, loaded on first use and shared by the session."""

    class _Lazy(dict[str, Backend]):
        def __missing__(self, label: str) -> Backend:
            entry = catalog.resolve(label)
            backend = load_backend(entry.backend, entry.path(catalog.dir), LoadOptions(n_ctx=1024))
            self[label] = backend
            return backend

    cache = _Lazy()
    yield cache
    for backend in cache.values():
        backend.close()
