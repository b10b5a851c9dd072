"""The reconciler: compare the images bucket with the index of the model version, and queue the difference.

- An object whose ``(key, etag)`` has no visible codes row (and no recorded failure) under the model
  version is queued for encoding. It is the safety net for lost events, and the only event source
  when the store sends no notifications (moto_server in the local stack).
- A visible codes row whose key is gone from the bucket is queued as a delete; its tombstone time is
  the moment the listing started, so it hides only versions the listing could have seen.

"Visible" follows the ``codes`` view's rule: a row is hidden by a tombstone of its (bucket, key) with
``deleted_at >= last_modified``. Shards are read column-wise (bucket, key, etag, times) and cached by
object name and etag, so a periodic run reads only the shards that are new since the last one.

Staged runs (``version=``): the bucket is compared with a named version's index instead, and the
encodes are queued for that version (``Batch.model_version``): the re-encode before a promotion
(``scheduler.promote``), while the active version keeps serving and the live events keep using it.

Re-queueing: what the reconciler queued is remembered in a Redis hash (shared by the periodic and the
on-demand runs; a staged version has a hash of its own, so neither kind of run forgets the other's).
An object still missing is queued again only when the broker has had time to redeliver a lost task
(``broker_visibility_timeout_s``) and the queues are empty (all earlier work was taken), so a long
backlog is not queued twice over.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import redis

from hashlake.catalog import Catalog, ModelNotFound
from hashlake.config import Settings
from hashlake.shards import CODES_PREFIX, FAILURES_PREFIX, TOMBSTONES_PREFIX, read_parquet_bytes
from hashlake.store import ObjectMissing, ObjectStore, StoreError
from workers.intake import metrics
from workers.intake.events import ObjectEvent
from workers.intake.pending import IntakeKeys, encode_entry, intake_redis
from workers.intake.sender import task_queue_names
from workers.messages import ObjectRef

log = logging.getLogger(__name__)

SOURCE = "reconciler"
PUSH_CHUNK = 1000  # entries per RPUSH: one round trip each, well under Redis' argument limits


class ShardUnreadable(RuntimeError):
    """A shard in the index bucket could not be parsed; the message names it."""


@dataclass(frozen=True)
class ReconcileSummary:
    model_version: str
    listed: int  # objects in the images bucket
    indexed: int  # of those, visible in the index under model_version
    failed: int  # of those, recorded as failures under model_version (not queued again)
    missing: int  # of those, neither: queued now, or skipped as queued recently
    queued: int  # missing objects queued for encoding by this run
    skipped_recent: int  # missing or deleted but queued by an earlier run still in flight
    deleted: int  # indexed keys gone from the bucket, queued as deletes by this run
    shards_read: int  # shards (codes, failures, tombstones) read from the store by this run
    shards_cached: int  # shards reused from the cache
    seconds: float
    pending: int  # length of the pending list after this run
    batcher_alive: bool  # False: no intake batcher is running; `hashlake intake` sends the queued work


class ShardCache:
    """Selected columns of the shards under a prefix, keyed by object name and etag (a retried task
    replaces its shard under the same name, with a new etag)."""

    def __init__(self, store: ObjectStore, bucket: str):
        self.store = store
        self.bucket = bucket
        self.tables: dict[str, tuple[str, pa.Table]] = {}  # object name → (etag, table)
        self.read = 0
        self.hits = 0

    def tables_under(self, prefix: str, columns: list[str]) -> list[pa.Table]:
        listed = {o.key: o.etag for o in self.store.list(self.bucket, prefix) if o.key.endswith(".parquet")}
        for name in [n for n in self.tables if n.startswith(prefix) and n not in listed]:
            del self.tables[name]  # the shard is gone from the store
        tables = []
        for name, etag in listed.items():
            cached = self.tables.get(name)
            if cached is not None and cached[0] == etag:
                self.hits += 1
                tables.append(cached[1])
                continue
            try:
                body, _ = self.store.get(self.bucket, name)
            except ObjectMissing:
                continue  # removed between listing and reading: it no longer counts
            try:
                table = read_parquet_bytes(body, columns)
            except (pa.ArrowException, OSError) as exc:
                raise ShardUnreadable(f"s3://{self.bucket}/{name} is not a readable shard with columns "
                                      f"{columns}: {exc}") from exc
            self.read += 1
            self.tables[name] = (etag, table)
            tables.append(table)
        return tables


class Reconciler:
    """One instance per process: its shard cache makes the periodic runs cheap."""

    def __init__(self, settings: Settings, store: ObjectStore, client: redis.Redis, keys: IntakeKeys,
                 celery_queues: list[str]):
        self.settings = settings
        self.store = store
        self.client = client
        self.keys = keys
        self.celery_queues = celery_queues
        self.cache = ShardCache(store, settings.index_bucket)
        self.requeue_after_s = settings.broker_visibility_timeout_s

    def model_version(self) -> str:
        """The pinned version, else the active one (``ModelNotFound`` says how to create one)."""
        return self.settings.model_version or Catalog(self.store, self.settings).active()

    def run_once(self, *, force: bool = False, version: str | None = None) -> ReconcileSummary:
        """List, compare, queue. ``force`` queues every missing object even if queued recently.
        ``version``: compare with that version's index and queue its encodes for it (a staged run)."""
        started = time.monotonic()
        read0, hits0 = self.cache.read, self.cache.hits
        staged = version
        version = staged or self.model_version()
        bucket = self.settings.images_bucket
        listing_started = datetime.now(timezone.utc)
        objects = {o.key: o for o in self.store.list(bucket)}  # listed before the index is read, see deletes
        visible = self._visible_rows(version, bucket)  # key → {etag: last_modified µs or None}
        failed = self._failed(version, bucket)  # {(key, etag)}

        missing: list[ObjectRef] = []
        indexed = failed_count = 0
        for key, info in objects.items():
            if info.etag in visible.get(key, ()):
                indexed += 1
            elif (key, info.etag) in failed:
                failed_count += 1
            else:
                missing.append(ObjectRef(bucket, key, info.etag, info.size, _iso(info.last_modified)))
        cutoff_us = _micros(listing_started)
        gone = [ObjectRef(bucket, key, "", None, listing_started.isoformat())
                for key, rows in visible.items()
                # a row newer than the listing's start belongs to an object uploaded behind the listing
                if key not in objects and all(lm is None or lm <= cutoff_us for lm in rows.values())]

        events = [ObjectEvent("encode", r, staged) for r in missing] + [ObjectEvent("delete", r) for r in gone]
        queued_hash = _staged_queued_hash(self.keys, staged) if staged else self.keys.reconciled
        to_queue, skipped = self._select_unqueued(events, force, queued_hash)
        self._queue(to_queue, queued_hash)
        queued = sum(e.kind == "encode" for e in to_queue)
        deleted = len(to_queue) - queued
        metrics.RECONCILE_MISSING.inc(queued)
        metrics.RECONCILE_DELETED.inc(deleted)
        metrics.EVENTS.labels(SOURCE, "created").inc(queued)
        metrics.EVENTS.labels(SOURCE, "removed").inc(deleted)
        seconds = time.monotonic() - started
        metrics.RECONCILE_SECONDS.observe(seconds)
        return ReconcileSummary(
            model_version=version, listed=len(objects), indexed=indexed, failed=failed_count, missing=len(missing),
            queued=queued, skipped_recent=skipped, deleted=deleted, shards_read=self.cache.read - read0,
            shards_cached=self.cache.hits - hits0, seconds=round(seconds, 3),
            pending=int(self.client.llen(self.keys.pending)),
            batcher_alive=bool(self.client.exists(self.keys.batcher_heartbeat)))

    def forget_staged(self, version: str) -> None:
        """Drop what staged runs for ``version`` remembered queueing (once it is the active version)."""
        self.client.delete(_staged_queued_hash(self.keys, version))

    # -- the index --------------------------------------------------------------------------------
    def _visible_rows(self, version: str, bucket: str) -> dict[str, dict[str, int | None]]:
        deleted_at: dict[str, int] = {}  # key → newest tombstone time, µs since epoch
        for table in self.cache.tables_under(TOMBSTONES_PREFIX, ["bucket", "key", "deleted_at"]):
            for b, key, at in zip(*_columns(table, ["bucket", "key", "deleted_at"]), strict=True):
                if b == bucket and at is not None and at > deleted_at.get(key, -1):
                    deleted_at[key] = at
        visible: dict[str, dict[str, int | None]] = {}
        for table in self.cache.tables_under(f"{CODES_PREFIX}{version}/", ["bucket", "key", "etag", "last_modified"]):
            for b, key, etag, lm in zip(*_columns(table, ["bucket", "key", "etag", "last_modified"]), strict=True):
                if b != bucket:
                    continue
                at = deleted_at.get(key)
                if at is not None and lm is not None and at >= lm:
                    continue  # hidden by a tombstone
                visible.setdefault(key, {})[etag] = lm
        return visible

    def _failed(self, version: str, bucket: str) -> set[tuple[str, str]]:
        failed: set[tuple[str, str]] = set()
        for table in self.cache.tables_under(f"{FAILURES_PREFIX}{version}/", ["bucket", "key", "etag"]):
            for b, key, etag in zip(*_columns(table, ["bucket", "key", "etag"]), strict=True):
                if b == bucket:
                    failed.add((key, etag or ""))
        return failed

    # -- queueing ---------------------------------------------------------------------------------
    def _select_unqueued(self, events: list[ObjectEvent], force: bool,
                         queued_hash: str) -> tuple[list[ObjectEvent], int]:
        """Drop events this reconciler queued recently (see the module docstring); forget the rest."""
        queued_at = {k.decode(): float(v) for k, v in self.client.hgetall(queued_hash).items()}
        current = {_identity(e): e for e in events}
        stale = [k for k in queued_at if k not in current]  # indexed, failed or gone since: forget
        for i in range(0, len(stale), PUSH_CHUNK):
            self.client.hdel(queued_hash, *stale[i:i + PUSH_CHUNK])
        if force:
            return events, 0
        now = time.time()
        may_requeue = self._queues_empty()
        selected = [e for k, e in current.items()
                    if k not in queued_at or (may_requeue and now - queued_at[k] >= self.requeue_after_s)]
        return selected, len(events) - len(selected)

    def _queues_empty(self) -> bool:
        pipe = self.client.pipeline(transaction=False)
        for name in [self.keys.pending, self.keys.pending_processing, *self.celery_queues]:
            pipe.llen(name)
        return sum(pipe.execute()) == 0

    def _queue(self, events: list[ObjectEvent], queued_hash: str) -> None:
        now = time.time()
        for i in range(0, len(events), PUSH_CHUNK):
            chunk = events[i:i + PUSH_CHUNK]
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(self.keys.pending, *(encode_entry(e, SOURCE) for e in chunk))
            pipe.hset(queued_hash, mapping={_identity(e): now for e in chunk})
            pipe.execute()


