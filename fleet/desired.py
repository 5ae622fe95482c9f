"""Desired state: which variant each device should run — stored, signed, and published
retained in the background.

Setting a variant for devices stores the next revision per device (the store is
the truth), audits it, and hands the payload to a ``DesiredPublisher``; nothing
waits for the broker. The publisher sends each payload retained at QoS 1 on
``…/devices/{id}/desired`` and follows its PUBACK by message id: a success
reason code marks it acknowledged, a refusal is retried with jittered
exponential backoff (with the store's newest revision for that device). A
message in flight when the connection drops is resent by paho when it
reconnects — MQTT's own retransmission, the only one the protocol allows —
and what was queued meanwhile goes out then. Each device has at most one
message with the broker at a time, so a newer revision never overtakes an
older one: the retained message is always the newest.

A device that is offline finds the retained message when it returns; a fleet
that restarts re-publishes every stored desired state (``republish``), so a
broker that lost its retained messages converges too, and so does a revision
that was stored but never sent before the fleet stopped.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import Connection

from quantfleet.agent.update.signing import PrivateKey, key_id, sign_desired
from quantfleet.agent.wire import DesiredPayload, device_topic
from quantfleet.models.catalog import Catalog, CatalogError

from .store import Store

log = logging.getLogger(__name__)

Latest = Callable[[list[str]], list[DesiredPayload]]  # device ids -> stored desired state


class DesiredStateError(RuntimeError):
    """Desired state could not be set or published; the message says for which devices."""


@dataclass
class Delivery:
    """The newest desired revision of one device on its way to the broker."""

    device_id: str
    revision: int
    variant: str
    state: str = "queued"  # queued (to send, or to retry) | sent | acknowledged
    attempts: int = 0
    error: str = ""  # why the last attempt did not succeed
    refused: bool = False  # the broker's PUBACK refused the last attempt
    queued_at: float = 0.0  # wall clock, for people
    sent_at: float | None = None
    acknowledged_at: float | None = None
    payload: str = field(default="", repr=False)  # dropped once acknowledged
    due: float = 0.0  # monotonic: when it may be sent (again)

    @property
    def acknowledged(self) -> bool:
        return self.state == "acknowledged"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["payload"], doc["due"]
        doc["acknowledged"] = self.acknowledged
        return doc


class DesiredPublisher:
    """Publishes desired state retained at QoS 1 and follows each to its PUBACK.

    ``submit`` returns at once. Sending happens in the caller's thread when the client
    is connected (paho's ``publish`` does not block), otherwise when the client next
    connects; ``start`` adds the thread that retries refusals and keeps at most
    ``window`` devices' messages with paho at a time (without it every payload is
    handed to paho at once and nothing is retried — enough for a command that waits
    for its own acknowledgements). The callbacks it sets on the client chain to the
    ones already there.
    """

    def __init__(self, client: mqtt.Client, topic_root: str, *, latest: Latest | None = None,
                 backoff_s: tuple[float, float] = (1.0, 60.0), window: int = 64,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.root = topic_root
        self.latest = latest
        self.backoff_s = backoff_s
        self.window = window
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._deliveries: dict[str, Delivery] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._retries: list[tuple[float, str, int]] = []  # (due, device, revision)
        # What paho holds per device until its PUBACK: mids, or a negative token while
        # ``publish`` is being called. A device is sent to only when it holds nothing.
        self._with_paho: dict[str, set[int]] = {}
        self._mids: dict[int, tuple[str, int]] = {}
        self._tokens = itertools.count(-1, -1)
        # PUBACKs that arrived before ``publish`` returned their mid (or for messages
        # that are not ours): kept briefly, bounded.
        self._early: collections.OrderedDict[int, tuple[float, Any]] = collections.OrderedDict()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._chained_publish: Any = client.on_publish
        self._chained_connect: Any = client.on_connect
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> DesiredPublisher:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="desired-publisher",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, flush_s: float = 0.0) -> None:
        """Stop retrying, after waiting up to ``flush_s`` for what is pending (what is
        left is in the store, and re-published when the fleet starts)."""
        if flush_s > 0:
            self.wait_acknowledged(None, flush_s)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # -- the queue ----------------------------------------------------------
    def submit(self, payloads: Iterable[DesiredPayload]) -> None:
        now = time.monotonic()
        with self._lock:
            for p in payloads:
                current = self._deliveries.get(p.device_id)
                if current is not None and (current.revision > p.revision or (
                        current.revision == p.revision and not current.acknowledged)):
                    continue  # that one, or a newer one, is already on its way
                self._deliveries[p.device_id] = Delivery(
                    device_id=p.device_id, revision=p.revision, variant=p.variant,
                    queued_at=time.time(), payload=p.model_dump_json(), due=now)
                self._ready.append(p.device_id)
        self._pump()

    def _pump(self) -> None:
        """Hand what is due to paho: the devices paho holds nothing for, up to the
        window (when retrying is on)."""
        if not self.client.is_connected():
            return
        now = time.monotonic()
        batch: list[tuple[Delivery, int]] = []
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                _, device_id, revision = heapq.heappop(self._retries)
                d = self._deliveries.get(device_id)
                if d is not None and d.state == "queued" and d.revision == revision:
                    self._ready.append(device_id)
            room = self.window - len(self._with_paho) if self._thread else len(self._ready)
            waiting: list[str] = []
            while self._ready and room > 0:
                device_id = self._ready.popleft()
                d = self._deliveries[device_id]
                if d.state != "queued" or d.due > now:
                    continue  # a stale entry: sent, or waiting for its retry
                if device_id in self._with_paho:
                    waiting.append(device_id)  # the older message's PUBACK first
                    continue
                token = next(self._tokens)
                self._with_paho.setdefault(device_id, set()).add(token)
                d.state, d.attempts, d.sent_at = "sent", d.attempts + 1, time.time()
                batch.append((replace(d), token))
                room -= 1
            self._ready.extendleft(reversed(waiting))
        for d, token in batch:
            self._send(d, token)

    def _send(self, d: Delivery, token: int) -> None:
        # Outside the lock: paho calls on_publish holding its own lock.
        mid: int | None = None
        try:
            info = self.client.publish(device_topic(d.device_id, "desired", self.root),
                                       d.payload, qos=1, retain=True)
            # NO_CONN: paho keeps the message and sends it when it reconnects.
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                mid = info.mid
            error = f"not sent: {mqtt.error_string(info.rc)}"
        except Exception as exc:  # e.g. a payload the broker's limits refuse locally
            error = f"not sent: {exc}"
        with self._lock:
            self._release(d.device_id, token)
            if mid is None:
                current = self._deliveries.get(d.device_id)
                if current is not None and current.revision == d.revision:
                    self._retry(current, error, refused=False)
                return
            self._with_paho.setdefault(d.device_id, set()).add(mid)
            self._mids[mid] = (d.device_id, d.revision)
            early = self._early.pop(mid, None)
            if early is not None and time.monotonic() - early[0] < 10:
                self._settle(mid, early[1])

    def _release(self, device_id: str, held: int) -> None:
        """Paho no longer holds ``held`` (a mid or a token) for the device (lock held)."""
        rest = self._with_paho.get(device_id)
        if rest is not None:
            rest.discard(held)
            if not rest:
                del self._with_paho[device_id]

    def _retry(self, d: Delivery, error: str, *, refused: bool) -> None:
        """Back to the queue, due after a jittered exponential backoff (lock held)."""
        base, cap = self.backoff_s
        delay = min(cap, base * 2 ** max(0, d.attempts - 1)) * (0.5 + self._rng.random() / 2)
        d.state, d.error, d.refused = "queued", error, refused
        d.due = time.monotonic() + delay
        heapq.heappush(self._retries, (d.due, d.device_id, d.revision))
        log.warning("desired state for %s (revision %d): %s; retry %d in %.1f s",
                    d.device_id, d.revision, error, d.attempts + 1, delay)
        self._changed.notify_all()
        self._wake.set()

    # -- paho's callbacks (its network thread) --------------------------------
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        if self._chained_publish is not None:
            self._chained_publish(client, userdata, mid, reason_code, properties)
        with self._lock:
            if mid in self._mids:
                self._settle(mid, reason_code)
            else:
                self._early[mid] = (time.monotonic(), reason_code)
                while len(self._early) > 1024:
                    self._early.popitem(last=False)
        self._wake.set()
        if self._thread is None and self._ready:
            self._pump()  # a newer revision that waited for this PUBACK

    def _settle(self, mid: int, reason_code: Any) -> None:
        """A PUBACK for one of our messages: paho no longer holds it (lock held)."""
        device_id, revision = self._mids.pop(mid)
        self._release(device_id, mid)
        d = self._deliveries.get(device_id)
        if d is None or d.revision != revision or d.state != "sent":
            if d is not None and d.state == "queued":
                self._ready.append(device_id)  # it waited for this older message
            return
        if getattr(reason_code, "is_failure", False):
            self._retry(d, f"the broker refused it: {reason_code}", refused=True)
            return
        d.state, d.acknowledged_at, d.error, d.refused = "acknowledged", time.time(), "", False
        d.payload = ""  # the store has it: a retry or a restart reads it there
        self._changed.notify_all()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if self._chained_connect is not None:
            self._chained_connect(client, userdata, flags, reason_code, properties)
        if getattr(reason_code, "is_failure", False):
            return
        # What was in flight paho resends itself, after this callback; a newer revision
        # of the same device waits for that PUBACK (``_with_paho``).
        if self._thread is None:
            self._pump()
        else:
            self._wake.set()

    # -- the retrying thread ------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._next_retry())
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._refresh_due()
                self._pump()
            except Exception:  # one bad round must not end the retries
                log.exception("desired-state publisher: retrying next round")

    def _next_retry(self) -> float:
        with self._lock:
            due = self._retries[0][0] if self._retries else None
        return 1.0 if due is None else min(1.0, max(0.01, due - time.monotonic()))

    def _refresh_due(self) -> None:
        """A retry sends the store's newest revision of the device (another process,
        ``quantfleet desired set`` say, may have stored a newer one meanwhile)."""
        if self.latest is None:
            return
        now = time.monotonic()
        with self._lock:
            due = sorted({device_id for t, device_id, revision in self._retries if t <= now
                          and self._deliveries[device_id].revision == revision})
        if not due:
            return
        newer = self.latest(due)
        with self._lock:
            for p in newer:
                d = self._deliveries.get(p.device_id)
                if d is not None and d.state == "queued" and p.revision > d.revision:
                    self._deliveries[p.device_id] = Delivery(
                        device_id=p.device_id, revision=p.revision, variant=p.variant,
                        queued_at=time.time(), payload=p.model_dump_json(), due=now)
                    self._ready.append(p.device_id)

    # -- what it knows --------------------------------------------------------
    def wait_acknowledged(self, keys: Iterable[tuple[str, int]] | None,
                          timeout_s: float) -> list[Delivery]:
        """Wait until each ``(device, revision)`` (every pending one: ``None``) is
        acknowledged, refused by the broker, or replaced by a newer revision, at most
        ``timeout_s``; return those not acknowledged (copies)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            wanted = list(keys) if keys is not None else [
                (d.device_id, d.revision) for d in self._deliveries.values()
                if not d.acknowledged]
            while True:
                open_ = []
                for device_id, revision in wanted:
                    d = self._deliveries.get(device_id)
                    if d is not None and d.revision == revision and not d.acknowledged:
                        open_.append(d)
                left = deadline - time.monotonic()
                if left <= 0 or all(d.refused for d in open_):
                    return [replace(d) for d in open_]
                self._changed.wait(left)

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return [replace(d) for d in self._deliveries.values()]

    def status(self, limit: int = 20) -> dict[str, Any]:
        """Counts by state, and the oldest deliveries not acknowledged (``/healthz``)."""
        with self._lock:
            ds = list(self._deliveries.values())
            pending = sorted((d for d in ds if not d.acknowledged), key=lambda d: d.queued_at)
            counts = collections.Counter(d.state for d in ds)
            return {
                "connected": self.client.is_connected(),
                "devices": len(ds), "acknowledged": counts["acknowledged"],
                "sent": counts["sent"], "queued": counts["queued"],
                "refused": sum(1 for d in pending if d.refused),
                "oldest_unacknowledged_s": round(time.time() - pending[0].queued_at, 1)
                if pending else None,
                "unacknowledged": [d.to_json() for d in pending[:limit]],
            }


