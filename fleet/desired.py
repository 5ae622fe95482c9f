"""Desired state: which variant each device should run, published retained and signed.

Setting a variant for devices stores the next revision per device, then
publishes it retained at QoS 1 on ``…/devices/{id}/desired`` and waits for the
broker's acknowledgement. A device that is offline finds the message when it
returns; a fleet that restarts re-publishes everything from its store
(``republish``), so a broker that lost its retained messages converges too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from quantfleet.agent.signing import sign
from quantfleet.agent.wire import DesiredPayload, device_topic
from quantfleet.models.catalog import Catalog, CatalogError

from .store import Store

log = logging.getLogger(__name__)


class DesiredStateError(RuntimeError):
    """Desired state could not be set or published; the message says for which devices."""


class DesiredState:
    def __init__(self, store: Store, client: mqtt.Client, key: Ed25519PrivateKey,
                 models_dir: Path, artifact_base_url: str, *, topic_root: str) -> None:
        self.store = store
        self.client = client
        self.key = key
        self.models_dir = Path(models_dir)
        self.base_url = artifact_base_url.rstrip("/")
        self.root = topic_root

    def _publish(self, payload: DesiredPayload, timeout_s: float) -> None:
        info = self.client.publish(device_topic(payload.device_id, "desired", self.root),
                                   payload.model_dump_json(), qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise DesiredStateError(
                f"desired state for {payload.device_id} was not acknowledged by the broker "
                f"within {timeout_s:.0f} s (stored as revision {payload.revision}; "
                "it is re-published when the fleet restarts)")
        reason = getattr(info, "reason_code", None)  # a failing PUBACK still counts as published
        if reason is not None and getattr(reason, "is_failure", False):
            raise DesiredStateError(f"the broker refused desired state for "
                                    f"{payload.device_id}: {reason}")

    def set_variant(self, device_ids: Iterable[str], variant: str, *,
                    rollout_id: str | None = None, actor: str = "operator",
                    timeout_s: float = 10.0) -> list[DesiredPayload]:
        """Point each device at ``variant`` (a catalog name or label); publish; audit."""
        try:
            entry = Catalog(self.models_dir).resolve(variant)
        except CatalogError as exc:
            raise DesiredStateError(str(exc)) from None
        fields = {"variant": entry.name, "backend": entry.backend, "sha256": entry.sha256,
                  "size_bytes": entry.size_bytes}
        signature = sign(self.key, fields)
        url = f"{self.base_url}/v1/artifacts/{entry.name}"
        out = []
        for device_id in device_ids:
            payload = self.store.put_desired(device_id, lambda rev, d=device_id: DesiredPayload(
                device_id=d, revision=rev, url=url, signature=signature, rollout_id=rollout_id,
                issued_at=time.time(), **fields))
            self._publish(payload, timeout_s)
            self.store.audit(actor, "desired.set", f"device:{device_id}", {
                "variant": entry.name, "revision": payload.revision, "rollout_id": rollout_id,
                "sha256": entry.sha256})
            out.append(payload)
        return out

    def republish(self, timeout_s: float = 10.0) -> int:
        """Publish every stored desired state again (after a fleet restart)."""
        payloads = self.store.desired()
        for p in payloads:
            self._publish(p, timeout_s)
        log.info("re-published desired state of %d devices", len(payloads))
        return len(payloads)
