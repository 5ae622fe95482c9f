"""Options and openers shared by the fleet's commands (config file, store, selectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .cohorts import Selector, SelectorError
from .config import FleetConfig, FleetConfigError, load_fleet_config

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    default=Path("fleet.toml"), show_default=True, envvar="QUANTFLEET_FLEET_CONFIG",
    help="The fleet config file (TOML).",
)


def _config(path: Path) -> FleetConfig:
    try:
        return load_fleet_config(path)
    except FleetConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _store(cfg: FleetConfig) -> Any:
    from .store import Store

    try:
        return Store(cfg.store.url)
    except Exception as exc:  # a driver's own errors: connection refused, bad URL
        raise click.ClickException(f"store {cfg.store.url}: {exc}") from None


def _selector(text: str) -> Selector:
    try:
        return Selector.parse(text)
    except SelectorError as exc:
        raise click.ClickException(str(exc)) from None


