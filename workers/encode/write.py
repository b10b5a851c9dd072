"""Write stage: one codes shard, one failures shard and one tombstones shard per batch, each written whole.

Names derive from the batch (``Batch.batch_id``, a hash of its (bucket, key, etag) set), so a
duplicate or retried batch overwrites its own shards instead of adding rows. Each shard is one PUT,
which S3 makes all-or-nothing, so a reader never lists half a shard.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from hashlake import shards
from hashlake.catalog import ModelCard
from hashlake.store import ObjectStore
from workers.encode.read import Fetched
from workers.encode.rejects import Failure
from workers.messages import Batch

PARQUET = "application/vnd.apache.parquet"


def labels_of(fetched: Fetched) -> list[str]:
    """The object's ``x-amz-meta-labels`` (comma-separated) as a list; [] when absent."""
    raw = fetched.info.metadata.get("labels", "")
    return [label.strip() for label in raw.split(",") if label.strip()]


def code_rows(fetched: Sequence[Fetched], encoded_at: datetime) -> list[dict]:
    """The per-image columns of a codes shard (everything but ``code`` and ``model``)."""
    return [{"key": f.ref.key, "bucket": f.ref.bucket, "etag": f.info.etag, "size": f.info.size,
             "last_modified": f.info.last_modified, "encoded_at": encoded_at, "labels": labels_of(f)}
            for f in fetched]


def write_codes(store: ObjectStore, bucket: str, card: ModelCard, batch_id: str, rows: Sequence[dict],
                codes: np.ndarray) -> str:
    """Write codes/<model_version>/<batch_id>.parquet; return its key."""
    meta = shards.ShardMeta(model_version=card.version, bits=card.bits, backbone=card.backbone)
    table = shards.build_codes_table(rows, codes, meta)
    key = shards.codes_path(card.version, batch_id)
    store.put(bucket, key, shards.to_parquet_bytes(table), content_type=PARQUET)
    return key


def write_failures(store: ObjectStore, bucket: str, model_version: str, batch_id: str,
                   failures: Sequence[Failure], failed_at: datetime) -> str:
    """Write failures/<model_version>/<batch_id>.parquet (one row per refused object); return its key."""
    rows = [{"key": f.ref.key, "bucket": f.ref.bucket, "etag": f.etag or None, "reason": f.reason,
             "detail": f.detail[:2000], "model": model_version, "failed_at": failed_at} for f in failures]
    table = pa.Table.from_pylist(rows, schema=shards.FAILURES_SCHEMA)
    key = shards.failures_path(model_version, batch_id)
    store.put(bucket, key, shards.to_parquet_bytes(table), content_type=PARQUET)
    return key


def write_tombstones(store: ObjectStore, bucket: str, batch: Batch, received_at: datetime) -> str:
    """Write tombstones/<batch_id>.parquet; deleted_at is each event's time (``received_at`` when the
    event carried none). Return its key."""
    rows = [{"key": o.key, "bucket": o.bucket,
             "deleted_at": parse_event_time(o.event_time) if o.event_time else received_at}
            for o in batch.objects]
    table = pa.Table.from_pylist(rows, schema=shards.TOMBSTONES_SCHEMA)
    key = shards.tombstones_path(batch.batch_id)
    store.put(bucket, key, shards.to_parquet_bytes(table), content_type=PARQUET)
    return key


def parse_event_time(text: str) -> datetime:
    """An event's ISO 8601 time (MinIO writes ``2026-11-22T10:00:00.123Z``) → an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"event_time {text!r} is not ISO 8601 (expected e.g. 2026-11-22T10:00:00.123Z)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