@contextmanager
def open_reconciler(settings: Settings) -> Iterator[Reconciler]:
    """A reconciler with its own Redis client, for runs outside the intake process. Keep it across
    runs: its shard cache is what makes a repeated run cheap."""
    client = intake_redis(settings)
    try:
        yield Reconciler(settings, ObjectStore(settings), client, IntakeKeys.for_settings(settings),
                         task_queue_names(settings))
    finally:
        client.close()


def reconcile_once(settings: Settings, *, force: bool = False) -> ReconcileSummary:
    """One reconciliation now (``hashlake reconcile``). Raises ``ModelNotFound`` when no model version is
    active (or pinned): there is nothing to compare the bucket with yet."""
    with open_reconciler(settings) as reconciler:
        return reconciler.run_once(force=force)


def _staged_queued_hash(keys: IntakeKeys, version: str) -> str:
    """The Redis hash of what staged runs for ``version`` queued (removed once it is promoted)."""
    return f"{keys.reconciled}:{version}"


def run_periodic(reconciler: Reconciler, interval_s: float, stop: threading.Event) -> None:
    """Reconcile at start, then every ``interval_s`` until ``stop``; a failed run is logged and counted,
    and the next one comes on schedule."""
    last_problem = None
    while not stop.is_set():
        try:
            summary = reconciler.run_once()
            metrics.RECONCILE_RUNS.labels("ok").inc()
            last_problem = None
            if summary.queued or summary.deleted:
                log.info("reconciler: %s", summary)
        except ModelNotFound as exc:
            metrics.RECONCILE_RUNS.labels("no_model").inc()
            if str(exc) != last_problem:  # say it once, not every interval
                log.warning("reconciler: skipped: %s", exc)
                last_problem = str(exc)
        except (StoreError, redis.RedisError, ShardUnreadable) as exc:
            metrics.RECONCILE_RUNS.labels("error").inc()
            log.error("reconciler: run failed (%s: %s); next run in %.0f s", exc.__class__.__name__, exc, interval_s)
        stop.wait(interval_s)


def _identity(event: ObjectEvent) -> str:
    ref = event.ref
    return f"{ref.bucket}\0{ref.key}\0{ref.etag}"  # deletes carry etag "": one field per key


def _columns(table: pa.Table, names: list[str]) -> list[list]:
    # Timestamps as µs since the epoch (int): cheaper than datetime objects for millions of rows.
    return [(table[n].cast(pa.int64()) if pa.types.is_timestamp(table.schema.field(n).type) else table[n]).to_pylist()
            for n in names]


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat() if moment is not None else None
