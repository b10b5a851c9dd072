"""Prometheus metrics of the intake: events in, batches out, list lengths, reconciler findings.

Counters live in the default registry; ``ListLengthCollector`` reads the Redis list lengths at scrape
time (one LLEN each), so the gauges are never stale. The long-running intake serves them with
``prometheus_client.start_http_server`` on ``Settings.metrics_port``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:  # pending imports this module (its loops count broker errors)
    from workers.intake.pending import IntakeKeys

log = logging.getLogger(__name__)

EVENTS = Counter("hashlake_intake_events_total", "Object events received, by source "
                 "(webhook | redis | reconciler) and type (created | removed | ignored)", ["source", "type"])
MALFORMED = Counter("hashlake_intake_malformed_events_total",
                    "Malformed bodies, records or list elements, by source", ["source"])
DEAD_LETTERED = Counter("hashlake_intake_dead_lettered_total", "Elements moved to the dead-letter list", ["source"])
BATCHES_SENT = Counter("hashlake_intake_batches_sent_total", "Celery tasks sent, by batch kind (encode | delete)",
                       ["kind"])
OBJECTS_SENT = Counter("hashlake_intake_objects_sent_total", "Objects in the batches sent, by kind", ["kind"])
DUPLICATES = Counter("hashlake_intake_duplicates_dropped_total",
                     "Events dropped because the same (bucket, key, etag) was already in the open batch")
BROKER_ERRORS = Counter("hashlake_intake_broker_errors_total",
                        "Redis/broker failures, by component (webhook | batcher | redis_consumer | reconciler)",
                        ["component"])
RECONCILE_MISSING = Counter("hashlake_intake_reconcile_missing_total",
                            "Objects the reconciler found in the bucket but not indexed, and queued")
RECONCILE_DELETED = Counter("hashlake_intake_reconcile_deleted_total",
                            "Objects indexed but gone from the bucket, queued as deletes")
RECONCILE_RUNS = Counter("hashlake_intake_reconcile_runs_total", "Reconciler runs by outcome (ok | no_model | error)",
                         ["outcome"])
RECONCILE_SECONDS = Histogram("hashlake_intake_reconcile_seconds", "Wall time of one reconciler run",
                              buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))


class ListLengthCollector:
    """Gauges read from Redis on each scrape:

    - ``hashlake_broker_queue_depth{queue}``: messages waiting in a Celery queue (the Redis transport
      keeps queue ``celery`` as a Redis list of that name);
    - ``hashlake_intake_list_length{list}``: the intake's own lists (pending, dead, ...);
    - ``hashlake_intake_redis_up``: 0 when Redis did not answer this scrape.
    """

    def __init__(self, client: redis.Redis, keys: IntakeKeys, celery_queues: list[str]):
        self.client = client
        self.celery_queues = celery_queues
        self.lists = {"events": keys.events, "events_processing": keys.events_processing, "pending": keys.pending,
                      "pending_processing": keys.pending_processing, "dead": keys.dead}

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only, so registering does not query Redis.
        for name in ("hashlake_intake_redis_up", "hashlake_broker_queue_depth", "hashlake_intake_list_length"):
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("hashlake_intake_redis_up", "1 when the broker's Redis answered this scrape")
        try:
            pipe = self.client.pipeline(transaction=False)
            for name in [*self.celery_queues, *self.lists.values()]:
                pipe.llen(name)
            lengths = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics scrape: Redis did not answer (%s); queue depths omitted", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("hashlake_broker_queue_depth", "Messages waiting in a Celery queue (Redis list)",
                                  labels=["queue"])
        for name, length in zip(self.celery_queues, lengths):
            depth.add_metric([name], length)
        yield depth
        intake = GaugeMetricFamily("hashlake_intake_list_length", "Length of an intake Redis list", labels=["list"])
        for label, length in zip(self.lists, lengths[len(self.celery_queues):]):
            intake.add_metric([label], length)
        yield intake
