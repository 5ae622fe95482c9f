"""Building blocks for telemetry tests: an agent-side pipeline and synthetic events."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quantfleet.agent.mqtt import MqttConfig
from quantfleet.agent.telemetry.config import PublisherConfig
from quantfleet.agent.telemetry.outbox import Outbox
from quantfleet.agent.telemetry.publisher import Publisher
from quantfleet.agent.wire import RequestEvent


def request_event(i: int, variant: str = "Q8_0", **kw: Any) -> RequestEvent:
    fields: dict[str, Any] = {"request_id": f"req-{i}", "ts": time.time(), "variant": variant,
                              "latency_s": 0.1 + (i % 7) * 0.05, "prompt_tokens": 20 + i % 5,
                              "completion_tokens": 30 + i % 11}
    fields.update(kw)
    return RequestEvent.model_validate(fields)


def pipeline(tmp_path: Path, device: str, port: int, root: str, *, protocol: str = "5",
             start: bool = True, outbox_kw: dict[str, Any] | None = None,
             **publisher_kw: Any) -> tuple[Outbox, Publisher]:
    outbox = Outbox(tmp_path / f"{device}.db", device, commit_interval_s=0.05,
                    **(outbox_kw or {})).start()
    defaults: dict[str, Any] = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5,
                                "backfill_batches_per_s": 0}
    defaults.update(publisher_kw)
    publisher = Publisher(
        outbox,
        MqttConfig(broker=f"mqtt://127.0.0.1:{port}", protocol=protocol,  # type: ignore[arg-type]
                   topic_root=root, client_id=f"qf-{device}-{root}"),
        PublisherConfig.model_validate(defaults),
    )
    if start:
        publisher.start()
    return outbox, publisher


class FleetSide:
    """The fleet's real ingest (``FleetIngest`` into a SQLite ``Store``) on a test topic root,
    with the readings telemetry tests make of what arrived."""

    def __init__(self, tmp_path: Path, root: str, port: int = 1883, *, protocol: str = "5",
                 db: str = "fleet.db") -> None:
        from quantfleet.fleet.ingest import FleetIngest
        from quantfleet.fleet.store import Store

        self.store = Store(f"sqlite:///{tmp_path / db}")
        cfg = MqttConfig(broker=f"mqtt://127.0.0.1:{port}", topic_root=root,
                         protocol=protocol)  # type: ignore[arg-type]
        # A persistent session, as the fleet's: it (and its subscriptions) outlive a
        # broker restart, so nothing published meanwhile finds no subscriber.
        self.ingest = FleetIngest(self.store, cfg, client_id=f"fleet-{root}-{db}",
                                  share_group="", session_expiry_s=3600)

    def start(self) -> FleetSide:
        self.ingest.start()
        return self

    def stop(self) -> None:
        self.ingest.stop()
        self.store.close()

    def _rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import text

        with self.store.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def bodies(self, device: str, kind: str) -> list[dict[str, Any]]:
        import json

        return [json.loads(r[0]) for r in self._rows(
            "SELECT body FROM events WHERE device_id = :d AND kind = :k ORDER BY seq",
            d=device, k=kind)]

    def event_count(self, device: str) -> int:
        return int(self._rows("SELECT count(*) FROM events WHERE device_id = :d",
                              d=device)[0][0])

    def seqs(self, device: str) -> list[int]:
        return [int(r[0]) for r in self._rows(
            "SELECT seq FROM events WHERE device_id = :d ORDER BY seq", d=device)]

    def device(self, device: str) -> dict[str, Any] | None:
        return next((d for d in self.store.devices() if d["device_id"] == device), None)

    def events(self, device: str) -> list[dict[str, Any]]:
        """The device's events in seq order: seq, boot_epoch, kind."""
        return [{"seq": int(r[0]), "boot_epoch": int(r[1]), "kind": r[2]} for r in self._rows(
            "SELECT seq, boot_epoch, kind FROM events WHERE device_id = :d ORDER BY seq",
            d=device)]

    def gaps(self, device: str) -> list[tuple[int, int]]:
        return [(g.first, g.last) for g in self.store.seq_gaps([device])]

    def rejections(self) -> dict[str, int]:
        return self.store.rejection_counts()

    def status(self, device: str) -> dict[str, Any] | None:
        """The device's liveness as the fleet keeps it (None before any status)."""
        d = self.device(device)
        if d is None or not d["status_reason"]:
            return None
        return {"state": "online" if d["online"] else "offline",
                "reason": d["status_reason"], "boot_epoch": d["boot_epoch"]}
