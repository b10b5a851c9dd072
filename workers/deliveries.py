"""The delivery ledger: per batch, the deliveries that started and never finished, in the broker's Redis.

With acks_late + reject_on_worker_lost, a batch whose pool child dies with it in hand (a segfault in a
decoder, the OOM killer, a memory rlimit, ``os._exit``, SIGKILL) is requeued at once, and delivered
again forever if the same image kills every child. The ledger is what tells that poison batch from an
unlucky one. One hash per batch (its ``Batch.delivery_key``), shared by every worker node, surviving the dead
child:

    hashlake:deliveries:<key>        unfinished  int  starts of the task body minus its clean ends
                                     exit        str  how the last child died, as its node saw it
                                                      ("Worker exited prematurely: signal 9 (SIGKILL) ...")
                                     cause       str  what the child knew before it died ("MemoryError ..."),
                                                      or the error a delivery raised ("ForwardFailed ...")

A delivery is counted when the task body starts and uncounted when it returns or raises (a Celery retry
included): a child that dies never uncounts it, so ``unfinished`` counts the deaths, whole-node deaths
included (their message comes back after the visibility timeout). A delivery that raises an error
that is neither a refusal nor transient (``fail``) stays counted too: a forward that raises on one
image is isolated the way an image that kills the process is. A duplicate of the batch running at
that moment on another node also looks unfinished; that rare case costs a needless split, never an object.
A batch done for good (encoded, split, or recorded) deletes its hash; the rest expire ``EXPIRE_S`` after
their last start.

Redis trouble never stops a batch: the ledger logs it and the batch runs unguarded (it is the broker
Redis, so a batch was just delivered from it; a failing ledger call is a blip, not an outage).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hashlake.config import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "hashlake:deliveries:"
# Long enough to span every redelivery of a poison batch (each is immediate after a child death, or one
# visibility timeout after a node death) and short enough that a crash last week does not count today.
EXPIRE_S = 24 * 3600


@dataclass(frozen=True)
class History:
    """What the ledger knew of a batch when this delivery started."""

    unfinished: int  # earlier deliveries of the batch that never finished: its worker process died
    exit: str = ""  # how the last one's process exited, as its node logged it; "" when not seen
    cause: str = ""  # what that process reported before dying (e.g. a MemoryError); "" when nothing

    def describe(self) -> str:
        """The last death in words, for logs and failure rows."""
        parts = [p for p in (self.exit, self.cause) if p]
        return "; ".join(parts) if parts else "no exit status recorded (the whole worker node may have died)"


class DeliveryLedger:
    """The ledger's three calls per delivery: ``start`` (before any work), ``finish`` (on every clean
    exit of the task body), ``note`` (how a death happened, when someone knows)."""

    def __init__(self, client: redis.Redis, *, expire_s: int = EXPIRE_S):
        self.client = client
        self.expire_s = expire_s

    @classmethod
    def for_settings(cls, settings: Settings) -> "DeliveryLedger":
        # Fail fast (one retry, not redis-py's ten): a ledger call that hangs would hold the batch it guards.
        return cls(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0,
                                        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=1)))

    @staticmethod
    def key(batch_id: str) -> str:
        return f"{KEY_PREFIX}{batch_id}"

    def start(self, batch_id: str) -> History:
        """Count this delivery; return what came before it (one round trip)."""
        key = self.key(batch_id)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(key).hincrby(key, "unfinished", 1).expire(key, self.expire_s)
            before, _, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("delivery ledger unavailable (%s: %s); batch %s runs without crash accounting",
                        exc.__class__.__name__, exc, batch_id)
            return History(0)
        fields = {k.decode(): v.decode(errors="replace") for k, v in before.items()}
        # Below zero only after a concurrent duplicate finished in between: nothing died.
        return History(max(0, int(fields.get("unfinished", 0))), fields.get("exit", ""), fields.get("cause", ""))

    def finish(self, batch_id: str, *, done: bool) -> None:
        """Uncount this delivery: ``done`` (encoded, split or recorded) forgets the batch; otherwise
        (a retry, a failed task) it will come again and keeps its count of deaths."""
        try:
            if done:
                self.client.delete(self.key(batch_id))
            else:
                self.client.hincrby(self.key(batch_id), "unfinished", -1)
        except redis.RedisError as exc:
            # The start stays counted, as one death: two such blips are needed to split a batch.
            log.warning("delivery ledger unavailable (%s: %s); batch %s stays counted as unfinished",
                        exc.__class__.__name__, exc, batch_id)

    def fail(self, batch_id: str, cause: str) -> None:
        """A delivery whose task body raised an error that is neither a refusal nor transient (a forward
        that raises, a bug): it stays counted, as a death, so that the batch is split like one that
        kills its worker; ``cause`` replaces the last death's, and no process exit goes with it."""
        key = self.key(batch_id)
        try:
            (self.client.pipeline(transaction=True).hset(key, "cause", cause[:500]).hdel(key, "exit")
             .expire(key, self.expire_s).execute())
        except redis.RedisError as exc:
            log.warning("delivery ledger unavailable (%s: %s); the error of batch %s is only in this log: %s",
                        exc.__class__.__name__, exc, batch_id, cause)

    def note(self, batch_id: str, field: str, text: str) -> None:
        """Record ``exit`` (by the node's main process) or ``cause`` (by the dying child) of the last death."""
        if field not in ("exit", "cause"):
            raise ValueError(f"unknown ledger field {field!r}; use 'exit' or 'cause'")
        key = self.key(batch_id)
        try:
            self.client.pipeline(transaction=True).hset(key, field, text[:500]).expire(key, self.expire_s).execute()
        except redis.RedisError as exc:
            log.warning("delivery ledger unavailable (%s: %s); the %s of batch %s is only in this log: %s",
                        exc.__class__.__name__, exc, field, batch_id, text)
