"""Fleet commands: serve, keys, devices (and their enrolment), the broker's access
control, cohorts, desired state and signals.

Each command reads the fleet config (``--config fleet.toml``) and talks to the
store directly (SQLite file or PostgreSQL) — the same store a running
``quantfleet serve`` writes — so an operator's terminal and the service agree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from quantfleet.agent.wire import TOPIC_ROOT

from .broker import ADMIN_USER, FLEET_USER
from .cli_options import _config, _desired_state, _disconnect, _selector, _store, config_option
from .cohorts import SelectorError, parse_labels

console = Console()
ACK_TIMEOUT_S = 10.0  # how long `desired set` waits for the broker's acknowledgements

def _label_keys(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...]) -> tuple[str, ...]:
    """--by keys: label keys as selectors spell them (letters, digits, . _ - /)."""
    from .cohorts import LABEL_TOKEN

    for key in value:
        if not LABEL_TOKEN.fullmatch(key):
            raise click.BadParameter(f"{key!r} is not a label key (1-63 letters, digits, "
                                     ". _ - /; e.g. cpu.class)")
    return value


def _window(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: use seconds or a number with s, m, h or d") from None
    if value <= 0:
        raise click.BadParameter("must be positive")
    return value


@click.command(name="serve")
@config_option
def serve_cmd(config_path: Path) -> None:
    """Run the fleet: ingest from the broker, desired state, artifacts and the read API.

    \b
    Example:
      quantfleet serve --config packaging/fleet.example.toml
    """
    import logging

    import uvicorn

    from quantfleet.agent.serving.systemd import CleanStopServer

    from .service import FleetService

    cfg = _config(config_path)
    if not logging.getLogger().handlers:  # warnings from the fleet's modules, uvicorn-style
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s:  %(name)s: %(message)s")
    try:
        service = FleetService(cfg).start()
    except Exception as exc:
        raise click.ClickException(f"the fleet could not start: {exc}") from None
    from .ingest import tune_gc

    tune_gc()
    click.echo(f"quantfleet serve: {service.auth_summary()}", err=True)
    click.echo(f"quantfleet serve: {service.replica_summary()}", err=True)
    service.warn_if_open()
    # SIGTERM (systemd's stop) ends run() normally, so the shutdown below runs and the
    # process exits 0: MQTT sessions closed, desired state flushed, the store closed.
    server = CleanStopServer(uvicorn.Config(service.app(), host=cfg.http.host,
                                            port=cfg.http.port, log_level="info",
                                            lifespan="off", ssl_certfile=cfg.http.tls_cert,
                                            ssl_keyfile=cfg.http.tls_key))
    try:
        server.run()
    finally:
        service.stop()
        click.echo("quantfleet serve: stopped (ingest and publisher disconnected, store "
                   "closed)", err=True)


@click.group(name="keys")
def keys_group() -> None:
    """The signing key pair for desired state and artifacts."""


@keys_group.command(name="generate")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for signing.key (private, 0600) and signing.pub.")
def keys_generate(out: Path) -> None:
    """Make an ed25519 key pair: the fleet keeps signing.key, devices get signing.pub.

    \b
    Example:
      quantfleet keys generate --out /etc/quantfleet
    """
    from quantfleet.agent.update.signing import generate_keypair

    if (out / "signing.key").exists():
        raise click.ClickException(f"{out / 'signing.key'} exists; refusing to replace a key "
                                   "devices may already trust")
    from quantfleet.agent.update.signing import key_id, load_public_key

    private, public = generate_keypair(out)
    console.print(f"private key: {private}\npublic key:  {public}\n"
                  f"key id:      {key_id(load_public_key(public))}")


@keys_group.command(name="id")
@click.argument("key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def keys_id(key: Path) -> None:
    """The id of a key (private or public), as desired states name their signer.

    \b
    Example:
      quantfleet keys id /etc/quantfleet/signing.pub
    """
    from quantfleet.agent.update.signing import (
        SignatureError,
        key_id,
        load_private_key,
        load_public_key,
    )

    try:
        public = load_public_key(key)
    except SignatureError:
        try:
            public = load_private_key(key).public_key()
        except SignatureError as exc:
            raise click.ClickException(f"{key}: neither an ed25519 public nor private key "
                                       f"({exc})") from None
    click.echo(key_id(public))


@click.group(name="devices")
def devices_group() -> None:
    """The device registry: what every device is, runs and reports."""


@devices_group.command(name="list")
@config_option
@click.option("--selector", default="*", show_default=True, help="Only devices matching.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@click.option("--watch", "watch_s", type=click.FloatRange(0.2, 3600), default=None,
              metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
def devices_list(config_path: Path, selector: str, as_json: bool,
                 watch_s: float | None) -> None:
    """List devices with their hardware class, labels, liveness, variant and update state.

    The selector sees every label, the cpu.* ones derived from each device's
    hardware fingerprint included; --json has the whole fingerprint.

    \b
    Examples:
      quantfleet devices list --selector hw=rpi5
      quantfleet devices list --selector cpu.class=x86-avx2
      quantfleet devices list --selector cpu.vnni=false,region=eu --json
      quantfleet devices list --selector cohort=canary --watch 2
    """
    sel = _selector(selector)
    store = _store(_config(config_path))

    def rows() -> list[dict[str, Any]]:
        found = store.devices()
        keep = set(sel.select(found))
        return [r for r in found if r["device_id"] in keep]

    if as_json:
        click.echo(json.dumps(rows(), indent=2, default=str))
        return
    if watch_s is None:
        console.print(_devices_table(rows(), str(sel)))
        return
    from rich.live import Live

    with Live(_devices_table(rows(), str(sel)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch_s)
                live.update(_devices_table(rows(), str(sel)), refresh=True)
        except KeyboardInterrupt:
            pass


def _devices_table(rows: list[dict[str, Any]], selector: str) -> Table:
    table = Table(title=f"devices ({selector}) at {time.strftime('%H:%M:%S')}")
    # Identifiers and states never wrap (an operator greps and copies them); the rest
    # folds in a narrow terminal.
    for col in ("device", "hardware", "labels", "online", "variant", "update", "target",
                "detail", "last seen"):
        if col in ("device", "variant", "update"):
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, overflow="fold")
    now = time.time()
    for r in rows:
        # The hardware class is its own column; the other cpu.* labels derive from the
        # same fingerprint and are in `devices show` and --json.
        labels = ",".join(f"{k}={v}" for k, v in sorted((r["labels"] or {}).items())
                          if not k.startswith("cpu."))
        state = r.get("state") or {}
        table.add_row(r["device_id"], hardware_class(r), labels,
                      "yes" if r["online"] else "no",
                      r["variant"] or "-", r["update_state"] or "-",
                      state.get("target") or "-", _state_detail(state),
                      f"{now - r['last_seen']:.0f} s ago")
    return table


def hardware_class(row: dict[str, Any]) -> str:
    """A registry row's hardware class: from its fingerprint, else an operator's
    ``cpu.class`` label (a device whose agent predates fingerprints), else ``-``."""
    hw = row.get("hardware") or {}
    labels = row.get("labels") or {}
    return str(hw.get("cpu_class") or labels.get("cpu.class") or "-")


def _derived_labels(row: dict[str, Any] | None) -> dict[str, str]:
    """The cpu.* labels a registry row's stored fingerprint gives (none without one)."""
    from pydantic import ValidationError

    from quantfleet.agent.wire import HardwareFingerprint, hardware_labels

    hw = (row or {}).get("hardware") or {}
    if not hw:
        return {}
    try:
        return dict(hardware_labels(HardwareFingerprint.model_validate(hw)))
    except ValidationError:  # a row from an older store: its labels stand as they are
        return {}


