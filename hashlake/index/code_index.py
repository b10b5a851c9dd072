"""Loads one model version's codes from the lake into memory and keeps them current: ``CodeIndex.refresh()``.

The lake stays the source of truth; the in-memory form is built from it:
- the first refresh reads the version's codes rows and every delete row at one lake snapshot;
- a later refresh reads only what was committed since the snapshot it holds (the lake's change feed:
  ``ducklake_table_insertions``) and turns the new rows into one new segment;
- the rule of ``hashlake.lake.rules`` (newest version per key, deletes) runs on the new rows plus the
  old visible rows sharing a key with them or with a new delete; old rows that lose are added to
  their segment's hidden list, new rows that lose never enter memory. A delete of one version of a
  versioned bucket can make an older version current again, so the keys it names are re-read;
- when the held snapshot has been expired by compaction, or the change read stalls past
  ``Settings.index_refresh_timeout_s`` (``lake_source``), the refresh loads afresh; when that load stalls
  too, the refresh raises and the index keeps serving the snapshot it had;
- segments with many hidden rows are compacted, and past MAX_SEGMENTS the smaller segments are
  merged, so a query touches few segments whatever the refresh history.

One ``CodeIndex`` per (lake, model version) is shared by every connection of the process
(``shared_index``); refreshes are serialized by a lock, queries never wait on it.
"""
from __future__ import annotations

import logging
import threading
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hashlake import query_metrics
from hashlake.index.lake_source import LakeReadStalled, LakeSource, SnapshotGone
from hashlake.index.snapshot import Segment, Snapshot, empty_hidden
from hashlake.lake.rules import IDENTITY_COLUMNS, current_codes_sql

log = logging.getLogger(__name__)

MAX_SEGMENTS = 8  # past this, all but the largest segment are merged into one
# A hidden row costs every k-NN query one extra candidate; past this many a segment is compacted.
MAX_HIDDEN = 1024


class CodeIndex:
    def __init__(self, source: LakeSource, model_version: str, *, bits: int | None = None):
        self.source = source
        self.model_version = model_version
        self.snapshot = Snapshot(model_version=model_version, bits=bits)
        self._lock = threading.Lock()

    def refresh(self) -> Snapshot:
        """Load what the lake committed since the last refresh; return (and publish) the new snapshot.
        A refresh that reads something is timed for ``hashlake.query_metrics``; one that finds the lake
        unchanged is not."""
        with self._lock:
            started = time.monotonic()
            old = self.snapshot
            target = self.source.current_snapshot()
            if old.lake_snapshot == target:
                return old
            load = None  # why the whole version is read: first | expired | stalled; None: only the changes
            new = None
            if old.lake_snapshot is None:
                load = "first"
            else:
                try:
                    codes, deletes = self.source.changes(self.model_version, old.lake_snapshot, target)
                    new = self._add(old, codes, deletes, target)
                except (SnapshotGone, LakeReadStalled) as exc:
                    load = "expired" if isinstance(exc, SnapshotGone) else "stalled"
                    log.warning("index of %s: changes since snapshot %s: %s; loading afresh", self.model_version,
                                old.lake_snapshot, exc)
                    old = Snapshot(model_version=self.model_version, bits=old.bits)
            if new is None:  # a stalled load raises LakeReadStalled: the index keeps serving what it had
                codes, deletes = self.source.codes(self.model_version, target), self.source.deletes(target)
                new = self._add(old, codes, deletes, target)
            self.snapshot = _compact(new)
            query_metrics.observe_refresh(time.monotonic() - started, load)
            return self.snapshot

    def _add(self, old: Snapshot, codes: pa.Table, new_deletes: pa.Table, at: int) -> Snapshot:
        versioned = new_deletes.filter(pc.is_valid(new_deletes.column("version_id")))
        if versioned.num_rows and old.segments:
            # a removed version may uncover an older one, which this index may have hidden: read the keys again
            keys = versioned.select(["bucket", "key"])
            codes = pa.concat_tables([codes, self.source.codes_of_keys(self.model_version, keys, at)])
        bits = _bits_of(codes, old.bits, self.model_version)
        matrix = _code_matrix(codes.column("code"), (bits or 8) // 8)
        columns = codes.drop_columns(["code"]).combine_chunks()
        deletes = pa.concat_tables([old.deletes, new_deletes.cast(old.deletes.schema)])
        segments, hidden, keep_new = _apply_rule(old, columns if columns.num_rows else None, new_deletes, deletes)
        if columns.num_rows and keep_new.size:
            if keep_new.size < columns.num_rows:  # else keep every row, without a copy
                matrix, columns = matrix[keep_new], columns.take(pa.array(keep_new))
            segments.append(Segment.build(matrix, columns))
            hidden.append(empty_hidden())
        return Snapshot(model_version=self.model_version, bits=bits, segments=tuple(segments),
                        hidden=tuple(hidden), lake_snapshot=at, deletes=deletes)


def _bits_of(codes: pa.Table, bits: int | None, model_version: str) -> int | None:
    """The code length of ``codes`` (all rows must agree with each other and with ``bits``)."""
    if not codes.num_rows:
        return bits
    lengths = pc.binary_length(codes.column("code"))
    low, high = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if low != high or (bits is not None and low * 8 != bits):
        raise ValueError(f"codes of model version {model_version!r} in the lake have {low * 8} to {high * 8} bits"
                         + (f" but this index holds {bits}-bit codes" if bits is not None else "")
                         + ": one model version writes one code length")
    return low * 8


def _code_matrix(column: pa.ChunkedArray, nbytes: int) -> np.ndarray:
    """A binary column of codes all ``nbytes`` long → (n, nbytes) uint8, from the Arrow buffers."""
    parts = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError("the lake holds a null code; the writer never writes one")
        if not len(chunk):
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int32 if chunk.type == pa.binary() else np.int64,
                                count=len(chunk) + 1, offset=chunk.offset * (4 if chunk.type == pa.binary() else 8))
        data = np.frombuffer(chunk.buffers()[2], np.uint8)
        parts.append(data[offsets[0]:offsets[-1]].reshape(-1, nbytes))
    if not parts:
        return np.zeros((0, nbytes), np.uint8)
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def _apply_rule(old: Snapshot, identity: pa.Table | None, new_deletes: pa.Table,
                deletes: pa.Table) -> tuple[list[Segment], list[np.ndarray], np.ndarray]:
    """Run the current-rows rule on the rows a refresh can change. Returns the old segments, their
    updated hidden lists, and the positions of the new rows that are visible."""
    segments, hidden = list(old.segments), list(old.hidden)
    if identity is None and not new_deletes.num_rows:
        return segments, hidden, np.zeros(0, np.int64)
    parts = []
    if segments:  # the old rows sharing a key with the refresh (a first load has none: no set of its 1M keys)
        touched = [new_deletes.column("key")] + ([identity.column("key")] if identity is not None else [])
        keys = pc.unique(pa.chunked_array(touched, pa.string()).combine_chunks())
        for s, (segment, seg_hidden) in enumerate(zip(segments, hidden)):
            mask = pc.is_in(segment.columns.column("key"), value_set=keys).to_numpy(zero_copy_only=False)
            mask[seg_hidden] = False
            rows = np.flatnonzero(mask)
            if rows.size:
                parts.append(_tagged(segment.columns.take(pa.array(rows)), s, rows))
    new_seg = len(segments)
    if identity is not None:
        parts.append(_tagged(identity, new_seg, np.arange(identity.num_rows)))
    if not parts:
        return segments, hidden, np.zeros(0, np.int64)
    candidates = pa.concat_tables(parts)
    # Only rows whose key occurs twice or has a delete can lose; the rule runs on those alone
    # (a full window over 10M new rows took most of a first load).
    contested = ("(SELECT c.* FROM candidates AS c SEMI JOIN (SELECT key FROM candidates GROUP BY key "
                 "HAVING count(*) > 1 UNION SELECT key FROM deletes) AS k USING (key))")
    # among exact duplicates the row loaded first stays: no churn when a row is read twice
    winners = current_codes_sql("contested", "deletes", ", _seg, _pos")
    with duckdb.connect() as con:
        con.register("candidates", candidates)
        con.register("deletes", deletes)
        con.execute(f"CREATE TEMP TABLE contested AS SELECT * FROM {contested}")
        lost = con.execute(f"SELECT _seg, _pos FROM contested EXCEPT SELECT _seg, _pos FROM ({winners})"
                           ).to_arrow_table()
    lost_seg = lost.column("_seg").to_numpy()
    lost_pos = lost.column("_pos").to_numpy().astype(np.int64)
    for s in np.unique(lost_seg[lost_seg < new_seg]):
        hidden[s] = np.union1d(hidden[s], lost_pos[lost_seg == s])
    if identity is None:
        return segments, hidden, np.zeros(0, np.int64)
    keep = np.ones(identity.num_rows, bool)
    keep[lost_pos[lost_seg == new_seg]] = False
    return segments, hidden, np.flatnonzero(keep)


