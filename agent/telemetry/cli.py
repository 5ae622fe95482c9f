"""``quantfleet-agent telemetry …``: run the telemetry path, inspect an outbox, write schemas."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from quantfleet.agent.mqtt import parse_broker_url
from quantfleet.agent.telemetry.config import TelemetryConfig, default_state_dir
from quantfleet.strict import explain

#: Where ``telemetry schemas`` writes by default: the repository's docs/schemas/ when run
#: from the repository's root. The schemas are rendered from the wire models, never read
#: from a source tree, so the command works the same from an installed wheel.
SCHEMAS_DIR = Path("docs") / "schemas"


def load_config(path: Path | None, overrides: dict[str, Any]) -> TelemetryConfig:
    """The ``[telemetry]`` table of an agent config (or a file holding only it) + overrides."""
    doc: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.ClickException(f"{path}: {exc}") from None
        doc = raw.get("telemetry", raw)
        if not isinstance(doc, dict):
            raise click.ClickException(f"{path}: [telemetry] must be a table")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return TelemetryConfig.model_validate(doc)
    except ValidationError as exc:
        raise click.ClickException(explain(exc, where=where, whole="(top level)",
                                           unknown="unknown option", rest="count")) from None


def _broker(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_broker_url(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.group(name="telemetry")
def telemetry_group() -> None:
    """The telemetry path: SQLite outbox forwarded to MQTT."""


@telemetry_group.command(name="run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Agent config (TOML) with a [telemetry] table.")
@click.option("--device-id", default=None, help="This device's id (overrides the config).")
@click.option("--broker", default=None, callback=_broker,
              help="mqtt://host:port or mqtts://host:port (overrides the config).")
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default=None,
              help="MQTT protocol version (overrides the config).")
@click.option("--outbox", "outbox_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Outbox SQLite file (overrides the config).")
@click.option("--synthetic-rate", default=0.0, type=click.FloatRange(0),
              help="Append this many synthetic request events per second (testing, demos).")
@click.option("--synthetic-count", default=0, type=click.IntRange(0),
              help="Stop appending after this many synthetic events (0: none).")
@click.option("--exit-when-drained", is_flag=True,
              help="After the synthetic events, exit once the outbox is empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on exit.")
def telemetry_run(config_file: Path | None, device_id: str | None, broker: str | None,
                  protocol: str | None, outbox_path: Path | None, synthetic_rate: float,
                  synthetic_count: int, exit_when_drained: bool, as_json: bool) -> None:
    """Run the outbox and publisher until SIGTERM/SIGINT (or drained).

    \b
    Example:
      quantfleet-agent telemetry run --device-id pi-07 --broker mqtt://127.0.0.1:1883 \\
          --synthetic-rate 100 --synthetic-count 1000 --exit-when-drained
    """
    from quantfleet.agent.telemetry.service import TelemetryService
    from quantfleet.agent.wire import RequestEvent

    cfg = load_config(config_file, {"device_id": device_id, "mqtt.broker": broker,
                                    "mqtt.protocol": protocol,
                                    "outbox.path": str(outbox_path) if outbox_path else None})
    service = TelemetryService(cfg).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    appended = 0
    started = time.monotonic()
    epoch = service.outbox.boot_epoch
    while not stop.is_set() and appended < synthetic_count:
        due = synthetic_count if synthetic_rate <= 0 else int(
            (time.monotonic() - started) * synthetic_rate)
        for _ in range(min(due, synthetic_count) - appended):
            service.record(RequestEvent(request_id=f"syn-{epoch}-{appended}", ts=time.time(),
                                        variant="synthetic", latency_s=0.05,
                                        prompt_tokens=12, completion_tokens=24))
            appended += 1
        stop.wait(0.005)
    if exit_when_drained:
        service.aggregator.flush(everything=True)
        service.queue_device_status()
        while not stop.is_set():
            service.outbox.flush()
            s = service.outbox.stats()
            if s["rows"] == 0 and s["buffered"] == 0:
                break
            stop.wait(0.1)
    else:
        stop.wait()
    service.close()
    summary = {"device_id": cfg.device_id, "boot_epoch": epoch, "appended": appended,
               **service.publisher.stats(), **service.outbox.stats()}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"epoch {epoch}: appended {appended}, published "
                   f"{summary['published_events']} events in {summary['published_batches']} "
                   f"batches, {summary['rows']} left in the outbox")


@telemetry_group.command(name="status")
@click.option("--outbox", "outbox_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Outbox file (default: the state directory's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def telemetry_status(outbox_path: Path | None, as_json: bool) -> None:
    """Show an outbox's backlog (read-only; works while the agent runs).

    \b
    Example:
      quantfleet-agent telemetry status --outbox /var/lib/quantfleet/outbox.db --json
    """
    path = outbox_path or default_state_dir() / "telemetry" / "outbox.db"
    if not path.exists():
        raise click.ClickException(f"{path}: no outbox there (give --outbox)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        kinds = dict(conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall())
        rows, size, oldest = conn.execute(
            "SELECT count(*), total(size), min(ts) FROM outbox").fetchone()
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise click.ClickException(f"{path}: not a readable outbox ({exc})") from None
    info = {"path": str(path), "rows": rows, "bytes": int(size), "by_kind": kinds,
            "oldest_age_s": None if oldest is None else round(time.time() - oldest, 1),
            "boot_epoch": meta.get("boot_epoch"), "next_seq": meta.get("next_seq"),
            "evicted_total": meta.get("evicted_total", 0)}
    if as_json:
        click.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    for key, value in info.items():
        if key != "path":
            table.add_row(key, str(value))
    Console().print(table)


@telemetry_group.command(name="schemas")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=SCHEMAS_DIR,
              show_default="docs/schemas, under the current directory",
              help="Directory to write the JSON Schemas to.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if the files differ.")
def telemetry_schemas(out: Path, check: bool) -> None:
    """Write the JSON Schema of every wire payload (generated from agent/wire.py).

    \b
    Example:
      quantfleet-agent telemetry schemas --check           # in the repository
      quantfleet-agent telemetry schemas --out ./schemas   # anywhere
    """
    from quantfleet.agent.telemetry.schemas import render_schemas

    rendered = render_schemas()
    if check and not out.is_dir():
        raise click.ClickException(f"{out}: no such directory (run from the repository's "
                                   "root, or give --out)")
    stale = [n for n, text in rendered.items()
             if not (out / n).exists() or (out / n).read_text() != text]
    if check:
        if stale:
            raise click.ClickException(f"{out}: out of date: {', '.join(stale)} "
                                       "(run `quantfleet-agent telemetry schemas`)")
        click.echo(f"{len(rendered)} schemas up to date")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text)
    click.echo(f"wrote {len(rendered)} schemas to {out}")
