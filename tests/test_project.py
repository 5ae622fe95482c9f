"""The project's own shape: packaging lists every subpackage, every command has help."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from quantfleet.agent.cli import cli as agent_cli
from quantfleet.fleet.cli import cli as fleet_cli

ROOT = Path(__file__).resolve().parents[1]
PREFIX = {"quantfleet": "quantfleet", "agent": "quantfleet.agent", "fleet": "quantfleet.fleet",
          "models": "quantfleet.models", "demo": "quantfleet.demo"}


def test_every_subpackage_is_listed_for_installation() -> None:
    """A subpackage missing from pyproject works in the editable checkout but not installed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, dotted in PREFIX.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([dotted, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "these are listed but do not exist"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, (*prefix, name)))
    return out


@pytest.mark.parametrize("cli", [agent_cli, fleet_cli], ids=["quantfleet-agent", "quantfleet"])
def test_every_command_has_help(cli: click.Group) -> None:
    runner = CliRunner()
    for path in _commands(cli):
        cmd: click.Command = cli
        for part in path:
            assert isinstance(cmd, click.Group)
            cmd = cmd.commands[part]
        assert cmd.help and cmd.help.strip(), f"{' '.join(path)} has no help text"
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    for command in commands:
        assert (ROOT / command).stat().st_mode & 0o111
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_the_device_side_needs_none_of_the_fleets_dependencies() -> None:
    """An edge device installs quantfleet[agent]: the serving agent, its updater and the
    pre-flight's evaluation must import with the fleet-only packages absent, and without
    any fleet module (the layering contract says so statically; this runs it)."""
    import subprocess
    import sys

    code = """
import sys
fleet_only = ("sqlalchemy", "psycopg", "scipy", "yaml", "matplotlib")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in fleet_only:
            raise ImportError(f"{name} is a fleet-only dependency")
        if name == "quantfleet.fleet" or name.startswith("quantfleet.fleet."):
            raise ImportError(f"{name} is fleet code")
        return None

sys.meta_path.insert(0, Block())
import quantfleet.agent.cli
import quantfleet.agent.serving.server
import quantfleet.agent.update.service
import quantfleet.agent.quality.golden
import quantfleet.agent.quality.runner
import quantfleet.agent.quality.verdict
from quantfleet.agent.config import parse_config
parse_config({"telemetry": {"device_id": "d"}, "update": {"public_key": "k.pub"}})
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_architecture_map_matches_the_tree() -> None:
    """docs/architecture.md names only paths that exist, and every module of the parts
    (or the package that holds it) is named there: a newcomer's map that cannot rot."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:agent|fleet|models|demo|quantfleet)/[\w/]*(?:\.py)?)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    covered = {p.rstrip("/") for p in named}
    unnamed = []
    for top in ("agent", "fleet", "models"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name in ("__init__.py", "__main__.py"):
                continue
            parents = {rel.rsplit("/", n)[0] for n in range(1, rel.count("/"))}
            if rel not in covered and not (parents & covered):
                unnamed.append(rel)
    assert not unnamed, f"modules docs/architecture.md does not place: {unnamed}"
