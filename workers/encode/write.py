"""Write stage: a batch's rows as Arrow tables of the lake's schemas, committed in one transaction.

Rows carry the batch id (``Batch.batch_id``, derived from the batch's content) and each image
version's order (``mtime_ns``: the event's sequencer or the listing's time when the bytes read are
the version the event announced). The commit itself (``hashlake.lake.writer``) skips rows whose image
version the model version already holds, so a duplicate or retried batch adds nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from hashing_models.codes import as_code_matrix
from hashlake.catalog import ModelCard
from hashlake.lake.features import encode_features
from hashlake.lake.schema import CODES_SCHEMA, DELETES_SCHEMA, FAILURES_SCHEMA, FEATURES_SCHEMA, epoch_ns
from workers.encode.read import Fetched
from workers.encode.rejects import Failure
from workers.messages import Batch, ObjectRef


def labels_of(fetched: Fetched) -> list[str]:
    """The object's ``x-amz-meta-labels`` (comma-separated) as a list; [] when absent."""
    raw = fetched.info.metadata.get("labels", "")
    return [label.strip() for label in raw.split(",") if label.strip()]


def version_order(ref: ObjectRef, read_time: datetime | None) -> int:
    """``mtime_ns`` of the image version read for ``ref``: the event's or listing's order when it has
    one, else the store's Last-Modified (whole seconds), else 0 (older than anything)."""
    if ref.mtime_ns is not None:
        return ref.mtime_ns
    return epoch_ns(read_time) if read_time is not None else 0


def codes_table(fetched: Sequence[Fetched], codes: np.ndarray, card: ModelCard, batch_id: str,
                encoded_at: datetime) -> pa.Table:
    """Rows of the codes table for ``fetched`` and their packed codes (N, bits/8) uint8, in order."""
    codes = as_code_matrix(codes, card.bits // 8) if len(fetched) else np.zeros((0, card.bits // 8), np.uint8)
    if codes.shape[0] != len(fetched):
        raise ValueError(f"{len(fetched)} objects but {codes.shape[0]} codes")
    return pa.Table.from_pylist(
        [{"bucket": f.ref.bucket, "key": f.ref.key, "etag": f.info.etag, "version_id": f.info.version_id,
          "size": f.info.size, "last_modified": f.info.last_modified,
          "mtime_ns": version_order(f.ref, f.info.last_modified), "code": code.tobytes(), "model": card.version,
          "encoded_at": encoded_at, "labels": labels_of(f), "batch_id": batch_id}
         for f, code in zip(fetched, codes)], schema=CODES_SCHEMA)


def features_table(fetched: Sequence[Fetched], features: np.ndarray, backbone: str, batch_id: str,
                   encoded_at: datetime) -> pa.Table:
    """Rows of the features table for ``fetched`` and their backbone's pooled features (N, D), in order:
    one per image version, under ``backbone`` (``hashlake.model_versions.backbone_id``), each a (D,) float16
    little-endian blob. Identity columns are the code row's, so a feature row joins its code row on
    (bucket, key, etag)."""
    if features.ndim != 2 or features.shape[0] != len(fetched):
        raise ValueError(f"{len(fetched)} objects but features of shape {features.shape}")
    return pa.table({
        "bucket": [f.ref.bucket for f in fetched], "key": [f.ref.key for f in fetched],
        "etag": [f.info.etag for f in fetched], "version_id": [f.info.version_id for f in fetched],
        "mtime_ns": [version_order(f.ref, f.info.last_modified) for f in fetched],
        "backbone": [backbone] * len(fetched), "feature": encode_features(features),
        "encoded_at": [encoded_at] * len(fetched), "batch_id": [batch_id] * len(fetched)}, schema=FEATURES_SCHEMA)


def failures_table(failures: Sequence[Failure], model_version: str, batch_id: str, failed_at: datetime) -> pa.Table:
    """Rows of the failures table, one per refused object (details cut at 2,000 characters)."""
    return pa.Table.from_pylist(
        [{"bucket": f.ref.bucket, "key": f.ref.key, "etag": f.etag or None, "version_id": f.ref.version_id,
          "mtime_ns": version_order(f.ref, None), "reason": f.reason, "detail": f.detail[:2000],
          "model": model_version, "failed_at": failed_at, "batch_id": batch_id} for f in failures],
        schema=FAILURES_SCHEMA)


def deletes_table(batch: Batch, received_at: datetime) -> pa.Table:
    """Rows of the deletes table for a delete batch: each event's order (sequencer or time), else the
    moment the batch was received. A delete carries an etag only from the reconciler (the version it
    saw vanish, with that version's order)."""
    return pa.Table.from_pylist(
        [{"bucket": o.bucket, "key": o.key, "version_id": o.version_id, "etag": o.etag or None,
          "mtime_ns": o.mtime_ns if o.mtime_ns is not None else
          epoch_ns(parse_event_time(o.event_time) if o.event_time else received_at),
          "deleted_at": parse_event_time(o.event_time) if o.event_time else received_at,
          "batch_id": batch.batch_id} for o in batch.objects], schema=DELETES_SCHEMA)


def parse_event_time(text: str) -> datetime:
    """An event's ISO 8601 time (MinIO writes ``2026-11-22T10:00:00.123Z``) → an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"event_time {text!r} is not ISO 8601 (expected e.g. 2026-11-22T10:00:00.123Z)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
