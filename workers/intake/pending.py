"""The intake's Redis lists: their names, the pending-entry format, and the list moves every source shares.

All lists live in the broker's Redis (``Settings.redis_url``) and are named after ``Settings.events_key``
(the list MinIO's ``notify_redis`` target appends to), so one ``events_key`` is one intake namespace:

    <events_key>                      MinIO appends access-format elements here (RPUSH)
    <events_key>:processing           elements the Redis consumer claimed, until their events are pending
    <events_key>:pending              object events from every source, waiting for the batcher (JSON entries)
    <events_key>:pending:processing   entries the batcher claimed, until their batch is published to Celery
    <events_key>:dead                 malformed elements/entries with the reason (JSON), for a person to read
    <events_key>:batcher              heartbeat of the running batcher (expires after HEARTBEAT_TTL_S)
    <events_key>:reconciled           hash "bucket\\0key\\0etag" → epoch s the reconciler last queued it
    <events_key>:reconciled:<version> the same, for the staged runs of a version being promoted
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hashlake.config import Settings
from workers.intake import metrics
from workers.intake.events import MalformedEvent, ObjectEvent
from workers.messages import ObjectRef

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 10  # the batcher refreshes it about every second; 10 s survives a slow publish
# Pause of the intake's loops after their n-th failure in a row while Redis or the broker is down:
# 0.1, 0.2, 0.4, ... 5 s. The cap bounds how long a recovered broker stays unused.
LOOP_BACKOFF = ExponentialBackoff(cap=5.0, base=0.05)


def run_until_stopped(step: Callable[[], object], stop: threading.Event, errors: tuple[type[Exception], ...],
                      component: str, service: str) -> None:
    """Call ``step`` until ``stop``; while ``service`` fails (``errors``), count, log and back off."""
    failures = 0  # in a row
    while not stop.is_set():
        try:
            step()
            failures = 0
        except errors as exc:
            metrics.BROKER_ERRORS.labels(component).inc()
            failures += 1
            pause = LOOP_BACKOFF.compute(failures)
            log.warning("%s: %s unavailable (%s: %s); retrying in %.1f s", component, service,
                        exc.__class__.__name__, exc, pause)
            stop.wait(pause)


@dataclass(frozen=True)
class IntakeKeys:
    events: str
    events_processing: str
    pending: str
    pending_processing: str
    dead: str
    batcher_heartbeat: str
    reconciled: str

    @classmethod
    def for_settings(cls, settings: Settings) -> "IntakeKeys":
        base = settings.events_key
        return cls(events=base, events_processing=f"{base}:processing", pending=f"{base}:pending",
                   pending_processing=f"{base}:pending:processing", dead=f"{base}:dead",
                   batcher_heartbeat=f"{base}:batcher", reconciled=f"{base}:reconciled")


def intake_redis(settings: Settings) -> redis.Redis:
    """A client that fails fast: a dead broker surfaces within ~2 s (connect 1 s, one retry), so the
    webhook can answer 503 while MinIO still waits, and the loops can back off."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=1.0,
        socket_timeout=5.0,  # > the 1 s blocking-pop timeout the loops use
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=1),
        health_check_interval=30,
    )


# -- pending entries --------------------------------------------------------------------------------
def encode_entry(event: ObjectEvent, source: str) -> str:
    entry = {"kind": event.kind, "source": source, "ref": asdict(event.ref)}
    if event.model_version is not None:
        entry["model_version"] = event.model_version
    return json.dumps(entry, separators=(",", ":"))


def decode_entry(raw: bytes | str) -> tuple[ObjectEvent, str]:
    """A pending entry → (event, source); ``MalformedEvent`` if it is not one ``encode_entry`` wrote."""
    try:
        data = json.loads(raw)
        kind, source, ref = data["kind"], data["source"], ObjectRef(**data["ref"])
        model_version = data.get("model_version")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedEvent(f"pending entry is not a hashlake intake entry "
                             f"({exc.__class__.__name__}: {exc})") from None
    if kind not in ("encode", "delete") or not isinstance(ref.bucket, str) or not isinstance(ref.key, str):
        raise MalformedEvent(f"pending entry has kind {kind!r} or a non-string bucket/key")
    if model_version is not None and (kind != "encode" or not isinstance(model_version, str) or not model_version):
        raise MalformedEvent(f"pending entry has model_version {model_version!r} on a {kind!r} entry")
    return ObjectEvent(kind, ref, model_version), source


# -- claim / give back / dead-letter ----------------------------------------------------------------
def claim(client: redis.Redis, source: str, processing: str, timeout_s: float) -> bytes | None:
    """Move the oldest element of ``source`` to the tail of ``processing`` (atomic); None after ``timeout_s``."""
    if timeout_s < 0.001:
        # Not BLMOVE: Redis counts its timeout in whole ms, and 0 ms means "block forever".
        return client.lmove(source, processing, "LEFT", "RIGHT")
    return client.blmove(source, processing, timeout_s, "LEFT", "RIGHT")


# LRANGE + LTRIM + RPUSH in one script: Redis runs a script atomically, so an element is in exactly one
# of the two lists at every moment, as with LMOVE. KEYS: source, processing; ARGV: how many at most.
_CLAIM_MANY = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('RPUSH', KEYS[2], unpack(items))
end
return items
"""


def claim_many(client: redis.Redis, source: str, processing: str, limit: int) -> list[bytes]:
    """Move up to ``limit`` of the oldest elements of ``source`` to the tail of ``processing``, in order,
    atomically and without waiting; one round trip instead of one LMOVE per element."""
    return client.eval(_CLAIM_MANY, 2, source, processing, limit)


def give_back_claimed(client: redis.Redis, processing: str, source: str) -> int:
    """Move everything a previous run claimed but did not finish back to the head of ``source``, in order.

    Called once when a consumer starts: what a crashed (or killed) run held is delivered again.
    """
    moved = 0
    while client.lmove(processing, source, "RIGHT", "LEFT") is not None:  # tail of processing → head of source
        moved += 1
    return moved


def dead_letter(pipe: redis.client.Pipeline | redis.Redis, keys: IntakeKeys, source: str, element: bytes,
                reason: str) -> None:
    """Record an element the intake cannot use, with why; it is kept, never silently dropped."""
    pipe.rpush(keys.dead, json.dumps({"source": source, "reason": reason, "element": element.decode(errors="replace"),
                                      "at": time.time()}))


@dataclass(frozen=True)
class DeadLetter:
    """One element of the dead-letter list, as ``dead_letter`` wrote it."""

    source: str  # webhook | redis | pending
    reason: str  # what was wrong, naming each refused record by position and field
    element: str  # the body, list element or pending entry as received (decoded as UTF-8, errors replaced)
    at: float  # epoch s when it was refused


def read_dead_letters(client: redis.Redis, keys: IntakeKeys, limit: int | None = None) -> tuple[int, list[DeadLetter]]:
    """(how many the list holds, the newest ``limit`` of them oldest first; all when None). Reading
    removes nothing: a person clears the list (``DEL <events_key>:dead``) once they have dealt with it."""
    total = client.llen(keys.dead)
    start = 0 if limit is None else max(0, total - limit)
    letters = []
    for raw in client.lrange(keys.dead, start, -1):
        try:
            data = json.loads(raw)
            letters.append(DeadLetter(str(data["source"]), str(data["reason"]), str(data["element"]),
                                      float(data["at"])))
        except (ValueError, KeyError, TypeError):  # written by something else: shown as it is
            letters.append(DeadLetter("?", "not an intake dead letter", raw.decode(errors="replace"), 0.0))
    return total, letters
