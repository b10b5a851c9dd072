"""Loads one model version's shards into memory and keeps them current: ``CodeIndex.refresh()``.

The shards in the store stay the source of truth; the in-memory form is rebuilt from them:
- a refresh lists ``codes/<model_version>/`` and ``tombstones/``, reads only the shards not yet
  loaded (in parallel: they are independent GETs), and turns them into one new segment;
- the visibility rule (``visibility.py``, the same SQL as the ``codes`` view) runs on the new rows
  plus the old visible rows sharing a key with them or with a new tombstone; old rows that lose
  are added to their segment's hidden list, new rows that lose never enter memory;
- a shard rewritten or removed since it was loaded (a changed fingerprint) makes the refresh start
  over from an empty index, since its old rows cannot be told apart from the others;
- segments with many hidden rows are compacted, and past MAX_SEGMENTS the smaller segments are
  merged, so a query touches few segments whatever the refresh history.

One ``CodeIndex`` per (source, model version) is shared by every connection of the process
(``shared_index``); refreshes are serialized by a lock, queries never wait on it.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hashlake.index.snapshot import DETAIL_COLUMNS, TOMBSTONE_COLUMNS, Segment, Snapshot, empty_hidden
from hashlake.index.source import ShardFile, ShardSource
from hashlake.index.visibility import IDENTITY_COLUMNS, visible_rows_sql
from hashlake.shards import CODES_PREFIX, TOMBSTONES_PREFIX, ShardMeta

log = logging.getLogger(__name__)

MAX_SEGMENTS = 8  # past this, all but the largest segment are merged into one
# A hidden row costs every k-NN query one extra candidate; past this many a segment is compacted.
MAX_HIDDEN = 1024
READ_THREADS = 8  # concurrent shard GETs: I/O bound, not CPU bound


class CodeIndex:
    def __init__(self, source: ShardSource, model_version: str, *, bits: int | None = None):
        self.source = source
        self.model_version = model_version
        self.snapshot = Snapshot(model_version=model_version, bits=bits)
        self._lock = threading.Lock()

    def refresh(self) -> Snapshot:
        """Load shards that arrived since the last refresh; return (and publish) the new snapshot."""
        with self._lock:
            old = self.snapshot
            code_files = self.source.list(f"{CODES_PREFIX}{self.model_version}/")
            tomb_files = self.source.list(TOMBSTONES_PREFIX)
            if _rewritten(old.code_files, code_files) or _rewritten(old.tombstone_files, tomb_files):
                log.warning("shards of %s were rewritten or removed since loaded: rebuilding the index",
                            self.model_version)
                old = Snapshot(model_version=self.model_version, bits=old.bits)
            new_codes = _not_loaded(old.code_files, code_files)
            new_tombs = _not_loaded(old.tombstone_files, tomb_files)
            if new_codes or new_tombs:
                self.snapshot = _compact(self._add(old, new_codes, new_tombs))
            return self.snapshot

    def _add(self, old: Snapshot, code_files: list[ShardFile], tomb_files: list[ShardFile]) -> Snapshot:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            code_tables = list(pool.map(lambda f: self._read_codes(f, old.bits), code_files))
            tomb_tables = list(pool.map(lambda f: self.source.read(f.name, list(TOMBSTONE_COLUMNS)), tomb_files))
        bits = old.bits if old.bits is not None else (code_tables[0][1] if code_tables else None)
        for file, (_, shard_bits, _) in zip(code_files, code_tables):
            if shard_bits != bits:
                raise ValueError(f"shard {file.name} holds {shard_bits}-bit codes but this index holds "
                                 f"{bits}-bit codes (from {code_files[0].name})")
        tombstones = pa.concat_tables([old.tombstones, *[t.cast(old.tombstones.schema) for t in tomb_tables]])
        if code_tables:
            columns = pa.concat_tables([t for t, _, _ in code_tables]).combine_chunks()
            codes = np.concatenate([c for _, _, c in code_tables]) if len(code_tables) > 1 else code_tables[0][2]
        else:
            columns, codes = None, np.zeros((0, (bits or 8) // 8), np.uint8)
        segments, hidden, keep_new = _apply_visibility(old, columns, tomb_tables, tombstones)
        if columns is not None and keep_new.size:
            if keep_new.size < columns.num_rows:  # else keep every row, without a copy
                codes, columns = codes[keep_new], columns.take(pa.array(keep_new))
            segments.append(Segment.build(codes, columns))
            hidden.append(empty_hidden())
        return Snapshot(model_version=self.model_version, bits=bits, segments=tuple(segments),
                        hidden=tuple(hidden), code_files=tuple(sorted({*old.code_files, *code_files}, key=_name)),
                        tombstone_files=tuple(sorted({*old.tombstone_files, *tomb_files}, key=_name)),
                        tombstones=tombstones)

    def _read_codes(self, file: ShardFile, bits: int | None) -> tuple[pa.Table, int, np.ndarray]:
        """One codes shard → (its other columns, bits, codes (n, bits/8) uint8)."""
        table = self.source.read(file.name, [*IDENTITY_COLUMNS, *DETAIL_COLUMNS, "code"])
        meta = ShardMeta.from_kv(table.schema.metadata)
        if meta.model_version != self.model_version:
            raise ValueError(f"shard {file.name} holds model version {meta.model_version!r}, "
                             f"not {self.model_version!r}: it is in the wrong folder")
        if bits is not None and meta.bits != bits:
            raise ValueError(f"shard {file.name} holds {meta.bits}-bit codes but this index holds {bits}-bit codes")
        return table.drop_columns(["code"]), meta.bits, _code_matrix(table.column("code"), meta.bits // 8)


def _code_matrix(column: pa.ChunkedArray, nbytes: int) -> np.ndarray:
    """fixed_size_binary(nbytes) column → (n, nbytes) uint8, read straight from the Arrow buffers."""
    parts = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError("a codes shard has null codes; the shard writer never writes them")
        data = chunk.buffers()[1]
        parts.append(np.frombuffer(data, np.uint8, count=len(chunk) * nbytes,
                                   offset=chunk.offset * nbytes).reshape(-1, nbytes))
    if not parts:
        return np.zeros((0, nbytes), np.uint8)
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def _apply_visibility(old: Snapshot, identity: pa.Table | None, new_tombs: list[pa.Table],
                      tombstones: pa.Table) -> tuple[list[Segment], list[np.ndarray], np.ndarray]:
    """Run the visibility rule on the rows a refresh can change. Returns the old segments, their
    updated hidden lists, and the positions of the new rows that are visible."""
    segments, hidden = list(old.segments), list(old.hidden)
    touched = [t.column("key") for t in new_tombs]
    if identity is not None:
        touched.append(identity.column("key"))
    if not touched:
        return segments, hidden, np.zeros(0, np.int64)
    keys = pc.unique(pa.chunked_array(touched, pa.string()).combine_chunks()) if segments else None
    parts = []
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
    # Only rows whose key occurs twice or has a tombstone can lose; the rule runs on those alone
    # (a full window over 10M new rows took most of a first load).
    contested = ("(SELECT c.* FROM candidates AS c SEMI JOIN (SELECT key FROM candidates GROUP BY key "
                 "HAVING count(*) > 1 UNION SELECT key FROM tombstones) AS k USING (key))")
    # among exact duplicates the row loaded first stays: no churn when a shard is re-read
    winners = visible_rows_sql("contested", "tombstones", ", _seg, _pos")
    with duckdb.connect() as con:
        con.register("candidates", candidates)
        con.register("tombstones", tombstones)
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
                    code_files=snapshot.code_files, tombstone_files=snapshot.tombstone_files,
                    tombstones=snapshot.tombstones)


def _name(file: ShardFile) -> str:
    return file.name


def _rewritten(loaded: tuple[ShardFile, ...], listed: list[ShardFile]) -> bool:
    current = {f.name: f.fingerprint for f in listed}
    return any(current.get(f.name) != f.fingerprint for f in loaded)


def _not_loaded(loaded: tuple[ShardFile, ...], listed: list[ShardFile]) -> list[ShardFile]:
    names = {f.name for f in loaded}
    return [f for f in listed if f.name not in names]


_SHARED: dict[tuple[str, str], CodeIndex] = {}
_SHARED_LOCK = threading.Lock()


def shared_index(source: ShardSource, model_version: str, *, bits: int | None = None) -> CodeIndex:
    """The process's one ``CodeIndex`` for (source, model version), created on first use."""
    key = (source.describe(), model_version)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = CodeIndex(source, model_version, bits=bits)
        return _SHARED[key]
