"""The console's writes, each done by the part of the fleet that owns it and audited
under the operator's name: rollouts through the ``RolloutEngine`` (as the CLI's
``quantfleet rollout create|pause|resume|abort`` do), desired state through
``DesiredState.set_variant`` (as ``quantfleet desired set``), and unpinning, which
the engine has no verb for, as one transaction: the pin's removal and its audit
record (``rollout.unpin`` on the rollout that pinned it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, select

from ..cohorts import Selector
from ..desired import DesiredState, DesiredStateError
from ..rollouts.engine import RolloutEngine, RolloutError
from ..rollouts.spec import RolloutSpec, SpecError, parse_spec
from ..store import schema

CONTROLS = ("pause", "resume", "abort")


class ActionError(ValueError):
    """A write that cannot be done; ``status`` is the HTTP answer (400, 404 or 409)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def create_rollout(engine: RolloutEngine, spec_text: str, actor: str,
                   unpin: bool = False) -> RolloutSpec:
    try:
        spec = parse_spec(spec_text, "spec")
    except SpecError as exc:
        raise ActionError(str(exc), 400) from None
    try:
        engine.create(spec, actor=actor, unpin=unpin)
    except RolloutError as exc:
        raise ActionError(str(exc)) from None
    except ValueError as exc:  # an unknown variant label, from the catalog
        raise ActionError(f"spec: {exc}", 400) from None
    return spec


def control(engine: RolloutEngine, rollout_id: str, action: str, actor: str,
            reason: str = "") -> str:
    """Pause, resume or abort; returns the rollout's new state."""
    if action not in CONTROLS:
        raise ActionError(f"action {action!r} is not one of {', '.join(CONTROLS)}", 404)
    if _missing(engine, rollout_id):
        raise ActionError(f"no rollout named {rollout_id!r}", 404)
    try:
        if action == "abort":
            engine.abort(rollout_id, actor=actor, reason=reason)
        else:
            getattr(engine, action)(rollout_id, actor=actor)
    except RolloutError as exc:
        raise ActionError(str(exc)) from None
    state: str = engine.get(rollout_id)["state"]
    return state


def _missing(engine: RolloutEngine, rollout_id: str) -> bool:
    r = schema.rollouts
    with engine.store.engine.connect() as conn:
        return conn.execute(select(r.c.id).where(r.c.id == rollout_id)).first() is None


def unpin(engine: RolloutEngine, cohort: str, variant: str, actor: str) -> dict[str, Any]:
    """Remove the pin of ``variant`` off ``cohort``, audited on the rollout that pinned it."""
    p = schema.pins
    here = and_(p.c.cohort == cohort, p.c.variant == variant)
    with engine.store.engine.begin() as conn:
        pin = conn.execute(select(p).where(here)).first()
        if pin is None:
            raise ActionError(f"{variant} is not pinned off cohort {cohort!r}", 404)
        conn.execute(delete(p).where(here))
        conn.execute(schema.audit.insert().values(
            ts=engine.clock(), actor=actor, action="rollout.unpin",
            subject=f"rollout:{pin.rollout_id}",
            evidence={"cohort": cohort, "variant": variant, "pinned_at": pin.pinned_at,
                      "reason": pin.reason}))
    return {"cohort": cohort, "variant": variant, "rollout_id": pin.rollout_id}


def set_desired(store_devices: list[dict[str, Any]], desired: DesiredState | None,
                selector_text: str, variant: str, actor: str) -> list[str]:
    """Point every device of the cohort at ``variant``; returns their ids."""
    if desired is None:
        raise ActionError("this fleet has no desired-state publisher", 409)
    try:
        ids = Selector.parse(selector_text).select(store_devices)
    except ValueError as exc:
        raise ActionError(f"selector: {exc}", 400) from None
    if not ids:
        raise ActionError(f"selector {selector_text!r} matches no device", 400)
    try:
        desired.set_variant(ids, variant, actor=actor)
    except DesiredStateError as exc:
        raise ActionError(f"variant: {exc}", 400) from None
    return ids
