"""Consumer of MinIO's ``notify_redis`` list (``format=access``): element by element into the pending list.

Each element is claimed with an atomic move to ``<events_key>:processing``; its events are appended to
the pending list and the element removed from processing in one MULTI/EXEC, so an element is either
still claimed (given back at the next start) or fully handed on, never half. A malformed element goes
to the dead-letter list with the reason, and the consumer goes on; the valid records of a partly
malformed element are still handed on (the dead-letter entry keeps the whole element and says which
records were refused).
"""
from __future__ import annotations

import logging
import threading

import redis

from workers.intake import metrics
from workers.intake.events import MalformedEvent, ObjectEvent, parse_access_element
from workers.intake.pending import (IntakeKeys, claim, dead_letter, encode_entry, give_back_claimed,
                                    run_until_stopped)

log = logging.getLogger(__name__)

SOURCE = "redis"
CLAIM_WAIT_S = 1.0  # blocking-pop timeout: how often the loop looks at `stop`


class RedisListConsumer:
    def __init__(self, client: redis.Redis, keys: IntakeKeys, images_bucket: str):
        self.client = client
        self.keys = keys
        self.images_bucket = images_bucket
        self._recovered = False

    def run(self, stop: threading.Event) -> None:
        run_until_stopped(lambda: self.step(CLAIM_WAIT_S), stop, (redis.RedisError,), "redis_consumer", "Redis")

    def step(self, wait_s: float) -> bool:
        """Claim one element (waiting up to ``wait_s``) and hand it on; False when the list was empty."""
        self.recover()
        element = self.claim(wait_s)
        if element is None:
            return False
        self.hand_on(element)
        return True

    def recover(self) -> None:
        """Once per consumer: give back what a previous (crashed) consumer claimed but never handed on."""
        if not self._recovered:
            given_back = give_back_claimed(self.client, self.keys.events_processing, self.keys.events)
            if given_back:
                log.info("redis consumer: %d elements claimed by an earlier run are queued again", given_back)
            self._recovered = True

    def claim(self, wait_s: float) -> bytes | None:
        return claim(self.client, self.keys.events, self.keys.events_processing, wait_s)

    def hand_on(self, element: bytes) -> list[ObjectEvent]:
        """Append the element's events to pending and drop it from processing, atomically."""
        reason = None
        try:
            parsed = parse_access_element(element)
            foreign = parsed.keep_bucket(self.images_bucket)
            if foreign:
                log.warning("redis consumer: ignored events of bucket(s) %s: this intake indexes %r", foreign,
                            self.images_bucket)
            events = parsed.events
            if parsed.errors:
                reason = "; ".join(parsed.errors)
        except MalformedEvent as exc:
            events, reason, parsed = [], str(exc), None
        pipe = self.client.pipeline(transaction=True)
        if events:
            pipe.rpush(self.keys.pending, *(encode_entry(e, SOURCE) for e in events))
        if reason is not None:
            queued = f" ({len(events)} valid records were queued)" if events else ""
            dead_letter(pipe, self.keys, SOURCE, element, reason + queued)
        pipe.lrem(self.keys.events_processing, 1, element)
        pipe.execute()
        if reason is not None:
            metrics.MALFORMED.labels(SOURCE).inc()
            metrics.DEAD_LETTERED.labels(SOURCE).inc()
            log.error("redis consumer: malformed element moved to %s: %s", self.keys.dead, reason)
        for e in events:
            metrics.EVENTS.labels(SOURCE, "created" if e.kind == "encode" else "removed").inc()
        if parsed is not None and parsed.ignored:
            metrics.EVENTS.labels(SOURCE, "ignored").inc(parsed.ignored)
        return events
