"""The demo's live view: the rollout, the fleet and the real agents, read from the store.

``RolloutWatch`` reads what ``quantfleet rollout status`` reads — the fleet's
store, which the running ``quantfleet serve`` writes — and renders it with
rich: the rollout's step and phase, devices per outcome, the last verdict
with every gate's estimate, interval and sample sizes, which variant the
simulated devices and the real agents run, and the agents' traffic. Each new
audit record of the rollout is also printed as one line, so a log of the
demo (not a terminal) still shows every transition.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from quantfleet.fleet.rollouts.cli import gate_table
from quantfleet.fleet.rollouts.engine import RolloutEngine
from quantfleet.fleet.store import Store

from .traffic import AgentTraffic

TERMINAL = ("completed", "rolled_back", "aborted", "paused")


def _no_assign(ids: Any, variant: str, rollout_id: str) -> None:
    raise RuntimeError("the demo's view only reads; the fleet service assigns devices")


def short(variant: str | None) -> str:
    """``smollm2-135m-Q4_K_M`` → ``Q4_K_M``."""
    return "-" if not variant else variant.rsplit("-", 1)[-1]


def audit_line(a: dict[str, Any]) -> str:
    ev = a["evidence"]
    when = time.strftime("%H:%M:%S", time.localtime(a["ts"]))
    line = f"{when}  {a['action']:<19}"
    if a["action"] == "rollout.verdict":
        gates = ", ".join(f"{g['metric']}={g['verdict']}" for g in ev["gates"])
        line += (f" step {ev.get('step', 0) + 1}: {ev['verdict']} ({gates}; "
                 f"{ev['canary_devices']} canary vs {ev['control_devices']} control devices)")
    elif a["action"] == "rollout.create":
        spec = ev["spec"]
        line += f" {short(spec['from'])} → {short(spec['to'])} on {spec['cohort']}, " \
                f"steps {spec['steps']}"
    elif a["action"] == "rollout.assign":
        devices = ev.get("devices", [])
        real = [d for d in devices if not d.startswith("sim-")]
        line += f" step {ev.get('step', 0) + 1}: {len(devices)} devices" + (
            f" (real agents: {', '.join(real)})" if real else "")
    elif a["action"] == "rollout.device":
        outcomes = Counter(o["outcome"] for o in ev["outcomes"])
        line += " " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        failed = [o for o in ev["outcomes"] if o["outcome"] != "healthy"]
        if failed:
            line += " — " + "; ".join(f"{o['device']}: {o['reason']}" for o in failed[:3])
    elif a["action"] == "rollout.bake":
        line += f" step {ev['step'] + 1}: {ev['healthy']} canaries healthy, baking"
    elif a["action"] == "rollout.step":
        line += f" on to step {ev['step'] + 1} ({ev['target']})"
    elif ev.get("reason"):
        line += f" {ev['reason']}"
    return line


class RolloutWatch:
    def __init__(self, store_url: str) -> None:
        self.store = Store(store_url)
        self.engine = RolloutEngine(self.store, _no_assign)
        self._seen: set[int] = set()

    def close(self) -> None:
        self.store.close()

    def new_audit_lines(self, rollout_id: str) -> list[str]:
        rows = self.store.audit_log(f"rollout:{rollout_id}", 1000)
        fresh = [a for a in reversed(rows) if a["id"] not in self._seen]
        self._seen.update(a["id"] for a in fresh)
        return [audit_line(a) for a in fresh]

    def status(self, rollout_id: str) -> dict[str, Any]:
        r = self.engine.get(rollout_id)
        spec = self.engine.spec(rollout_id)
        outcomes: Counter[str] = Counter()
        for m in self.engine.members(rollout_id):
            outcomes[m["role"] if m["role"] == "control" else m["outcome"]] += 1
        verdicts = [a for a in self.store.audit_log(f"rollout:{rollout_id}", 1000)
                    if a["action"] == "rollout.verdict"]
        return {"id": rollout_id, "state": r["state"], "step": r["step"] + 1,
                "steps": spec.steps, "phase": r["phase"], "reason": r["reason"],
                "from": spec.from_variant, "to": spec.to_variant,
                "bake_extensions": r["bake_extensions"], "devices": dict(outcomes),
                "last_verdict": verdicts[0]["evidence"] if verdicts else None}

    def fleet(self) -> dict[str, Any]:
        """Variants of the simulated devices, and each real agent's variant and state."""
        sim: Counter[str] = Counter()
        agents: dict[str, dict[str, Any]] = {}
        for d in self.store.devices():
            if d["device_id"].startswith("sim-"):
                sim[short(d["variant"])] += 1
            else:
                agents[d["device_id"]] = {"variant": short(d["variant"]),
                                          "update_state": d["update_state"] or "-",
                                          "online": d["online"]}
        return {"simulated": dict(sim), "agents": agents}

    def render(self, rollout_id: str, traffic: dict[str, AgentTraffic]) -> RenderableType:
        st = self.status(rollout_id)
        fleet = self.fleet()
        head = Text.assemble(
            (f"rollout {st['id']}", "bold"), f"  {short(st['from'])} → {short(st['to'])}  ",
            (st["state"], "bold green" if st["state"] == "completed" else
             "bold red" if st["state"] in ("rolled_back", "aborted") else "bold yellow"),
            f"  step {st['step']}/{len(st['steps'])} {st['steps']}  {st['phase']}"
            + (f" (bake extended {st['bake_extensions']}×)" if st["bake_extensions"] else ""),
            "\ndevices: " + ", ".join(f"{k} {v}" for k, v in sorted(st["devices"].items())),
            "\nsimulated devices on: " + ", ".join(
                f"{k} {v}" for k, v in sorted(fleet["simulated"].items())),
        )
        parts: list[RenderableType] = [head]
        verdict = st["last_verdict"]
        if verdict:
            parts.append(gate_table(verdict))
        agents = Table(title="real agents", title_justify="left", box=None)
        for col in ("agent", "serving", "update", "answered", "errors", "median s"):
            agents.add_column(col, justify="left" if col in ("agent", "update") else "right")
        for device_id, a in sorted(fleet["agents"].items()):
            t = traffic.get(device_id)
            answered = t.answered if t else 0
            errors = (sum(t.counts.values()) - answered) if t else 0
            median = t.median_latency() if t else None
            agents.add_row(device_id, a["variant"], a["update_state"], str(answered),
                           str(errors), "-" if median is None else f"{median:.1f}")
        parts.append(agents)
        return Group(*parts)
