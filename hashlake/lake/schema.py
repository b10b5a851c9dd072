"""The lake's tables and the Arrow schemas that rows are built in before a commit.

    codes     one row per (image version, model version): the packed code and what a query shows with it
    failures  one row per refusal of an image version under a model version (history; see rules.py)
    deletes   one row per delete: of a key (the versions up to ``mtime_ns``), of one ``version_id``, or of
              the version the reconciler saw vanish (``etag``; see rules.py)
    features  one row per (image version, backbone): the backbone's pooled features, float16, kept by the
              encode workers so that a head-only retraining and its re-encode read no image

``mtime_ns`` orders the versions of a key and the deletes among them at full precision: MinIO's
``sequencer`` (nanoseconds) when an event carried it, else the bucket listing's time (milliseconds),
never the whole-second Last-Modified header. ``batch_id`` names the batch that wrote a row, for
tracing a row back to its task. Codes are partitioned by model version, so reading one version's rows
touches only its files.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

LAKE = "lake"  # the name every hashlake connection attaches the lake under

_TS = pa.timestamp("us", tz="UTC")

CODES_SCHEMA = pa.schema([
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("version_id", pa.string()),  # the object version's id in a versioned bucket, else null
    pa.field("size", pa.int64()),
    pa.field("last_modified", _TS),  # the object's, as the store reports it (display only; see mtime_ns)
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("code", pa.binary(), nullable=False),  # packed bits, MSB first (hashing_models.codes)
    pa.field("model", pa.string(), nullable=False),
    pa.field("encoded_at", _TS, nullable=False),
    pa.field("labels", pa.list_(pa.string())),  # from the object's x-amz-meta-labels, comma-separated
    pa.field("batch_id", pa.string(), nullable=False),
])

FAILURES_SCHEMA = pa.schema([
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("etag", pa.string()),  # of the bytes read; the event's when no read finished
    pa.field("version_id", pa.string()),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # a short class: not_an_image, truncated, too_large, ...
    pa.field("detail", pa.string()),  # the error message, for a person
    pa.field("model", pa.string(), nullable=False),
    pa.field("failed_at", _TS, nullable=False),
    pa.field("batch_id", pa.string(), nullable=False),
])

DELETES_SCHEMA = pa.schema([
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("version_id", pa.string()),  # set: only that version was removed; null: the key, up to mtime_ns
    pa.field("etag", pa.string()),  # set by the reconciler: the vanished version (its mtime_ns is that version's)
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("deleted_at", _TS, nullable=False),
    pa.field("batch_id", pa.string(), nullable=False),
])

FEATURES_SCHEMA = pa.schema([
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("version_id", pa.string()),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    # which features: backbone name, input px and a digest of its weights (``backbone_id``), since a
    # fine-tuned backbone's features are not the pretrained one's
    pa.field("backbone", pa.string(), nullable=False),
    pa.field("feature", pa.binary(), nullable=False),  # (D,) float16, little-endian: 2·D bytes
    pa.field("encoded_at", _TS, nullable=False),
    pa.field("batch_id", pa.string(), nullable=False),
])

TABLES = {"codes": CODES_SCHEMA, "failures": FAILURES_SCHEMA, "deletes": DELETES_SCHEMA,
          "features": FEATURES_SCHEMA}

_SQL_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.binary(): "BLOB", _TS: "TIMESTAMPTZ",
              pa.list_(pa.string()): "VARCHAR[]"}


PARTITIONS = {"codes": "model", "features": "backbone"}  # reading one model's (backbone's) rows touches its files


def create_statements(existing: set[str] = frozenset()) -> list[str]:
    """CREATE TABLE and its partitioning for every table not in ``existing``."""
    statements = []
    for name, schema in TABLES.items():
        if name in existing:
            continue
        columns = ", ".join(f"{f.name} {_SQL_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in schema)
        statements.append(f"CREATE TABLE IF NOT EXISTS {LAKE}.{name} ({columns})")
        if name in PARTITIONS:
            statements.append(f"ALTER TABLE {LAKE}.{name} SET PARTITIONED BY ({PARTITIONS[name]})")
    return statements


def epoch_ns(moment: datetime) -> int:
    """An aware datetime → integer ns since the epoch (exact to the microsecond: no float rounding)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
