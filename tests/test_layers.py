"""The layering contract ([tool.importlinter] in pyproject.toml) holds, and it bites: a
device module that imports fleet code breaks it, naming the contract and the import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("agent", "fleet", "models", "demo")


def _tree(dest: Path) -> Path:
    """The repository's folders laid out as the installed package (quantfleet/agent, ...)."""
    pkg = dest / "quantfleet"
    pkg.mkdir(parents=True)
    for f in (ROOT / "quantfleet").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    for part in PARTS:
        shutil.copytree(ROOT / part, pkg / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_device_module_importing_fleet_code_breaks_the_contract(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    soak = tree / "quantfleet" / "agent" / "update" / "soak.py"
    soak.write_text(soak.read_text() + "\n\ndef _shortcut() -> None:\n"
                    "    from quantfleet.fleet.store import Store  # noqa: F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    out = result.stdout
    assert "device code never imports fleet code" in out and "BROKEN" in out, out
    assert "quantfleet.agent.update.soak -> quantfleet.fleet.store" in out, out


def test_models_importing_the_agent_breaks_the_contract(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    catalog = tree / "quantfleet" / "models" / "catalog.py"
    catalog.write_text(catalog.read_text() + "\nfrom quantfleet.agent import wire  # noqa: E402\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "models (what a variant is) import neither" in result.stdout, result.stdout
    assert "quantfleet.models.catalog -> quantfleet.agent.wire" in result.stdout, result.stdout


def test_the_strict_base_importing_a_part_breaks_the_contract(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    strict = tree / "quantfleet" / "strict.py"
    strict.write_text(strict.read_text() + "\nfrom quantfleet.agent import wire  # noqa: E402\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "the strict base imports no other part" in result.stdout, result.stdout
    assert "quantfleet.strict -> quantfleet.agent.wire" in result.stdout, result.stdout
