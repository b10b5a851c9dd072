"""The batcher: drains the pending list into batches of at most N objects or T ms, and sends each as a task.

One open batch per kind (``encode``, ``delete``) and model version (None: the one the workers follow; a
version id: a staged re-encode, ``hashlake model promote``). A batch is sent when it holds ``batch_size`` distinct
objects, or ``batch_window_ms`` after its first entry was claimed. Entries are claimed with an atomic
move from ``pending`` to ``pending:processing`` and removed from there only after the Celery publish
returned; see the package docstring for why this loses nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import redis
from kombu.exceptions import OperationalError

from workers.intake import metrics
from workers.intake.events import MalformedEvent
from workers.intake.pending import (
    HEARTBEAT_TTL_S,
    IntakeKeys,
    claim,
    claim_many,
    dead_letter,
    decode_entry,
    give_back_claimed,
    run_until_stopped,
)
from workers.intake.sender import BatchSender
from workers.messages import Batch, ObjectRef

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # blocking-pop timeout with no open batch: how often the loop looks at `stop`


@dataclass
class OpenBatch:
    kind: str
    model_version: str | None
    started: float  # time.monotonic() when its first entry was claimed
    refs: dict[tuple[str, str, str], ObjectRef] = field(default_factory=dict)  # (bucket, key, etag) → ref
    claimed: list[bytes] = field(default_factory=list)  # every entry it took, duplicates too: acked on send


class Batcher:
    def __init__(self, client: redis.Redis, keys: IntakeKeys, sender: BatchSender, *, batch_size: int,
                 window_ms: int):
        self.client = client
        self.keys = keys
        self.sender = sender
        self.batch_size = batch_size
        self.window_s = window_ms / 1000
        self.open: dict[tuple[str, str | None], OpenBatch] = {}  # (kind, model_version) → batch
        self._sent_unacked: list[bytes] = []  # entries of published batches not yet removed from processing
        self._recovered = False
        self._heartbeat_at = 0.0
        self._identity = f"{socket.gethostname()}:{os.getpid()}"

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: claim, batch, send; on Redis/broker errors keep the open batches and back off."""
        run_until_stopped(self.step, stop, (redis.RedisError, OperationalError), "batcher", "broker")
        self.flush()

    def step(self) -> None:
        """One round: send what is due, claim what is waiting (blocking up to the nearest deadline), send."""
        if not self._recovered:
            given_back = give_back_claimed(self.client, self.keys.pending_processing, self.keys.pending)
            if given_back:
                log.info("batcher: %d entries claimed by an earlier run are pending again", given_back)
            self._recovered = True
        self._heartbeat()
        self._ack_sent()
        self._send_due()  # first: a batch that failed to send is retried before it could grow
        raw = claim(self.client, self.keys.pending, self.keys.pending_processing, self._wait_s())
        if raw is not None:
            self._add(raw)
            self._drain()
        self._send_due()

    def flush(self) -> None:
        """Send every open batch now (at shutdown). What cannot be sent stays claimed and is given back
        to the pending list when the next batcher starts."""
        for slot in list(self.open):
            try:
                self._send(slot)
            except (redis.RedisError, OperationalError) as exc:
                log.warning("batcher: could not send the open %s batch at shutdown (%s); it is re-sent at the "
                            "next start", slot[0], exc)

    # -- helpers --------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Claim what is already waiting, a chunk per round trip, until a batch is due or nothing waits.
        A chunk is at most what the fullest open batch still lacks (an entry adds at most one object to
        one batch), so no batch overfills and nothing is claimed past a full batch."""
        while not any(self._due(b) for b in self.open.values()):
            room = self.batch_size - max((len(b.refs) for b in self.open.values()), default=0)
            chunk = claim_many(self.client, self.keys.pending, self.keys.pending_processing, room)
            if not chunk:
                return
            for raw in chunk:
                self._add(raw)

    def _add(self, raw: bytes) -> None:
        try:
            event, _source = decode_entry(raw)
        except MalformedEvent as exc:
            metrics.MALFORMED.labels("pending").inc()
            metrics.DEAD_LETTERED.labels("pending").inc()
            log.error("batcher: %s; moved to %s", exc, self.keys.dead)
            pipe = self.client.pipeline(transaction=True)
            dead_letter(pipe, self.keys, "pending", raw, str(exc))
            pipe.lrem(self.keys.pending_processing, 1, raw)
            pipe.execute()
            return
        slot = (event.kind, event.model_version)
        batch = self.open.get(slot)
        if batch is None:
            batch = self.open[slot] = OpenBatch(event.kind, event.model_version, time.monotonic())
        ref = event.ref
        identity = (ref.bucket, ref.key, ref.etag)
        previous = batch.refs.get(identity)
        if previous is not None:
            metrics.DUPLICATES.inc()
            # Two deletes of one key: keep the later time, so the tombstone hides every version it saw.
            if event.kind == "delete" and (ref.event_time or "") > (previous.event_time or ""):
                batch.refs[identity] = ref
        else:
            batch.refs[identity] = ref
        batch.claimed.append(raw)

    def _due(self, batch: OpenBatch) -> bool:
        return len(batch.refs) >= self.batch_size or time.monotonic() - batch.started >= self.window_s

    def _wait_s(self) -> float:
        if not self.open:
            return IDLE_WAIT_S
        deadline = min(b.started for b in self.open.values()) + self.window_s
        return max(0.0, min(IDLE_WAIT_S, deadline - time.monotonic()))

    def _send_due(self) -> None:
        for slot in [k for k, b in self.open.items() if self._due(b)]:
            self._send(slot)

    def _send(self, slot: tuple[str, str | None]) -> None:
        batch = self.open[slot]
        kind = batch.kind
        self.sender.send(Batch(kind=kind, objects=tuple(batch.refs.values()),  # raises if not queued
                               model_version=batch.model_version))
        # Published: now (and only now) its claimed entries may go. A crash before they are removed
        # re-sends this batch at the next start: same objects, same batch id, harmless.
        del self.open[slot]
        self._sent_unacked += batch.claimed
        metrics.BATCHES_SENT.labels(kind).inc()
        metrics.OBJECTS_SENT.labels(kind).inc(len(batch.refs))
        log.debug("batcher: sent %s batch of %d objects", kind, len(batch.refs))
        self._ack_sent()

    def _ack_sent(self) -> None:
        """Remove the entries of published batches from the processing list (retried if Redis fails)."""
        if not self._sent_unacked:
            return
        pipe = self.client.pipeline(transaction=True)
        for raw in self._sent_unacked:
            pipe.lrem(self.keys.pending_processing, 1, raw)
        pipe.execute()
        self._sent_unacked = []

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._heartbeat_at >= 1.0:
            self.client.set(self.keys.batcher_heartbeat, self._identity, px=HEARTBEAT_TTL_S * 1000)
            self._heartbeat_at = now
