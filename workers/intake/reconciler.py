"""The reconciler: compare the images bucket with the lake under a model version, and queue the difference.

One pass is a query: the bucket listing, streamed into a DuckDB table of the pass (chunks of
``LISTING_CHUNK`` objects, never held in Python), anti-joined with the lake.

- A listed object whose image version has no code and no failure under the model version (the same
  rule the encoders use to skip known versions: ``hashlake.lake.writer.same_version_or_newer``) is
  queued for encoding. It is the safety net for lost events, and the only event source when the
  store sends no notifications (moto_server in the local stack).
- A current code (``hashlake.lake.rules``) whose key is gone from the listing is queued as a delete of
  that version (its etag and order), so it hides that version and older ones, never a later upload.

Staged runs (``version=``): the bucket is compared with a named version instead, and the encodes are
queued for that version (``Batch.model_version``): the re-encode before a promotion
(``scheduler.promote``), while the active version keeps serving and the live events keep using it.

Re-queueing: what the reconciler queued is remembered in a Redis hash (shared by the periodic and the
on-demand runs; a staged version has a hash of its own, so neither kind of run forgets the other's).
An object still missing ``Settings.reconcile_requeue_s`` after it was queued is queued again, whatever
else is queued: a lost batch is repaired while ingest goes on (a duplicate costs no read: the encoders
skip versions the lake holds). One pass queues at most ``Settings.reconcile_max_per_pass`` objects, so
a pass over a bucket full of new objects does not flood the queue; the next passes take the rest.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import redis

from hashlake.catalog import Catalog, ModelNotFound
from hashlake.config import Settings
from hashlake.lake.catalog_db import CatalogUnavailable
from hashlake.lake.connection import open_lake
from hashlake.lake.rules import current_codes_sql
from hashlake.lake.schema import LAKE, epoch_ns
from hashlake.lake.writer import SETTLED, same_version_or_newer
from hashlake.store import ObjectStore, StoreError
from workers.intake import metrics
from workers.intake.events import ObjectEvent
from workers.intake.pending import IntakeKeys, encode_entry, intake_redis
from workers.intake.sender import task_queue_names
from workers.messages import ObjectRef

log = logging.getLogger(__name__)

SOURCE = "reconciler"
PUSH_CHUNK = 1000  # entries per RPUSH: one round trip each, well under Redis' argument limits
LISTING_CHUNK = 10_000  # listed objects per insert into the pass's table: ~1 MB of Arrow

_LISTING_SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                             ("size", pa.int64()), ("mtime_ns", pa.int64()), ("last_modified", pa.string())])
_QUEUED_SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                            ("queued_at", pa.float64())])


class LakeUnreachable(RuntimeError):
    """The lake's catalog or files did not answer during a pass; the message says which."""


@dataclass(frozen=True)
class ReconcileSummary:
    model_version: str
    listed: int  # objects in the images bucket
    indexed: int  # of those, with a code of their version under model_version
    failed: int  # of those, with a failure of their version under model_version (not queued again)
    missing: int  # of those, neither: queued now, or skipped as queued recently, or left for the next pass
    queued: int  # missing objects queued for encoding by this run
    skipped_recent: int  # missing or deleted but queued by an earlier run less than reconcile_requeue_s ago
    deleted: int  # indexed keys gone from the bucket, queued as deletes by this run
    seconds: float
    pending: int  # length of the pending list after this run
    batcher_alive: bool  # False: no intake batcher is running; `hashlake intake` sends the queued work


