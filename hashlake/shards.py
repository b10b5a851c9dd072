"""The shard format: Parquet files of codes, failures and tombstones, and where each lives.

Layout in the index bucket (``Settings.index_bucket``), the same under a local folder:

    codes/<model_version>/<batch_id>.parquet      one row per encoded image
    failures/<model_version>/<batch_id>.parquet   one row per image that could not be encoded
    tombstones/<batch_id>.parquet                 one row per deleted object

``batch_id`` is derived from the batch's content (``batch_id_for``), so a retried task writes the
same names and replaces its own output instead of adding a second copy.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import hashlake
from hashing_models.codes import as_code_matrix, check_bits

CODES_PREFIX = "codes/"
FAILURES_PREFIX = "failures/"
TOMBSTONES_PREFIX = "tombstones/"
BIT_ORDER = "msb0"  # bit i of a code = bit (7 - i % 8) of byte i // 8, as numpy.packbits

_TS = pa.timestamp("us", tz="UTC")


def codes_schema(bits: int, *, with_embedding: bool = False) -> pa.Schema:
    check_bits(bits)
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("last_modified", _TS),  # the object's, from the store: orders versions of a key
        pa.field("code", pa.binary(bits // 8), nullable=False),  # packed bits, see hashing_models.codes
        pa.field("model", pa.string(), nullable=False),
        pa.field("encoded_at", _TS, nullable=False),
        pa.field("labels", pa.list_(pa.string())),  # from the object's x-amz-meta-labels, comma-separated
    ]
    if with_embedding:
        fields.append(pa.field("embedding", pa.list_(pa.float16())))  # for re-ranking
    return pa.schema(fields)


FAILURES_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("etag", pa.string()),
    pa.field("reason", pa.string(), nullable=False),  # a short class: not_an_image, truncated, too_large, ...
    pa.field("detail", pa.string()),  # the error message, for a person
    pa.field("model", pa.string(), nullable=False),
    pa.field("failed_at", _TS, nullable=False),
])

TOMBSTONES_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),
    pa.field("deleted_at", _TS, nullable=False),  # hides versions whose last_modified is not later
])


@dataclass(frozen=True)
class ShardMeta:
    """File-level metadata of a codes shard (Parquet key-value metadata, all strings)."""

    model_version: str
    bits: int
    backbone: str
    bit_order: str = BIT_ORDER
    hashlake_version: str = hashlake.__version__

    def to_kv(self) -> dict[bytes, bytes]:
        return {f"hashlake.{k}".encode(): str(v).encode() for k, v in self.__dict__.items()}

    @classmethod
    def from_kv(cls, kv: dict[bytes, bytes] | None) -> "ShardMeta":
        kv = {k.decode(): v.decode() for k, v in (kv or {}).items()}
        try:
            return cls(
                model_version=kv["hashlake.model_version"],
                bits=int(kv["hashlake.bits"]),
                backbone=kv["hashlake.backbone"],
                bit_order=kv["hashlake.bit_order"],
                hashlake_version=kv["hashlake.hashlake_version"],
            )
        except KeyError as exc:
            raise ValueError(f"not a hashlake codes shard: file metadata lacks {exc.args[0]}") from None


def batch_id_for(objects: Iterable[tuple[str, str, str]]) -> str:
    """A stable id for a batch of (bucket, key, etag): same set, same id, whatever the order."""
    digest = hashlib.sha256()
    for bucket, key, etag in sorted(set(objects)):
        digest.update(f"{bucket}\0{key}\0{etag}\n".encode())
    return digest.hexdigest()[:24]


def codes_path(model_version: str, batch_id: str) -> str:
    return f"{CODES_PREFIX}{model_version}/{batch_id}.parquet"


def failures_path(model_version: str, batch_id: str) -> str:
    return f"{FAILURES_PREFIX}{model_version}/{batch_id}.parquet"


def tombstones_path(batch_id: str) -> str:
    return f"{TOMBSTONES_PREFIX}{batch_id}.parquet"


def build_codes_table(rows: Sequence[dict], codes: np.ndarray, meta: ShardMeta,
                      embeddings: np.ndarray | None = None) -> pa.Table:
    """Rows (dicts with key, bucket, etag, size, last_modified, encoded_at, labels) + packed codes
    (N, bits/8) → a codes table carrying ``meta`` as file metadata."""
    codes = as_code_matrix(codes, meta.bits // 8) if len(rows) else np.zeros((0, meta.bits // 8), np.uint8)
    if codes.shape[0] != len(rows):
        raise ValueError(f"{len(rows)} rows but {codes.shape[0]} codes")
    schema = codes_schema(meta.bits, with_embedding=embeddings is not None)
    columns = {name: [r.get(name) for r in rows] for name in ("key", "bucket", "etag", "size", "last_modified",
                                                              "encoded_at", "labels")}
    columns["model"] = [meta.model_version] * len(rows)
    columns["code"] = [c.tobytes() for c in codes]
    if embeddings is not None:
        columns["embedding"] = [e.astype(np.float16) for e in embeddings]
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    return table.replace_schema_metadata(meta.to_kv())


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_parquet_bytes(body: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(body), columns=columns)