def _state_detail(state: dict[str, Any]) -> str:
    """A device state's detail: download progress, or why it failed or rolled back."""
    detail = str(state.get("reason") or "")
    if state.get("update_state") == "downloading" and state.get("progress") is not None:
        detail = f"{state['progress']:.0%} {detail}".strip()
    return detail


@devices_group.command(name="show")
@config_option
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def devices_show(config_path: Path, device_id: str, as_json: bool) -> None:
    """One device: its registry row, and what the fleet could not take from it —
    messages rejected (by reason), events dead-lettered, holes in its sequence.

    \b
    Example:
      quantfleet devices show edge-001
    """
    store = _store(_config(config_path))
    row = next((d for d in store.devices() if d["device_id"] == device_id), None)
    rejected = store.rejection_counts(device_id)
    dead = store.dead_letter_count(device_id)
    gaps = store.seq_gaps([device_id])
    if row is None and not rejected and not dead:
        raise click.ClickException(f"no device {device_id!r} in the registry, and nothing "
                                   "rejected from it")
    desired = next(iter(store.desired([device_id])), None)
    doc: dict[str, Any] = {
        "device_id": device_id, "registry": row,
        "desired": None if desired is None else {
            "revision": desired.revision, "variant": desired.variant,
            "rollout_id": desired.rollout_id},
        "rejected": rejected, "dead_lettered": dead,
        "seq_gaps": [{"first": g.first, "last": g.last, "events": g.events,
                      "restart": g.restart} for g in gaps]}
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    table = Table(title=f"device {device_id}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    if row is not None:
        labels = ",".join(f"{k}={v}" for k, v in sorted((row["labels"] or {}).items()))
        state = row.get("state") or {}
        for name, value in (
                ("online", "yes" if row["online"] else "no"),
                ("last seen", f"{time.time() - row['last_seen']:.0f} s ago"),
                ("hardware", hardware_class(row)), ("labels", labels or "-"),
                ("variant", row["variant"] or "-"), ("update", row["update_state"] or "-"),
                ("detail", _state_detail(state) or "-")):
            table.add_row(name, value)
    if desired is not None:
        table.add_row("desired", f"{desired.variant} (revision {desired.revision})")
    table.add_row("rejected", ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
                  or "none")
    table.add_row("dead-lettered", str(dead))
    table.add_row("sequence gaps", ", ".join(f"{g.first}-{g.last}" for g in gaps) or "none")
    console.print(table)


@devices_group.command(name="history")
@config_option
@click.argument("device_id")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000),
              help="The newest N update states.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def devices_history(config_path: Path, device_id: str, limit: int, as_json: bool) -> None:
    """Every update step a device reported (its `state` telemetry events), oldest first.

    \b
    Example:
      quantfleet devices history edge-001
    """
    from sqlalchemy import select

    from .store import schema

    store = _store(_config(config_path))
    e = schema.events
    q = (select(e.c.body).where(e.c.device_id == device_id, e.c.kind == "state")
         .order_by(e.c.ts.desc(), e.c.seq.desc()).limit(limit))
    with store.engine.connect() as conn:
        rows = [json.loads(b) if isinstance(b, str) else b for (b,) in conn.execute(q)]
    rows.reverse()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise click.ClickException(f"no update states from {device_id!r} yet")
    table = Table(title=f"update history of {device_id}")
    for col in ("time", "state", "target", "serving", "revision", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(r["ts"])), r["update_state"],
                      r.get("target") or "-", r.get("variant") or "-",
                      str(r.get("desired_revision") or "-"), _state_detail(r))
    console.print(table)


