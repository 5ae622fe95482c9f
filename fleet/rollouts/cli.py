"""``quantfleet rollout …``: create, watch, steer and explain staged rollouts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..cli_options import _config, _desired_state, _disconnect, _store, config_option
from ..desired import DesiredState, unacknowledged_message
from .engine import RolloutEngine, RolloutError
from .leases import leases
from .spec import SpecError, load_spec

console = Console()
ACK_TIMEOUT_S = 10.0  # how long a command that points devices waits for the broker


def _engine(config_path: Path, *, assign: bool = False
            ) -> tuple[RolloutEngine, DesiredState | None]:
    cfg = _config(config_path)
    store = _store(cfg)

    def resolve(label: str) -> str:
        from quantfleet.models.catalog import Catalog, CatalogError

        try:
            name: str = Catalog(cfg.artifacts.models_dir).resolve(label).name
            return name
        except CatalogError as exc:
            raise click.ClickException(str(exc)) from None

    desired: DesiredState | None = None
    if assign:
        desired, _client = _desired_state(cfg, store, "rollout")
        setter = desired

        def do_assign(ids: Any, variant: str, rollout_id: str) -> None:
            setter.set_variant(ids, variant, rollout_id=rollout_id, actor="rollout")
    else:
        def do_assign(ids: Any, variant: str, rollout_id: str) -> None:
            raise click.ClickException("internal: this command does not assign devices")
    return RolloutEngine(store, do_assign, resolve), desired


def _close(desired: DesiredState | None) -> None:
    """Wait for the broker to acknowledge what this command pointed devices at, then
    disconnect; say which it did not (stored: the fleet re-publishes it at its start)."""
    if desired is None:
        return
    try:
        missing = desired.wait_acknowledged(None, ACK_TIMEOUT_S)
    finally:
        _disconnect(desired.client)
    if missing:
        click.echo(unacknowledged_message(missing, ACK_TIMEOUT_S), err=True)


@click.group(name="rollout")
def rollout_group() -> None:
    """Staged precision rollouts with statistical gates and automatic rollback."""


@rollout_group.command(name="create")
@config_option
@click.argument("spec_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--unpin", is_flag=True, help="Allow a candidate that an earlier rollback "
              "pinned off this cohort.")
def rollout_create(config_path: Path, spec_file: Path, unpin: bool) -> None:
    """Start a rollout from a YAML spec; the running fleet advances it.

    \b
    Example:
      quantfleet rollout create rollouts/q4km-eu.yaml
    """
    try:
        spec = load_spec(spec_file)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    engine, _ = _engine(config_path)
    try:
        engine.create(spec, unpin=unpin)
    except RolloutError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"rollout {spec.name}: {spec.from_variant} → {spec.to_variant} on "
                  f"{spec.cohort}, steps {spec.steps}")


def _status(engine: RolloutEngine, rollout_id: str) -> dict[str, Any]:
    r = engine.get(rollout_id)
    spec = engine.spec(rollout_id)
    members = engine.members(rollout_id)
    by_outcome: dict[str, int] = {}
    for m in members:
        key = m["role"] if m["role"] == "control" else m["outcome"]
        by_outcome[key] = by_outcome.get(key, 0) + 1
    verdicts = [a for a in engine.store.audit_log(f"rollout:{rollout_id}", 1000)
                if a["action"] == "rollout.verdict"]
    lease = leases(engine.store, [rollout_id]).get(rollout_id)
    return {"id": rollout_id, "state": r["state"], "step": r["step"] + 1,
            "steps": spec.steps, "phase": r["phase"], "bake_extensions": r["bake_extensions"],
            "reason": r["reason"], "from": spec.from_variant, "to": spec.to_variant,
            "cohort": spec.cohort, "devices": by_outcome,
            "last_verdict": verdicts[0]["evidence"] if verdicts else None,
            "leader": lease.to_json() if lease else None}


@rollout_group.command(name="status")
@config_option
@click.argument("rollout_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until it ends.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def rollout_status(config_path: Path, rollout_id: str | None, watch: bool,
                   as_json: bool) -> None:
    """Progress per step, devices per state, and every gate with its evidence.

    \b
    Example:
      quantfleet rollout status q4km-eu --watch
    """
    engine, _ = _engine(config_path)
    if rollout_id is None:
        rows = engine.rollouts()
        held = leases(engine.store)
        lead = {i: lease.holder for i, lease in held.items() if lease.live}
        if as_json:
            click.echo(json.dumps([{**{k: r[k] for k in ("id", "state", "step", "reason")},
                                    "leader": lead.get(r["id"])} for r in rows]))
            return
        table = Table(title="rollouts")
        for col in ("id", "state", "step", "leader", "reason"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["id"], r["state"], str(r["step"] + 1), lead.get(r["id"], "-"),
                          r["reason"])
        console.print(table)
        return
    while True:
        try:
            st = _status(engine, rollout_id)
        except RolloutError as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(json.dumps(st, default=str))
        else:
            _print_status(st)
        if not watch or st["state"] in ("completed", "rolled_back", "aborted"):
            return
        time.sleep(2)


def _print_status(st: dict[str, Any]) -> None:
    console.rule(f"rollout {st['id']}: {st['state']}")
    console.print(f"{st['from']} → {st['to']} on {st['cohort']}; step {st['step']} of "
                  f"{len(st['steps'])} {st['steps']} ({st['phase']}, bake extensions "
                  f"{st['bake_extensions']})")
    verdict = st["last_verdict"]
    if st["reason"]:
        console.print(f"reason: {st['reason']}", markup=False, highlight=False)
    console.print("devices: " + ", ".join(f"{k} {v}" for k, v in sorted(st["devices"].items())))
    console.print(_leader_line(st), markup=False, highlight=False, soft_wrap=True)
    if verdict:
        console.print(gate_table(verdict, reason=verdict.get("reason") != st["reason"]))


def _leader_line(st: dict[str, Any]) -> str:
    """Which fleet replica advances the rollout (the holder of its lease)."""
    lease = st.get("leader")
    if lease is None:
        return "leader: none yet (no fleet replica has ticked it)"
    if lease["live"] and st["state"] == "running":
        return (f"leader: {lease['holder']} (lease token {lease['token']}, expires in "
                f"{lease['expires_in_s']:g} s unless renewed)")
    return (f"leader: none now; last {lease['holder']} (token {lease['token']}, lease "
            f"ended {-lease['expires_in_s']:g} s ago)")


def _groups(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """The classes and strata worth rows of their own: every stratum, and the hardware
    classes when there is more than one (or one is required) — a lone class is the pool."""
    classes = list((verdict.get("classes") or {}).values())
    if len(classes) < 2 and not any(c.get("required") for c in classes):
        classes = []
    rank = {"fail": 0, "insufficient": 1}  # what decided first
    return sorted(classes, key=lambda g: rank.get(g["verdict"], 2)) + sorted(
        (verdict.get("stratum_verdicts") or {}).values(),
        key=lambda g: rank.get(g["verdict"], 2))


def gate_table(verdict: dict[str, Any], *, reason: bool = True) -> RenderableType:
    """Each gate of a verdict: estimate, interval, sample sizes and p (status, demo) —
    pooled, then a table for each hardware class and stratum judged on its own (its
    name and verdict in the title, which wraps on a narrow terminal where a column
    would be cut); the verdict's reason under them (``reason``)."""

    def f(v: Any, pct: bool) -> str:
        if v is None:
            return "-"
        return f"{v:.1%}" if pct else f"{v:.3g}"

    def table(title: str, gates: list[dict[str, Any]]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in ("gate", "verdict", "canary", "control", "estimate", "95% interval",
                    "n canary/control", "p"):
            t.add_column(col)
        for g in gates:
            pct = g["metric"].endswith("_rate")
            t.add_row(g["metric"], g["verdict"], f(g["canary"], pct), f(g["control"], pct),
                      f(g["estimate"], pct), f"[{f(g['low'], pct)}, {f(g['high'], pct)}]",
                      f"{g['canary_n']}/{g['control_n']}", f(g["p_value"], False))
        return t

    groups = _groups(verdict)
    parts: list[RenderableType] = [table(
        f"last verdict: step {verdict.get('step', 0) + 1} {verdict['verdict']} "
        f"({verdict['canary_devices']} canary vs {verdict['control_devices']} control "
        f"devices){', pooled' if groups else ''}", verdict["gates"])]
    for grp in groups:
        required = f", {grp['required']} canaries required" if grp.get("required") else ""
        parts.append(table(f"{grp['label']}={grp['value']}: {grp['verdict']} "
                           f"({grp['canary_devices']} canary vs {grp['control_devices']} "
                           f"control devices{required})", grp["gates"]))
    if reason and verdict.get("reason"):
        parts.append(Text(verdict["reason"]))
    return parts[0] if len(parts) == 1 else Group(*parts)


def _control(action: str) -> Any:
    @click.command(name=action)
    @config_option
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Recorded in the audit log.")
    def command(config_path: Path, rollout_id: str, reason: str) -> None:
        engine, desired = _engine(config_path, assign=action in ("promote", "abort"))
        try:
            if action == "abort":
                engine.abort(rollout_id, reason=reason)
            else:
                getattr(engine, action)(rollout_id)
        except RolloutError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            _close(desired)
        console.print(f"rollout {rollout_id}: {engine.get(rollout_id)['state']}")

    command.help = {
        "pause": "Stop advancing a running rollout (devices stay where they are).",
        "resume": "Continue a paused rollout (a stalled bake starts a fresh window).",
        "promote": "Approve the next step, or push a paused rollout past its bake.",
        "abort": "Roll every canary back to the baseline and stop.",
    }[action] + f"\n\n\b\nExample:\n  quantfleet rollout {action} q4km-eu"
    return command


for _action in ("pause", "resume", "promote", "abort"):
    rollout_group.add_command(_control(_action))


@rollout_group.command(name="history")
@config_option
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def rollout_history(config_path: Path, rollout_id: str, as_json: bool) -> None:
    """Every transition and verdict of a rollout, oldest first, with its evidence.

    \b
    Example:
      quantfleet rollout history q4km-eu
    """
    engine, _ = _engine(config_path)
    rows = list(reversed(engine.store.audit_log(f"rollout:{rollout_id}", 10_000)))
    if not rows:
        raise click.ClickException(f"no history for rollout {rollout_id!r}")
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    for a in rows:
        ev = a["evidence"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["ts"]))
        line = f"{when}  {a['actor']:<8} {a['action']:<20}"
        # A log line: not wrapped, and brackets in reasons are text, not markup.
        console.print(line + " " + _history_detail(a["action"], ev), soft_wrap=True,
                      markup=False, highlight=False)