class Reconciler:
    """One per process; it keeps one lake connection across passes."""

    def __init__(self, settings: Settings, store: ObjectStore, client: redis.Redis, keys: IntakeKeys,
                 celery_queues: list[str]):
        self.settings = settings
        self.store = store
        self.client = client
        self.keys = keys
        self.celery_queues = celery_queues
        self._lake: duckdb.DuckDBPyConnection | None = None

    def model_version(self) -> str:
        """The pinned version, else the active one (``ModelNotFound`` says how to create one)."""
        return self.settings.model_version or Catalog(self.store, self.settings).active()

    def run_once(self, *, force: bool = False, version: str | None = None) -> ReconcileSummary:
        """List, compare, queue. ``force`` queues every missing object even if queued recently.
        ``version``: compare with that version and queue its encodes for it (a staged run)."""
        started = time.monotonic()
        staged = version
        version = staged or self.model_version()
        queued_hash = _staged_queued_hash(self.keys, staged) if staged else self.keys.reconciled
        try:
            con = self._connection()
            listed, listing_started = self._load_listing(con)
            counts, missing, gone, skipped = self._compare(con, version, listing_started, queued_hash, force)
        except duckdb.Error as exc:
            self.close()
            raise LakeUnreachable(f"reconciler: the lake did not answer: {str(exc).strip()[:300]}") from exc
        events = ([ObjectEvent("encode", r, staged) for r in missing] +
                  [ObjectEvent("delete", r) for r in gone])
        self._queue(events, queued_hash)
        queued, deleted = len(missing), len(gone)
        metrics.RECONCILE_MISSING.inc(queued)
        metrics.RECONCILE_DELETED.inc(deleted)
        metrics.EVENTS.labels(SOURCE, "created").inc(queued)
        metrics.EVENTS.labels(SOURCE, "removed").inc(deleted)
        seconds = time.monotonic() - started
        metrics.RECONCILE_SECONDS.observe(seconds)
        return ReconcileSummary(
            model_version=version, listed=listed, indexed=counts["indexed"], failed=counts["failed"],
            missing=counts["missing"], queued=queued, skipped_recent=skipped, deleted=deleted,
            seconds=round(seconds, 3), pending=int(self.client.llen(self.keys.pending)),
            batcher_alive=bool(self.client.exists(self.keys.batcher_heartbeat)))

    def forget_staged(self, version: str) -> None:
        """Drop what staged runs for ``version`` remembered queueing (once it is the active version)."""
        self.client.delete(_staged_queued_hash(self.keys, version))

    def close(self) -> None:
        if self._lake is not None:
            self._lake.close()
            self._lake = None

    # -- the pass --------------------------------------------------------------------------------
    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._lake is None:
            try:
                self._lake = open_lake(self.settings)
            except CatalogUnavailable as exc:
                raise LakeUnreachable(str(exc)) from None
        return self._lake

    def _load_listing(self, con: duckdb.DuckDBPyConnection) -> tuple[int, datetime]:
        """Stream the images bucket into the pass's table ``listing``; return (objects, listing start)."""
        bucket = self.settings.images_bucket
        con.execute("CREATE OR REPLACE TEMP TABLE listing (bucket VARCHAR, key VARCHAR, etag VARCHAR, size BIGINT, "
                    "mtime_ns BIGINT, last_modified VARCHAR)")
        listing_started = datetime.now(timezone.utc)  # listed before the lake is read: see the deletes
        listed = 0
        chunk: list[dict] = []
        for info in self.store.list(bucket):
            chunk.append({"bucket": bucket, "key": info.key, "etag": info.etag, "size": info.size,
                          "mtime_ns": epoch_ns(info.last_modified) if info.last_modified else None,
                          "last_modified": _iso(info.last_modified)})
            if len(chunk) >= LISTING_CHUNK:
                listed += self._insert_listing(con, chunk)
                chunk = []
        listed += self._insert_listing(con, chunk)
        return listed, listing_started

    @staticmethod
    def _insert_listing(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> int:
        if rows:
            con.register("_hashlake_listed", pa.Table.from_pylist(rows, schema=_LISTING_SCHEMA))
            try:
                con.execute("INSERT INTO listing SELECT * FROM _hashlake_listed")
            finally:
                con.unregister("_hashlake_listed")
        return len(rows)

    def _compare(self, con: duckdb.DuckDBPyConnection, version: str, listing_started: datetime,
                 queued_hash: str, force: bool) -> tuple[dict, list[ObjectRef], list[ObjectRef], int]:
        bucket = self.settings.images_bucket
        params = {"model": version, "bucket": bucket}
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE compared AS
            SELECT l.*,
                   EXISTS (SELECT 1 FROM {LAKE}.codes AS o WHERE o.model = $model
                           AND {same_version_or_newer('o', 'l')}) AS indexed,
                   EXISTS (SELECT 1 FROM {LAKE}.failures AS o WHERE o.model = $model AND {SETTLED['failures']}
                           AND {same_version_or_newer('o', 'l')}) AS failed
            FROM listing AS l""", {"model": version})
        indexed, failed, missing = con.execute(
            "SELECT count(*) FILTER (indexed), count(*) FILTER (failed AND NOT indexed), "
            "count(*) FILTER (NOT indexed AND NOT failed) FROM compared").fetchone()
        current = current_codes_sql(
            f"(SELECT bucket, key, etag, version_id, mtime_ns, last_modified, encoded_at FROM {LAKE}.codes "
            f"WHERE model = $model AND bucket = $bucket)", f"{LAKE}.deletes")
        cutoff = epoch_ns(listing_started)
        # a current row newer than the listing's start belongs to an object uploaded behind the listing
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE gone AS
            SELECT c.bucket, c.key, c.etag, c.mtime_ns FROM ({current}) AS c
            WHERE c.mtime_ns <= {cutoff} AND NOT EXISTS (SELECT 1 FROM listing AS l WHERE l.key = c.key)""", params)
        con.register("_hashlake_queued", self._queued(queued_hash))
        try:
            recent = "TRUE" if force else f"q.queued_at > {time.time() - self.settings.reconcile_requeue_s}"
            wanted = con.execute(f"""
                SELECT m.bucket, m.key, m.etag, m.size, m.mtime_ns, m.last_modified, NULL AS deleted,
                       EXISTS (SELECT 1 FROM _hashlake_queued AS q WHERE q.bucket = m.bucket AND q.key = m.key
                               AND q.etag = m.etag AND {recent}) AS recent
                FROM compared AS m WHERE NOT m.indexed AND NOT m.failed
                UNION ALL
                SELECT g.bucket, g.key, g.etag, NULL, g.mtime_ns, NULL, TRUE,
                       EXISTS (SELECT 1 FROM _hashlake_queued AS q WHERE q.bucket = g.bucket AND q.key = g.key
                               AND q.etag = g.etag AND {recent})
                FROM gone AS g""").fetchall()
            # what was queued and is neither missing nor gone any more: indexed, failed or gone since
            stale = con.execute("""
                SELECT q.bucket, q.key, q.etag FROM _hashlake_queued AS q
                WHERE NOT EXISTS (SELECT 1 FROM compared AS m WHERE NOT m.indexed AND NOT m.failed
                                  AND m.bucket = q.bucket AND m.key = q.key AND m.etag = q.etag)
                  AND NOT EXISTS (SELECT 1 FROM gone AS g WHERE g.bucket = q.bucket AND g.key = q.key AND g.etag = q.etag)
                """).fetchall()
        finally:
            con.unregister("_hashlake_queued")
        self._forget(queued_hash, stale)
        due = [row for row in wanted if force or not row[7]]
        skipped = len(wanted) - len(due)
        due = due[:self.settings.reconcile_max_per_pass]
        deleted_at = listing_started.isoformat()
        missing_refs = [ObjectRef(b, k, e, size, lm, mtime_ns=m) for b, k, e, size, m, lm, gone_, _ in due if not gone_]
        # a delete of the version seen vanishing, at that version's order (rules.py): a later upload stays
        gone_refs = [ObjectRef(b, k, e, None, deleted_at, mtime_ns=m) for b, k, e, _, m, _, gone_, _ in due if gone_]
        return {"indexed": indexed, "failed": failed, "missing": missing}, missing_refs, gone_refs, skipped

    # -- queueing ---------------------------------------------------------------------------------
    def _queued(self, queued_hash: str) -> pa.Table:
        """What this reconciler queued (per image version, deletes with etag ''), and when."""
        rows = []
        for field_, value in self.client.hgetall(queued_hash).items():
            parts = field_.decode().split("\0")
            if len(parts) == 3:
                rows.append({"bucket": parts[0], "key": parts[1], "etag": parts[2], "queued_at": float(value)})
        return pa.Table.from_pylist(rows, schema=_QUEUED_SCHEMA)

    def _forget(self, queued_hash: str, stale: list[tuple]) -> None:
        names = [f"{b}\0{k}\0{e}" for b, k, e in stale]
        for i in range(0, len(names), PUSH_CHUNK):
            self.client.hdel(queued_hash, *names[i:i + PUSH_CHUNK])

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
    """A reconciler with its own Redis client and lake connection, for runs outside the intake process."""
    client = intake_redis(settings)
    reconciler = Reconciler(settings, ObjectStore(settings), client, IntakeKeys.for_settings(settings),
                            task_queue_names(settings))
    try:
        yield reconciler
    finally:
        reconciler.close()
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
        except (StoreError, redis.RedisError, LakeUnreachable) as exc:
            metrics.RECONCILE_RUNS.labels("error").inc()
            log.error("reconciler: run failed (%s: %s); next run in %.0f s", exc.__class__.__name__, exc, interval_s)
        stop.wait(interval_s)


def _identity(event: ObjectEvent) -> str:
    ref = event.ref
    return f"{ref.bucket}\0{ref.key}\0{ref.etag}"


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat() if moment is not None else None
