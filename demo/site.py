"""What the demo writes into its run directory: configs, per-agent models, rollout specs.

Everything an operator would write by hand for a one-machine fleet, generated:
``fleet.toml`` (SQLite store in the run directory, artifacts from the models
directory, rollouts ticking every second), one ``agent.toml`` per real agent
(its own models directory holding only the baseline variant, telemetry to the
demo's broker, updates verified with the fleet's public key) and the two
rollout specs. Each file is kept after the run, so every command the demo
prints can be typed again against it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantfleet.models.catalog import Catalog, VariantEntry

from .broker import BrokerInfo
from .processes import free_port

TOPIC_ROOT = "quantfleet/v1"


def _toml(value: Any) -> str:
    """A TOML value for the few types these configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def _tables(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, options in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_toml(v)}" for k, v in options.items()]
        out.append("")
    return "\n".join(out)


@dataclass(frozen=True)
class FleetSite:
    config: Path
    url: str


def write_fleet_config(run_dir: Path, broker: BrokerInfo, models_dir: Path,
                       signing_key: Path, tick_s: float = 1.0) -> FleetSite:
    port = free_port()
    config = run_dir / "fleet.toml"
    config.write_text("# Written by `quantfleet demo`; see packaging/fleet.example.toml.\n"
                      + _tables({
        "store": {"url": f"sqlite:///{run_dir / 'fleet.db'}"},
        "mqtt": {"broker": broker.url, "protocol": broker.protocol,
                 "topic_root": TOPIC_ROOT},
        "ingest": {"client_id": "quantfleet-demo-fleet", "share_group": "demo"},
        "artifacts": {"models_dir": models_dir.resolve(), "signing_key": signing_key,
                      "base_url": f"http://127.0.0.1:{port}"},
        "http": {"host": "127.0.0.1", "port": port},
        "rollouts": {"tick_s": tick_s},
    }))
    return FleetSite(config, f"http://127.0.0.1:{port}")


@dataclass(frozen=True)
class AgentSite:
    device_id: str
    dir: Path
    config: Path
    url: str


def write_agent(run_dir: Path, device_id: str, baseline: VariantEntry, source: Catalog,
                broker: BrokerInfo, public_key: Path, labels: dict[str, str], *,
                soak_s: float) -> AgentSite:
    """An agent's directory: its models (the baseline only) and its agent.toml."""
    home = run_dir / "agents" / device_id
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    try:
        # A hard link is a copy that costs no space; the agent never writes into a
        # variant file (downloads land in new files), and pruning it only unlinks.
        (models / baseline.file).hardlink_to(baseline.path(source.dir))
    except OSError:  # another file system
        shutil.copy2(baseline.path(source.dir), models / baseline.file)
    catalog = Catalog(models)
    catalog.put_variant(baseline.model_copy())
    catalog.save()
    port = free_port()
    config = home / "agent.toml"
    tables: dict[str, dict[str, Any]] = {
        "device": {"id": device_id, "labels": labels},
        # One thread and no fallback: two or three agents share two cores with the
        # fleet and the simulator, and the fallback would hold a second model.
        "models": {"dir": models, "active": baseline.precision.label, "fallback": "",
                   "n_ctx": 1024, "threads": 1},
        "listen": {"host": "127.0.0.1", "port": port},
        "budgets": {"default_max_tokens": 64, "max_tokens_ceiling": 128},
        "concurrency": {"queue_size": 4, "deadline_s": 60.0, "drain_timeout_s": 5.0},
        "telemetry": {"device_id": device_id, "aggregate_interval_s": 10.0,
                      "health_interval_s": 30.0},
        "telemetry.mqtt": {"broker": broker.url, "protocol": broker.protocol,
                           "topic_root": TOPIC_ROOT},
        "telemetry.outbox": {"path": home / "outbox.db", "commit_interval_s": 0.5},
        # The pre-flight keeps its default sample (12 golden items): on fewer, one or
        # two flipped items decide (docs/updates.md).
        "update": {"public_key": public_key, "state_file": home / "updater.json"},
        "update.soak": {"duration_s": soak_s},
    }
    config.write_text("# Written by `quantfleet demo`; see packaging/agent.example.toml.\n"
                      + _tables(tables))
    return AgentSite(device_id, home, config, f"http://127.0.0.1:{port}")


def write_spec(path: Path, name: str, cohort: str, frm: str, to: str, *,
               steps: list[int | str], bake_s: float, min_samples: int,
               holdback: str, max_bake_extensions: int = 4,
               validation_tolerance: float = 0.05) -> Path:
    """A rollout spec (docs/rollouts.md) sized for a demo: short bakes, tight deadlines."""
    path.write_text(yaml.safe_dump({
        "name": name, "cohort": cohort, "from": frm, "to": to, "steps": steps,
        "bake_s": bake_s, "max_bake_extensions": max_bake_extensions,
        "min_samples": min_samples, "holdback": holdback,
        "max_failed_devices": 0, "max_parallel_downloads": 50,
        # The pre-flight of an F16 baseline answers 24 golden items on one thread.
        "deadlines": {"download_s": 120, "preflight_s": 300, "activation_s": 60,
                      "soak_s": 120},
        "gates": [{"metric": "validation_failure_rate", "tolerance": validation_tolerance},
                  {"metric": "p95_latency", "tolerance": 0.5}],
    }, sort_keys=False))
    return path


def remove_agent_models(run_dir: Path) -> int:
    """Delete the agents' variant files once they are stopped; returns the bytes freed.

    The fleet's files (config, store, specs, logs) stay, so every command the demo
    printed still works; the agents' copies of the ladder are all a run would
    otherwise leave behind in hundreds of megabytes.
    """
    freed = 0
    for path in run_dir.glob("agents/*/models/*"):
        if path.is_file() and path.name != "catalog.json":
            freed += path.stat().st_size if path.stat().st_nlink == 1 else 0
            path.unlink()
    return freed