def _tagged(identity: pa.Table, segment: int, rows: np.ndarray) -> pa.Table:
    return identity.select(list(IDENTITY_COLUMNS)).append_column(
        "_seg", pa.array(np.full(len(rows), segment, np.int32))).append_column("_pos", pa.array(rows.astype(np.int64)))


def _compact(snapshot: Snapshot) -> Snapshot:
    segments, hidden = list(snapshot.segments), list(snapshot.hidden)
    for i, (segment, seg_hidden) in enumerate(zip(segments, hidden)):
        if len(seg_hidden) > MAX_HIDDEN or (seg_hidden.size and seg_hidden.size * 2 >= segment.rows):
            segments[i], hidden[i] = segment.without(seg_hidden), empty_hidden()
    pairs = [(s, h) for s, h in zip(segments, hidden) if s.rows > len(h)]  # drop fully hidden segments
    if len(pairs) > MAX_SEGMENTS:
        largest = max(range(len(pairs)), key=lambda i: pairs[i][0].rows)
        small = [p for i, p in enumerate(pairs) if i != largest]
        keeps = [np.setdiff1d(np.arange(s.rows), h) for s, h in small]
        merged = Segment.build(np.concatenate([s.codes[k] for (s, _), k in zip(small, keeps)]),
                               pa.concat_tables([s.columns.take(pa.array(k)) for (s, _), k in zip(small, keeps)]))
        pairs = [pairs[largest], (merged, empty_hidden())]
    return Snapshot(model_version=snapshot.model_version, bits=snapshot.bits,
                    segments=tuple(s for s, _ in pairs), hidden=tuple(h for _, h in pairs),
                    lake_snapshot=snapshot.lake_snapshot, deletes=snapshot.deletes)


_SHARED: dict[tuple[str, str], CodeIndex] = {}
_SHARED_LOCK = threading.Lock()


def shared_index(source: LakeSource, model_version: str, *, bits: int | None = None) -> CodeIndex:
    """The process's one ``CodeIndex`` for (lake, model version), created on first use."""
    key = (source.describe(), model_version)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = CodeIndex(source, model_version, bits=bits)
        return _SHARED[key]


def shared_indexes() -> list[CodeIndex]:
    """Every ``CodeIndex`` ``shared_index`` has created in this process (what its metrics report)."""
    with _SHARED_LOCK:
        return list(_SHARED.values())
