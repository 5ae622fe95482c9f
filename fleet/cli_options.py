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




def _desired_state(cfg: FleetConfig, store: Any, purpose: str) -> tuple[Any, Any]:
    """A DesiredState on a connected MQTT client (disconnect it with ``_disconnect``)."""
    import time

    from quantfleet.agent.mqtt import make_client, parse_broker_url
    from quantfleet.agent.update.signing import SignatureError, load_private_key

    from .desired import DesiredState

    try:
        key = load_private_key(cfg.artifacts.signing_key)
    except SignatureError as exc:
        raise click.ClickException(str(exc)) from None
    _tls, host, port = parse_broker_url(cfg.mqtt.broker)
    client = make_client(cfg.mqtt, f"{cfg.ingest.client_id}-{purpose}-{int(time.time())}")
    try:
        client.connect(host, port)
    except OSError as exc:
        raise click.ClickException(f"broker {cfg.mqtt.broker}: {exc}") from None
    client.loop_start()
    return DesiredState(store, client, key, cfg.artifacts.models_dir, cfg.artifacts.base_url,
                        topic_root=cfg.mqtt.topic_root), client


def _disconnect(client: Any) -> None:
    if client is not None:
        client.disconnect()
        client.loop_stop()
