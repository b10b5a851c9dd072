"""The in-memory form of one model version's codes: immutable segments and the snapshot that lists them.

A segment holds the rows loaded from the lake in one refresh: their codes as one C-contiguous
(n, bits/8) uint8 matrix (the only in-memory copy of those codes: 1.0× their packed size), their other
columns as Arrow columns (the identity: bucket, key, etag, last_modified, encoded_at; and size and
labels, which ``search_rows`` returns), and, when large enough, its multi-index hash tables. Rows
hidden later (a newer version of the key arrived, or a tombstone) are listed per segment in the
snapshot instead of being cut out, so segments never change; a refresh builds a new snapshot and swaps
it in one assignment, and queries running on the old one finish undisturbed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from hashlake.index.lake_source import DETAIL_COLUMNS
from hashlake.index.mih import MultiIndexHash, plan
from hashlake.lake.rules import IDENTITY_COLUMNS

# Below this many rows a flat scan costs < 0.2 ms, less than probing tables would.
MIH_MIN_ROWS = 100_000
# The radius profile compares this many sample codes with this many others: 16M pairs resolve
# fractions down to ~1e-7, below k/n for k=10 at 10M rows; ~0.1 s per segment build.
PROFILE_QUERIES = 256
PROFILE_ROWS = 65_536


_ORDER_COLUMNS = {"version_id": pa.string(), "mtime_ns": pa.int64()}


@dataclass(frozen=True, eq=False)
class Segment:
    codes: np.ndarray  # (n, bits/8) uint8, C-contiguous
    columns: pa.Table  # n rows of IDENTITY_COLUMNS, then those of DETAIL_COLUMNS given; one chunk per column
    mih: MultiIndexHash | None  # None below MIH_MIN_ROWS
    # (bits + 1,) float64: fraction of pairs of codes within each radius, estimated from a sample;
    # how search guesses the k-NN radius before probing. None without tables.
    radius_profile: np.ndarray | None = None

    @classmethod
    def build(cls, codes: np.ndarray, columns: pa.Table) -> "Segment":
        if codes.shape[0] != columns.num_rows:
            raise ValueError(f"segment has {codes.shape[0]} codes but {columns.num_rows} rows of columns")
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        mih = profile = None
        if codes.shape[0] >= MIH_MIN_ROWS:
            mih = MultiIndexHash(codes, *plan(codes.shape[1] * 8, codes.shape[0]))
            profile = radius_profile(codes)
        for name, kind in _ORDER_COLUMNS.items():  # rows made without a lake (tests' synthetic ones): unknown
            if name not in columns.column_names:
                columns = columns.append_column(name, pa.nulls(columns.num_rows, kind))
        names = [*IDENTITY_COLUMNS, *(c for c in DETAIL_COLUMNS if c in columns.column_names)]
        return cls(codes, columns.select(names).combine_chunks(), mih, profile)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def without(self, hidden: np.ndarray) -> "Segment":
        """A new segment without the rows at ``hidden`` (compaction)."""
        keep = np.ones(self.rows, bool)
        keep[hidden] = False
        return Segment.build(self.codes[keep], self.columns.filter(pa.array(keep)))


def radius_profile(codes: np.ndarray) -> np.ndarray:
    """Cumulative fraction of (code, other code) pairs within each radius 0..bits, from disjoint samples."""
    n, nbytes = codes.shape
    picks = np.random.default_rng(0).permutation(n)
    queries = codes[picks[:PROFILE_QUERIES]]
    rows = codes[np.sort(picks[PROFILE_QUERIES:PROFILE_QUERIES + PROFILE_ROWS])]
    counts = np.zeros(nbytes * 8 + 1, np.int64)
    for q in queries:
        counts += np.bincount(distances(rows, q), minlength=counts.size)
    return np.cumsum(counts) / max(1, counts.sum())


def word_view(codes: np.ndarray) -> np.ndarray:
    """(n, B) uint8 codes → a zero-copy (n, W) view in the widest unsigned word that divides B bytes
    (popcount of XOR is the same whatever the word width; wider words mean fewer numpy ops)."""
    nbytes = codes.shape[1]
    for dtype in (np.uint64, np.uint32, np.uint16):
        if nbytes % np.dtype(dtype).itemsize == 0:
            return codes.view(dtype)
    return codes


def distances(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distances (n,) int32 of every row of ``codes`` (n, B) to one ``query`` (B,) uint8."""
    if codes.shape[0] == 0:
        return np.zeros(0, np.int32)
    words = word_view(codes)
    q = word_view(query.reshape(1, -1))
    return np.bitwise_count(words ^ q).sum(axis=1, dtype=np.int32)


def empty_hidden() -> np.ndarray:
    return np.zeros(0, np.int64)


def empty_deletes() -> pa.Table:
    return pa.table({"bucket": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                     "version_id": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                     "mtime_ns": pa.array([], pa.int64())})


@dataclass(frozen=True, eq=False)
class Snapshot:
    model_version: str
    bits: int | None  # None until the first shard (or the model card) tells
    segments: tuple[Segment, ...] = ()
    hidden: tuple[np.ndarray, ...] = ()  # per segment: sorted int64 row positions no longer visible
    lake_snapshot: int | None = None  # the lake snapshot these segments hold; None: nothing loaded yet
    deletes: pa.Table = field(default_factory=empty_deletes)  # every delete row up to lake_snapshot

    @property
    def rows(self) -> int:
        """Visible rows: what the ``codes`` view shows for this snapshot."""
        return sum(s.rows - len(h) for s, h in zip(self.segments, self.hidden))

    @cached_property
    def visible_rows(self) -> pa.Table:
        """The visible rows as one Arrow table (the ``codes`` view): the segments' columns and their codes
        as fixed-size binary over the code matrices (no copy), hidden rows left out."""
        width = self.bits or 8
        schema = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                            ("version_id", pa.string()), ("size", pa.int64()),
                            ("last_modified", pa.timestamp("us", tz="UTC")), ("code", pa.binary(width // 8)),
                            ("encoded_at", pa.timestamp("us", tz="UTC")), ("labels", pa.list_(pa.string()))])
        parts = []
        for segment, hidden in zip(self.segments, self.hidden):
            codes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width // 8), segment.rows,
                                                         [None, pa.py_buffer(segment.codes)])
            columns = {name: (segment.columns.column(name) if name in segment.columns.column_names
                              else pa.nulls(segment.rows, schema.field(name).type)) for name in schema.names
                       if name != "code"}
            table = pa.table({**columns, "code": codes}).select(schema.names).cast(schema)
            if hidden.size:
                keep = np.ones(segment.rows, bool)
                keep[hidden] = False
                table = table.filter(pa.array(keep))
            parts.append(table)
        return pa.concat_tables(parts) if parts else schema.empty_table()

    @property
    def nbytes(self) -> int | None:
        return None if self.bits is None else self.bits // 8

    def memory(self) -> dict[str, int]:
        """Bytes held, by part: packed codes, hash tables, the other columns, hidden-row lists, and the
        delete rows a refresh applies the rule with. Cheap: buffer sizes, nothing is scanned."""
        return {
            "codes": sum(s.codes.nbytes for s in self.segments),
            "mih": sum(s.mih.nbytes for s in self.segments if s.mih is not None),
            "columns": sum(s.columns.nbytes for s in self.segments),
            "hidden": sum(h.nbytes for h in self.hidden),
            "deletes": self.deletes.nbytes,
        }