@devices_group.command(name="label")
@config_option
@click.argument("device_id")
@click.argument("labels", nargs=-1, required=True)
def devices_label(config_path: Path, device_id: str, labels: tuple[str, ...]) -> None:
    """Set a device's labels (replacing them), e.g. hw=rpi5 region=eu.

    The cpu.* labels derived from the device's hardware fingerprint are kept
    and win over a label of the same key given here (they are facts, not
    configuration; docs/hardware.md).

    \b
    Example:
      quantfleet devices label kiosk-17 hw=rpi5 region=eu
    """
    try:
        parsed = parse_labels(labels)
    except SelectorError as exc:
        raise click.ClickException(str(exc)) from None
    store = _store(_config(config_path))
    row = next((r for r in store.devices(["device_id", "hardware"])
                if r["device_id"] == device_id), None)
    derived = _derived_labels(row)
    for key in sorted(parsed.keys() & derived.keys()):
        if parsed[key] != derived[key]:
            click.echo(f"{device_id}: {key}={parsed[key]} not set: {key} is derived from "
                       f"the device's hardware ({derived[key]})", err=True)
    merged = {**parsed, **derived}
    store.set_labels(device_id, merged)
    store.audit("operator", "device.label", f"device:{device_id}",
                {"labels": merged, "given": parsed})
    console.print(f"{device_id}: {merged}")