class DesiredState:
    def __init__(self, store: Store, client: mqtt.Client, key: PrivateKey,
                 models_dir: Path, artifact_base_url: str, *, topic_root: str,
                 publisher: DesiredPublisher | None = None) -> None:
        self.store = store
        self.client = client
        self.key = key
        self.key_id = key_id(key.public_key())
        self.models_dir = Path(models_dir)
        self.base_url = artifact_base_url.rstrip("/")
        self.root = topic_root
        self.publisher = publisher or DesiredPublisher(client, topic_root,
                                                       latest=store.desired)

    def start(self) -> DesiredState:
        """Retry what the broker refuses, a window of devices at a time (the fleet
        service does; a command that waits for its own acknowledgements need not)."""
        self.publisher.start()
        return self

    def stop(self, flush_s: float = 0.0) -> None:
        self.publisher.stop(flush_s)

    def set_variant(self, device_ids: Iterable[str], variant: str, *,
                    rollout_id: str | None = None, actor: str = "operator",
                    fence: Callable[[Connection], None] | None = None
                    ) -> list[DesiredPayload]:
        """Point each device at ``variant`` (a catalog name or label): store the next
        revision, queue its publication, audit. Returns without waiting for the broker
        (``wait_acknowledged`` does). ``fence`` guards each revision's write
        (``Store.put_desired``): a rollout leader that lost its lease stops there."""
        try:
            entry = Catalog(self.models_dir).resolve(variant)
        except CatalogError as exc:
            raise DesiredStateError(str(exc)) from None
        url = f"{self.base_url}/v1/artifacts/{entry.name}"
        out = []
        for device_id in device_ids:
            payload = self.store.put_desired(device_id, lambda rev, d=device_id: self.signed(
                device_id=d, revision=rev, variant=entry.name, backend=entry.backend,
                sha256=entry.sha256, size_bytes=entry.size_bytes, url=url,
                rollout_id=rollout_id, issued_at=time.time()), fence, audit_actor=actor)
            self.publisher.submit([payload])
            out.append(payload)
        return out

    def signed(self, **fields: Any) -> DesiredPayload:
        """A desired state with every field signed by the fleet's key, which it names."""
        unsigned = DesiredPayload(**fields, key_id=self.key_id, signature="-")
        doc = unsigned.model_dump(mode="json")
        return unsigned.model_copy(update={"signature": sign_desired(self.key, doc)})

    def wait_acknowledged(self, payloads: Sequence[DesiredPayload] | None,
                          timeout_s: float) -> list[Delivery]:
        """Wait for the broker's acknowledgement of ``payloads`` (every pending one:
        ``None``) up to ``timeout_s``; return the deliveries not acknowledged."""
        keys = None if payloads is None else [(p.device_id, p.revision) for p in payloads]
        return self.publisher.wait_acknowledged(keys, timeout_s)

    def republish(self, device_ids: Iterable[str] | None = None) -> int:
        """Publish every stored desired state (of ``device_ids``) again: after a fleet
        restart, and for a rollout taken over from another replica, which may have
        stored it and stopped before the broker acknowledged it. One not signed by the
        current key (a rotated key, or version 1) is signed again first, same revision,
        and stored so: a device past a retired key's deadline still accepts the
        retained message it finds."""
        payloads = []
        resigned = 0
        for p in self.store.desired(device_ids):
            if p.schema_version < 2 or p.key_id != self.key_id:
                fields = p.model_dump(exclude={"schema_version", "key_id", "signature"})
                fresh = self.signed(**fields)
                if self.store.replace_desired(fresh):
                    p = fresh
                    resigned += 1
            payloads.append(p)
        self.publisher.submit(payloads)
        log.info("re-publishing the desired state of %d devices (%d signed again with key "
                 "%s)", len(payloads), resigned, self.key_id)
        return len(payloads)

    def status(self) -> dict[str, Any]:
        return self.publisher.status()


def unacknowledged_message(deliveries: Sequence[Delivery], timeout_s: float) -> str:
    """What an operator is told about desired state the broker did not acknowledge."""
    lines = []
    for d in deliveries:
        if d.refused:
            lines.append(f"the broker refused desired state for {d.device_id}: "
                         f"{d.error.removeprefix('the broker refused it: ')} "
                         f"(stored as revision {d.revision})")
        else:
            lines.append(f"desired state for {d.device_id} was not acknowledged by the broker "
                         f"within {timeout_s:.0f} s (stored as revision {d.revision}; it is "
                         "re-published when the fleet restarts)")
    return "\n".join(lines)


__all__ = ["Delivery", "DesiredPublisher", "DesiredState", "DesiredStateError",
           "unacknowledged_message"]