def _history_detail(action: str, ev: dict[str, Any]) -> str:
    """One line of a history entry's evidence (``--json`` has all of it)."""
    step = f"step {ev['step'] + 1}" if isinstance(ev.get("step"), int) else ""
    if action == "rollout.verdict":
        gates = ", ".join(f"{g['metric']}={g['verdict']}" for g in ev["gates"])
        line = f"{step}: {ev['verdict']} (pooled: {gates})" if _groups(ev) else \
            f"{step}: {ev['verdict']} ({gates})"
        for grp in _groups(ev):
            failing = [g["metric"] for g in grp["gates"] if g["verdict"] == "fail"]
            line += (f"; {grp['label']}={grp['value']} {grp['verdict']}"
                     + (f" ({', '.join(m + '=fail' for m in failing)})" if failing else "")
                     + (" (required)" if grp.get("required") else ""))
        return line + (f" — {ev['reason']}" if ev.get("reason") else "")
    if action == "rollout.create":
        spec = ev.get("spec", {})
        steps = " → ".join(str(x) for x in spec.get("steps", []))
        return (f"{spec.get('from')} → {spec.get('to')} on {spec.get('cohort')!r}, "
                f"steps {steps}" + (" (unpinned)" if ev.get("unpinned") else ""))
    if action == "rollout.device":
        outcomes = ", ".join(f"{o['device']} {o['outcome']}"
                             + (f" ({o['reason']})" if o.get("reason") else "")
                             for o in ev.get("outcomes", []))
        return f"{step}: {outcomes}"
    if action == "rollout.bake":
        return f"{step}: {ev.get('healthy', 0)} canaries healthy, baking"
    if action == "rollout.step":
        return f"to step {ev['step'] + 1} (target {ev.get('target')})"
    if action == "rollout.complete":
        return f"all {ev.get('steps')} steps passed"
    if action == "rollout.leader":
        prev = ev.get("previous")
        return f"led by {ev.get('holder')} (lease token {ev.get('token')})" + (
            f", after {prev['holder']} (token {prev['token']}, "
            + ("released" if prev.get("released") else
               f"expired {prev['expired_s_ago']:g} s before")
            + ")" if isinstance(prev, dict) else "")
    if action == "rollout.pause" and ev.get("detail"):
        return f"{ev['reason']}: {ev['detail']}"
    if ev.get("reason"):
        devices = ev.get("devices")
        line = str(ev["reason"]) + (f" ({len(devices)} devices)" if isinstance(devices, list)
                                    else "")
        if ev.get("cohort_without_failed_classes"):
            line += (" — the other classes can be tried as cohort "
                     f"{ev['cohort_without_failed_classes']!r}")
        return line
    if isinstance(ev.get("devices"), list):
        classes = ev.get("classes") or {}
        return f"{step + ': ' if step else ''}{len(ev['devices'])} devices" + (
            " (re-sent after a restart)" if ev.get("resumed") else "") + (
            " (" + ", ".join(f"{k} {v}" for k, v in classes.items()) + ")"
            if len(classes) > 1 else "")
    return step