def _admin_options(f: Any) -> Any:
    """--admin-user and --admin-password-file: the broker's dynamic-security admin."""
    f = click.option("--admin-password-file", type=click.Path(dir_okay=False, path_type=Path),
                     default=Path("/etc/mosquitto/quantfleet/admin.mqtt-password"),
                     show_default=True, envvar="QUANTFLEET_BROKER_ADMIN_PASSWORD_FILE",
                     help="The admin's password.")(f)
    return click.option("--admin-user", default=ADMIN_USER, show_default=True,
                        help="The broker's dynamic-security admin (made by `quantfleet broker "
                        "init`).")(f)


def _dynsec(cfg: Any, admin_user: str, admin_password_file: Path, device_id: str,
            commands: list[dict[str, Any]], what: str) -> None:
    """Run control commands as the admin on the fleet config's broker."""
    from .broker import DynsecControl, DynsecError

    admin = cfg.mqtt.model_copy(update={"username": admin_user, "password_env": None,
                                        "password_file": admin_password_file})
    try:
        DynsecControl(admin).run(commands)
    except ValueError as exc:  # the admin's password file
        raise click.ClickException(str(exc)) from None
    except DynsecError as exc:
        hint = {"already exists": " (already enrolled? --rotate gives it a new password)",
                "not found": " (not enrolled?)"}
        extra = next((h for k, h in hint.items() if k in str(exc)), "")
        raise click.ClickException(f"{device_id}: not {what}: {exc}{extra}") from None


def _checked(device_id: str, fleet_user: str | None = None) -> str:
    from .broker import check_device_id

    try:
        check_device_id(device_id, (fleet_user,))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return device_id


@devices_group.command(name="enroll")
@config_option
@click.argument("device_id")
@click.option("--client-id", default=None,
              help="The agent's mqtt.client_id, if its config sets one (default: qf-DEVICE_ID).")
@click.option("--rotate", is_flag=True,
              help="The device is enrolled: give both its users a new password instead "
              "(their sessions are disconnected until the device has it).")
