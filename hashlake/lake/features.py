"""The lake's ``features`` table: each encoded image version's pooled backbone features, for retraining.

The encode workers write one row per image version (bucket, key, etag, mtime_ns) and backbone in the transaction of the batch's
codes (``LakeWriter.commit``; ``Settings.keep_features`` turns it off): ``feature`` is the (D,) pooled
vector as float16, little-endian. ``backbone`` is ``hashlake.model_versions.backbone_id`` (name, px, weights
digest), so the versions built on one backbone share rows, and a head trained on them re-encodes an
image from its row exactly as a worker would from the image (``forward_head`` of the float16 features;
see ``tests/test_features.py`` for how often the rounding flips a bit).

Deletes: feature rows are never deleted or updated. They are read joined to current code rows
(``features_of_current_codes``, or ``read_features`` on rows the caller took from the current codes),
so a deleted or overwritten image's row is simply never read; compaction (``maintenance.py``) treats
the table like the others.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hashlake.lake.rules import current_codes_sql
from hashlake.lake.schema import LAKE

FEATURE_DTYPE = np.dtype("<f2")  # the stored blobs: float16, little-endian


def encode_features(features: np.ndarray) -> pa.Array:
    """(N, D) floats → N blobs of 2·D bytes (float16, little-endian), one Arrow binary array."""
    values = np.ascontiguousarray(features, dtype=FEATURE_DTYPE)
    if values.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {values.shape}")
    n, dim = values.shape
    offsets = np.arange(n + 1, dtype=np.int32) * (dim * FEATURE_DTYPE.itemsize)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(values.tobytes())])


def decode_features(blobs) -> np.ndarray:
    """Feature blobs (an Arrow binary array or chunked array, or a list of bytes; no nulls) → (N, D)
    float32. Every blob must hold the same D."""
    if isinstance(blobs, (pa.Array, pa.ChunkedArray)):
        blobs = blobs.to_pylist() if blobs.null_count else blobs
        if isinstance(blobs, pa.ChunkedArray):
            blobs = blobs.combine_chunks() if blobs.num_chunks else pa.array([], pa.binary())
    if isinstance(blobs, pa.Array):
        if not len(blobs):
            return np.zeros((0, 0), np.float32)
        width = pc.binary_length(blobs).to_numpy()
        if (width != width[0]).any():
            raise ValueError(f"feature blobs of different lengths ({sorted(set(width.tolist()))[:4]} bytes)")
        offset_type = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
        offsets = np.frombuffer(blobs.buffers()[1], offset_type)[blobs.offset:blobs.offset + len(blobs) + 1]
        data = np.frombuffer(blobs.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    else:
        if any(b is None for b in blobs):
            raise ValueError("a feature blob is null")
        if not blobs:
            return np.zeros((0, 0), np.float32)
        if len({len(b) for b in blobs}) > 1:
            raise ValueError(f"feature blobs of different lengths ({sorted({len(b) for b in blobs})[:4]} bytes)")
        data = np.frombuffer(b"".join(blobs), np.uint8)
    return data.view(FEATURE_DTYPE).reshape(len(blobs), -1).astype(np.float32)


def read_features(con: duckdb.DuckDBPyConnection, backbone: str,
                  rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The stored features of ``rows`` (a table with bucket, key, etag) under ``backbone``, on a
    connection with the lake attached as ``lake``: (features (N, D) float32 aligned to ``rows``, zeros
    where none is stored; found (N,) bool). One read of the table, whatever N."""
    wanted = pa.table({"_i": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
                       "bucket": rows["bucket"], "key": rows["key"], "etag": rows["etag"]})
    con.register("_hashlake_wanted", wanted)
    try:
        got = con.execute(f"""
            SELECT w._i, f.feature FROM _hashlake_wanted AS w
            JOIN (SELECT bucket, key, etag, feature FROM {LAKE}.features WHERE backbone = $backbone) AS f
              ON f.bucket = w.bucket AND f.key = w.key AND f.etag = w.etag
            QUALIFY row_number() OVER (PARTITION BY w._i) = 1
            ORDER BY w._i""", {"backbone": backbone}).to_arrow_table()
    finally:
        con.unregister("_hashlake_wanted")
    found = np.zeros(rows.num_rows, bool)
    index = got["_i"].to_numpy()
    found[index] = True
    values = decode_features(got["feature"])
    out = np.zeros((rows.num_rows, values.shape[1]), np.float32)
    out[index] = values
    return out, found


def features_of_current_codes_sql(model_version: str, at: int | None = None) -> str:
    """A SELECT (parameter ``$backbone``) of ``model_version``'s current code rows (``rules.current_codes_sql``:
    deletes and newer versions applied), each with its stored ``feature`` blob under the backbone, NULL
    when none is stored (an image encoded with ``keep_features`` off, or before the table existed: it
    has to be read again). ``at``: read every table at that lake snapshot instead of the current one."""
    version = "'" + model_version.replace("'", "''") + "'"
    snapshot = f" AT (VERSION => {int(at)})" if at is not None else ""

    def table(name: str) -> str:
        return f"(SELECT * FROM {LAKE}.{name}{snapshot})"

    current = current_codes_sql(f"(SELECT * FROM {table('codes')} WHERE model = {version})", table("deletes"))
    return f"""
        SELECT c.*, f.feature FROM ({current}) AS c
        LEFT JOIN (SELECT bucket, key, etag, feature, encoded_at FROM {table('features')}
                   WHERE backbone = $backbone) AS f
          ON f.bucket = c.bucket AND f.key = c.key AND f.etag = c.etag
        QUALIFY row_number() OVER (PARTITION BY c.bucket, c.key ORDER BY f.encoded_at NULLS LAST) = 1"""


def features_of_current_codes(con: duckdb.DuckDBPyConnection, model_version: str, backbone: str) -> pa.Table:
    """``features_of_current_codes_sql`` run on ``con``: an Arrow table of the code columns plus ``feature``
    (``decode_features`` on its non-null values gives (N, D) float32)."""
    return con.execute(features_of_current_codes_sql(model_version), {"backbone": backbone}).to_arrow_table()
