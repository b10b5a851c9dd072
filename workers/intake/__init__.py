"""Event intake: bucket events (MinIO webhook, MinIO Redis list) and the reconciler, batched into Celery tasks.

    MinIO webhook ───POST──▶ webhook.py ──────┐
    MinIO notify_redis list ▶ redis_source.py ─┼─RPUSH─▶ <events_key>:pending ─▶ batcher.py ─▶ Celery queue
    bucket listing vs index ▶ reconciler.py ───┘                      (N keys or T ms; send_task)

    events.py        parse MinIO records (webhook bodies, ``notify_redis`` elements) into object events
    pending.py       the Redis lists' names, the pending-entry format, the moves every source shares
    webhook.py       source: the MinIO webhook receiver (authenticated POSTs, 2xx once queued)
    redis_source.py  source: consumer of MinIO's ``notify_redis`` list
    reconciler.py    source: the bucket against the lake under a version; queues the difference
    batcher.py       drains the pending list into batches of N objects or T ms, sends each
    sender.py        publishes batches as Celery tasks by name (the one app, ``workers.celery_app``)
    metrics.py       the intake's Prometheus metrics
    runner.py        runs it all in one process, with periodic reconciling and lake compaction

The faces call ``run_intake(settings)`` (``hashlake intake``) and ``reconcile_once(settings)``
(``hashlake reconcile``).

Why no event is lost (at-least-once), hop by hop. Every hop keeps the item in a durable place until
the next durable place has confirmed it, and every "remove" comes strictly after that confirmation:

1. Webhook → pending list: the events of a POST are appended in one RPUSH (atomic: all or none) and
   the answer is 2xx only after Redis confirmed it. Any failure answers 503 (or the connection drops),
   and MinIO keeps the event in its queue_dir and retries.
2. MinIO's Redis list → pending list: an element is claimed with LMOVE into ``:processing`` (atomic:
   it is always in exactly one of the two lists). Its events are appended to pending and the element
   removed from ``:processing`` in one MULTI/EXEC. A consumer killed before the EXEC leaves the
   element in ``:processing``; the next consumer moves it back to the list's head before it starts.
3. Reconciler → pending list: it only appends; anything it failed to append is still missing at the
   next run and found again (it is the safety net, and needs none itself).
4. Pending list → Celery queue: the batcher claims entries with LMOVE into ``pending:processing`` (a
   backlog in chunks, by a Lua script that Redis runs atomically: the same move, many at once) and
   removes them (LREM) only after ``send_task`` returned, i.e. after the broker confirmed the LPUSH
   of the task message. A broker error raises and the entries stay claimed (the batch is retried in
   this run with backoff, or given back to pending by the next run's start-up).
5. From the Celery queue on, the workers' acks_late/visibility timeout take over.

The price is duplicates, never loss: a crash between a confirmed write and the following remove
replays an item. Duplicates are harmless: a batch's id (and so its shard name) derives from its
content, the encode side skips images already indexed, the ``codes`` view collapses duplicate rows,
and tombstones are idempotent. Within one open batch the batcher drops repeated (bucket, key, etag).

Run one intake process per ``events_key``. A second one is safe but wasteful: its start-up give-back
would hand the first one's claimed items out again (more duplicates, still no loss).
"""
from workers.intake.reconciler import ReconcileSummary, reconcile_once
from workers.intake.runner import run_intake

__all__ = ["ReconcileSummary", "reconcile_once", "run_intake"]