@_admin_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def devices_enroll(config_path: Path, device_id: str, client_id: str | None, rotate: bool,
                   admin_user: str, admin_password_file: Path, as_json: bool) -> None:
    """Give a device its broker credential: a random password (shown once) and two
    users bound to the agent's two client ids, with a role that allows only the
    device's own topics.

    Runs against the running broker of the fleet config (`[mqtt] broker`), through
    the dynamic security plugin's control topic, as the admin user. Then it issues
    the device's artifact credential where this build has one.

    \b
    Example:
      quantfleet devices enroll pi-07 --config /etc/quantfleet/fleet.toml
      quantfleet devices enroll pi-07 --rotate      # a new password
    """
    from .broker import device_users, enroll_commands, new_password, rotate_commands

    cfg = _config(config_path)
    _checked(device_id, cfg.mqtt.username)
    password = new_password()
    if rotate:
        commands = rotate_commands(device_id, password, client_id=client_id)
    else:
        commands = enroll_commands(device_id, password, root=cfg.mqtt.topic_root,
                                   client_id=client_id, reserved=(cfg.mqtt.username,))
    _dynsec(cfg, admin_user, admin_password_file, device_id, commands,
            "rotated" if rotate else "enrolled")
    users = device_users(device_id, client_id)
    if not as_json:
        click.echo(f"{device_id}: {'new password' if rotate else 'enrolled'} on "
                   f"{cfg.mqtt.broker}: "
                   + ", ".join(f"user {u!r} as client {c!r}" for u, c in users))
        click.echo(f"MQTT password (shown once, store it on the device): {password}")
        if not rotate:
            click.echo("agent config:\n  [telemetry.mqtt]\n"
                       f"  username = \"{users[0][0]}\"\n"
                       f"  update_username = \"{users[1][0]}\"\n  password_file = "
                       "\"/run/credentials/quantfleet-agent.service/mqtt-password\"")
    # After the password is out: a failing artifact credential must not lose it.
    artifact, failure = None, None
    if not rotate:
        try:
            artifact = _issue_artifact_credential(device_id)
        except Exception as exc:  # the auth module's own errors
            failure = f"{type(exc).__name__}: {exc}"
    if as_json:
        click.echo(json.dumps({
            "device_id": device_id, "password": password,
            "users": [{"username": u, "client_id": c} for u, c in users],
            "artifact_credential": artifact, "artifact_error": failure}))
    elif rotate:
        pass
    elif failure is not None or artifact is None:
        click.echo(f"artifact credential: NOT issued ({failure})")
    else:
        click.echo(f"artifact credential (shown once): {artifact['token']}")
        click.echo(f"add to the fleet's [http.auth] devices: {artifact['toml']}")
    if failure is not None:
        raise click.ClickException(f"{device_id}: enrolled on the broker, but the artifact "
                                   f"credential was not issued: {failure}")


@devices_group.command(name="revoke")
@config_option
@click.argument("device_id")
@_admin_options
def devices_revoke(config_path: Path, device_id: str, admin_user: str,
                   admin_password_file: Path) -> None:
    """Take a device off the broker: delete its two users (their sessions are
    disconnected) and its role. Its artifact credential is revoked separately.

    \b
    Example:
      quantfleet devices revoke pi-07
    """
    from .broker import revoke_commands

    cfg = _config(config_path)
    _dynsec(cfg, admin_user, admin_password_file, device_id,
            revoke_commands(_checked(device_id, cfg.mqtt.username)), "revoked")
    click.echo(f"{device_id}: revoked on {cfg.mqtt.broker} (users and role deleted); its "
               "artifact credential is revoked separately")


def _issue_artifact_credential(device_id: str) -> dict[str, Any]:
    """The device's artifact (HTTP) credential: the token, once, and its config entry."""
    from . import auth

    token, entry = auth.issue_device_credential(device_id)
    return {"token": token, "config_entry": entry.model_dump(), "toml": auth.toml_entry(entry)}


@click.group(name="broker")
def broker_group() -> None:
    """The MQTT broker's access control (Mosquitto's dynamic security plugin)."""


@broker_group.command(name="init")
@click.option("--dir", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/mosquitto/quantfleet"), show_default=True,
              help="Where dynamic-security.json and the two password files go.")
@click.option("--topic-root", default=TOPIC_ROOT, show_default=True,
              help="The fleet config's [mqtt] topic_root.")
@click.option("--fleet-user", default=FLEET_USER, show_default=True,
              help="The fleet's username ([mqtt] username in the fleet config).")
@click.option("--force", is_flag=True, help="Replace an existing dynamic-security.json.")
def broker_init(out: Path, topic_root: str, fleet_user: str, force: bool) -> None:
    """Write the broker's first access-control file, with the fleet's user and role and
    an admin for `quantfleet devices enroll`; run it before the broker's first start.

    Random passwords go to fleet.mqtt-password and admin.mqtt-password (mode 0600).
    The plugin owns the JSON file from its first start on: add devices with
    `quantfleet devices enroll`, not by editing it.

    \b
    Example:
      quantfleet broker init --dir /etc/mosquitto/quantfleet
      chown mosquitto: /etc/mosquitto/quantfleet{,/dynamic-security.json}
    """
    from .broker import initial_config, new_password

    target = out / "dynamic-security.json"
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists (the broker's users and devices); "
                                   "--force replaces it")
    out.mkdir(parents=True, exist_ok=True)
    fleet_pw, admin_pw = new_password(), new_password()
    for name, secret in (("fleet.mqtt-password", fleet_pw), ("admin.mqtt-password", admin_pw)):
        _write_private(out / name, secret + "\n")
    _write_private(target, json.dumps(initial_config(fleet_pw, admin_pw, root=topic_root,
                                                     fleet_user=fleet_user), indent=2) + "\n")
    click.echo(f"{target}: users {ADMIN_USER!r} (enrols devices) and {fleet_user!r} (the "
               f"fleet), topics under {topic_root}/")
    click.echo(f"passwords: {out / 'fleet.mqtt-password'} (the fleet config's [mqtt] "
               f"password_file), {out / 'admin.mqtt-password'} (devices enroll)")


def _write_private(path: Path, text: str) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


@click.group(name="cohorts")
def cohorts_group() -> None:
    """Cohorts are label selectors, evaluated live."""


@cohorts_group.command(name="show")
@config_option
@click.argument("selector")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def cohorts_show(config_path: Path, selector: str, as_json: bool) -> None:
    """Show which devices a selector picks now, what they run and on which hardware.

    \b
    Examples:
      quantfleet cohorts show 'hw=rpi5,region=eu'
      quantfleet cohorts show 'cpu.class=x86-avx2|x86-avx2-vnni'
    """
    sel = _selector(selector)
    store = _store(_config(config_path))
    rows = store.devices(["device_id", "labels", "variant", "hardware"])
    ids = sel.select(rows)
    by_variant: dict[str, int] = {}
    by_class: dict[str, int] = {}
    for r in rows:
        if r["device_id"] in ids:
            by_variant[r["variant"] or "-"] = by_variant.get(r["variant"] or "-", 0) + 1
            by_class[hardware_class(r)] = by_class.get(hardware_class(r), 0) + 1
    if as_json:
        click.echo(json.dumps({"selector": str(sel), "devices": ids, "variants": by_variant,
                               "hardware_classes": by_class}))
        return
    console.print(f"cohort {sel}: {len(ids)} devices")
    for variant, n in sorted(by_variant.items()):
        console.print(f"  {variant}: {n}")
    if by_class:
        console.print("  hardware: " + ", ".join(f"{c} {n}" for c, n in
                                                  sorted(by_class.items())))


@click.group(name="desired")
def desired_group() -> None:
    """Desired state: the variant each device should run."""


@desired_group.command(name="set")
@config_option
@click.option("--cohort", "selector", default=None, help="A label selector.")
@click.option("--device", "devices", multiple=True, help="A device id (repeatable).")
@click.option("--variant", required=True, help="Catalog name or precision label.")
def desired_set(config_path: Path, selector: str | None, devices: tuple[str, ...],
                variant: str) -> None:
    """Point devices at a variant: signed, retained, delivered when they come back.

    Waits up to 10 s for the broker to acknowledge every device's desired state, and
    says which it did not (they are stored, and re-published when the fleet restarts).

    \b
    Example:
      quantfleet desired set --cohort hw=rpi5 --variant Q4_K_M
    """
    from .desired import DesiredStateError, unacknowledged_message

    if not selector and not devices:
        raise click.UsageError("give --cohort SELECTOR or --device ID")
    cfg = _config(config_path)
    store = _store(cfg)
    ids = list(devices)
    if selector:
        ids += [d for d in _selector(selector).select(store.devices()) if d not in ids]
    if not ids:
        raise click.ClickException(f"no device matches {selector!r}")
    desired, client = _desired_state(cfg, store, "cli")
    try:
        done = desired.set_variant(ids, variant)
        # This command's own publications, waited for here: outside any rollout tick.
        missing = desired.wait_acknowledged(done, ACK_TIMEOUT_S)
    except DesiredStateError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        _disconnect(client)
    unacked = {d.device_id for d in missing}
    for p in done:
        if p.device_id not in unacked:
            console.print(f"{p.device_id}: {p.variant} (revision {p.revision})")
    if missing:
        raise click.ClickException(unacknowledged_message(missing, ACK_TIMEOUT_S))


@click.command(name="signals")
@config_option
@click.option("--cohort", "selector", default="*", show_default=True,
              help="Only devices matching this selector.")
@click.option("--window", "window_text", default="1h", show_default=True,
              help="How far back: seconds, or 30m, 1h, 7d.")
@click.option("--reference", "reference_text", default=None,
              help="Also compare drift with the window this far before it (e.g. 1d).")
@click.option("--by", "by", multiple=True, callback=_label_keys, metavar="LABEL",
              help="Split each variant's row by this label (repeatable), e.g. cpu.class.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def signals_cmd(config_path: Path, selector: str, window_text: str,
                reference_text: str | None, by: tuple[str, ...], as_json: bool) -> None:
    """Per-variant quality and cost signals of a cohort over a window (the dashboard).

    With --by LABEL, a row per variant and value of the label: --by cpu.class
    shows each variant on each hardware class.

    \b
    Examples:
      quantfleet signals --cohort hw=rpi5 --window 1h --reference 1d
      quantfleet signals --cohort cpu.class=x86-avx2 --window 30m
      quantfleet signals --by cpu.class --json
    """
    from . import signals

    sel = _selector(selector)
    window = _window(window_text)
    store = _store(_config(config_path))
    devices = store.devices(["device_id", "labels"])
    ids = sel.select(devices)
    end = time.time()
    rows = signals.by_variant(store, end - window, end, device_ids=ids, by=by,
                              labels={d["device_id"]: d["labels"] or {} for d in devices})
    drift = None
    if reference_text:
        back = _window(reference_text)
        drift = signals.drift(store, str(sel), (end - window, end),
                              (end - back - window, end - back), device_ids=ids)
    if as_json:
        click.echo(json.dumps({"selector": str(sel), "window_s": window, "by": list(by),
                               "variants": [s.to_json() for s in rows],
                               "drift": drift.to_json() if drift else None}, indent=2))
        return

    def rate(r: signals.Rate) -> str:  # the estimate, its 95 % interval below it
        return "-" if r.value is None else f"{r.value:.1%}\n[{r.low:.1%},{r.high:.1%}]"

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    table = Table(title=f"signals of {sel} over {window_text} (latency in ms)")
    width = max([len(s.group) for s in rows] + [7])
    # The variant's name is never cut; a narrow terminal folds the other cells.
    table.add_column("variant", no_wrap=True, min_width=width)
    for key in by:
        table.add_column(key, no_wrap=True)
    for col in ("requests", "validation fail", "tool-call ok", "refusal", "fallback", "p50",
                "p95", "p99", "tokens/success"):
        table.add_column(col, overflow="fold")
    for s in rows:
        cost = "-" if s.cost_per_success_tokens is None else f"{s.cost_per_success_tokens:.0f}"
        table.add_row(s.group, *(s.by.get(k, "-") for k in by), str(s.requests),
                      rate(s.validation_failure),
                      rate(s.tool_call_success), rate(s.refusal), rate(s.fallback),
                      secs(s.latency_p50_s), secs(s.latency_p95_s), secs(s.latency_p99_s), cost)
    console.print(table)
    if drift:
        console.print(f"drift vs {reference_text} before: prompt tokens KS="
                      f"{drift.prompt_tokens_ks} (p={drift.prompt_tokens_p_value}), medians "
                      f"{drift.prompt_tokens_median}, tool usage {drift.tool_usage}, "
                      f"truncation {drift.truncation}")


@click.command(name="simulate")
@config_option
@click.option("--devices", "n_devices", default=200, show_default=True,
              type=click.IntRange(1, 100_000), help="How many devices to simulate.")
@click.option("--baseline", default="Q8_0", show_default=True,
              help="The variant every device starts on.")
@click.option("--rate", default=1.0, show_default=True, type=click.FloatRange(0, 1000),
              help="Requests per second per device.")
@click.option("--duration", default=0.0, show_default="until Ctrl-C",
              type=click.FloatRange(0), help="Seconds to run.")
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Per-variant quality from `quantfleet eval --json` output.")
@click.option("--fail-updates", default=0.0, type=click.FloatRange(0, 1),
              help="Share of devices whose update fails.")
@click.option("--offline-on-update", default=0.0, type=click.FloatRange(0, 1),
              help="Share of devices that go offline when asked to update.")
@click.option("--prefix", default="sim", show_default=True, help="Device id prefix.")
@click.option("--classes", default=None, metavar="CLASS=SHARE,...",
              help="Hardware classes of the devices and their shares, e.g. "
              "x86-avx512-vnni=0.6,x86-avx2=0.3,arm-dotprod=0.1 (unknown: no hardware "
              "reported); each birth carries a fingerprint of its class. Default: none.")
@click.option("--class-regression", "class_regressions", multiple=True,
              metavar="VARIANT@CLASS:EFFECTS", help="Make a variant worse on one class: "
              "json+P adds P to its validation-failure probability, latency*K multiplies "
              "its latency, e.g. Q4_K_M@x86-avx2:json+0.3,latency*2 (repeatable).")
def simulate_cmd(config_path: Path, n_devices: int, baseline: str, rate: float,
                 duration: float, profile: Path | None, fail_updates: float,
                 offline_on_update: float, prefix: str, classes: str | None,
                 class_regressions: tuple[str, ...]) -> None:
    """Simulate devices on the real wire protocol: births, updates, telemetry.

    \b
    Example:
      quantfleet simulate --devices 300 --baseline Q8_0 --duration 600
      quantfleet simulate --devices 300 --classes x86-avx2=0.5,arm-dotprod=0.5 \\
          --class-regression Q4_K_M@x86-avx2:json+0.3
    """
    from quantfleet.models.catalog import Catalog, CatalogError

    from .simulate import (
        Faults,
        FleetSimulator,
        SimulateOptionError,
        load_profile,
        parse_class_mix,
        parse_class_regression,
    )

    try:
        mix = parse_class_mix(classes) if classes is not None else None
        regressions = [parse_class_regression(r) for r in class_regressions]
    except SimulateOptionError as exc:
        raise click.BadParameter(str(exc)) from None
    cfg = _config(config_path)
    try:
        base = Catalog(cfg.artifacts.models_dir).resolve(baseline).name
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        sim = FleetSimulator(cfg.mqtt, n_devices, baseline=base, requests_per_s=rate,
                             profile=load_profile(profile), prefix=prefix, classes=mix,
                             faults=Faults(fail_update=fail_updates,
                                           offline_on_update=offline_on_update,
                                           class_regressions=regressions))
    except SimulateOptionError as exc:
        raise click.BadParameter(str(exc)) from None
    sim.start()
    console.print(f"simulating {n_devices} devices on {base}")
    started = time.monotonic()
    try:
        while not duration or time.monotonic() - started < duration:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    console.print(f"published {sim.published} messages; devices per variant: {sim.variants()}")


def _rollout_group() -> click.Group:
    from .rollouts.cli import rollout_group

    return rollout_group


COMMANDS = [serve_cmd, keys_group, devices_group, broker_group, cohorts_group, desired_group,
            signals_cmd, simulate_cmd, _rollout_group()]
