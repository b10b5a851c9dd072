"""Loading the extension into DuckDB connections, publishing snapshots to it, and reading its counters.

A snapshot's buffers stay in Python (numpy codes, Arrow identity columns, MIH tables); the
extension gets pointers to them. ``publish(snapshot)`` hands them over once per snapshot (cached);
``pin(con, snapshot)`` makes it the one that connection's database searches. When the snapshot is
garbage-collected (no connection holds it and its index has moved on) it is forgotten; its buffers
are kept until the extension says no running call still reads them.

ctypes and DuckDB load the same file, so the process holds one copy of the library and both see
its registry of snapshots, and the search latency its SQL functions count (``search_latency``).
"""
from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hashlake.index.snapshot import Segment, Snapshot
from hashlake.native.build import ensure_built

MAX_TABLES = 4  # HL_MAX_TABLES in src/hashlake.h


class _Strings(ctypes.Structure):
    _fields_ = [("offsets", ctypes.c_void_p), ("data", ctypes.c_void_p)]


class _Validity(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_void_p), ("offset", ctypes.c_int64)]


class _Int64s(ctypes.Structure):
    _fields_ = [("values", ctypes.c_void_p), ("valid", _Validity)]


class _StringLists(ctypes.Structure):
    _fields_ = [("offsets", ctypes.c_void_p), ("valid", _Validity), ("items", _Strings)]


class _Segment(ctypes.Structure):
    """hl_segment in src/hashlake.h: keep the two in step."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("codes", ctypes.c_void_p),
        ("hidden", ctypes.c_void_p),
        ("n_hidden", ctypes.c_int64),
        ("bucket", _Strings),
        ("key", _Strings),
        ("etag", _Strings),
        ("tables", ctypes.c_int32),
        ("starts", ctypes.c_int32 * MAX_TABLES),
        ("key_bits", ctypes.c_int32 * MAX_TABLES),
        ("table_offsets", ctypes.c_void_p * MAX_TABLES),
        ("table_rows", ctypes.c_void_p * MAX_TABLES),
        ("radius_profile", ctypes.c_void_p),
        ("size", _Int64s),
        ("last_modified", _Int64s),
        ("encoded_at", _Int64s),
        ("labels", _StringLists),
        ("tie_rank", ctypes.c_void_p),
    ]


_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = ctypes.CDLL(str(ensure_built()))
            lib.hashlake_publish.restype = ctypes.c_int64
            lib.hashlake_publish.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_Segment), ctypes.c_char_p]
            lib.hashlake_forget.restype = ctypes.c_int32
            lib.hashlake_forget.argtypes = [ctypes.c_int64]
            lib.hashlake_pin.restype = ctypes.c_int32
            lib.hashlake_pin.argtypes = [ctypes.c_int64, ctypes.c_int64]
            lib.hashlake_force_method.argtypes = [ctypes.c_int32]
            lib.hashlake_uses_avx512.restype = ctypes.c_int32
            lib.hashlake_threads.restype = ctypes.c_int32
            lib.hashlake_cgroup_cpus.restype = ctypes.c_double
            lib.hashlake_cgroup_cpus.argtypes = [ctypes.c_char_p]
            lib.hashlake_pool_spins.restype = ctypes.c_int64
            lib.hashlake_latency_bounds.restype = ctypes.c_int32
            lib.hashlake_latency_bounds.argtypes = [ctypes.c_void_p]
            lib.hashlake_latency_function.restype = ctypes.c_char_p
            lib.hashlake_latency_function.argtypes = [ctypes.c_int32]
            lib.hashlake_latency_read.restype = ctypes.c_int32
            lib.hashlake_latency_read.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
            _LIB = lib
        return _LIB


def connect(config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the extension's functions loaded: the table functions
    search(query, k) / within(query, radius) and the list forms hashlake_search_list /
    hashlake_within_list, all reading the snapshot pinned with ``pin``."""
    path = ensure_built()
    _library()  # ctypes first: the registry must exist before any snapshot id is handed out
    con = duckdb.connect(config={**(config or {}), "allow_unsigned_extensions": True})
    con.execute(f"LOAD '{path}'")
    return con


def uses_avx512() -> bool:
    """Whether the flat scan of 64-bit codes runs on AVX-512 VPOPCNTDQ on this CPU."""
    return bool(_library().hashlake_uses_avx512())


def threads() -> int:
    """Threads the extension splits work over: the CPU affinity mask's count, capped by the cgroup quota."""
    return int(_library().hashlake_threads())


def cgroup_cpus(root: str = "") -> float:
    """The tightest cgroup CPU quota (v2 cpu.max, v1 cfs quota/period) over this process's cgroup and
    its ancestors, in cpus; 0 when none is set. ``root`` prefixes every path read (tests)."""
    return float(_library().hashlake_cgroup_cpus(root.encode()))


@dataclass(frozen=True)
class Latency:
    """One SQL function's search latency histogram, as src/metrics.c counts it since the library loaded."""

    function: str  # search | within | search_rows | within_rows | search_list | within_list
    bounds: tuple[float, ...]  # upper bounds of the buckets, seconds
    cumulative: tuple[int, ...]  # queries at or under each bound, then all of them (+Inf)
    sum_s: float  # their latencies added up, seconds


def search_latency() -> list[Latency]:
    """Every SQL function's latency histogram; empty while the library is not loaded in this process
    (then nothing has searched, and reading never builds or loads it)."""
    lib = _LIB
    if lib is None:
        return []
    n = lib.hashlake_latency_bounds(None)
    bounds = (ctypes.c_double * n)()
    lib.hashlake_latency_bounds(bounds)
    out = []
    for function in itertools.count():
        name = lib.hashlake_latency_function(function)
        if name is None:
            return out
        counts, total = (ctypes.c_uint64 * (n + 1))(), ctypes.c_double()
        lib.hashlake_latency_read(function, counts, ctypes.byref(total))
        out.append(Latency(name.decode(), tuple(bounds), tuple(counts), total.value))


# For tests of exactness, to pin the method that would otherwise be chosen by cost: every answer
# must be the same whichever runs.
AUTO, ALWAYS_MIH, ALWAYS_FLAT = 0, 1, 2


def force_method(method: int) -> None:
    _library().hashlake_force_method(method)


@dataclass(eq=False)
class Publication:
    id: int
    keep: list  # every buffer the extension points into


_PUBLISHED: "weakref.WeakKeyDictionary[Snapshot, Publication]" = weakref.WeakKeyDictionary()
_RETIRED: list[Publication] = []  # forgotten by Python, maybe still read by a running call


def publish(snapshot: Snapshot) -> int:
    """The extension's id for ``snapshot``, publishing it on first use."""
    with _LOCK:
        _sweep()
        found = _PUBLISHED.get(snapshot)
        if found is not None:
            return found.id
    lib = _library()
    keep: list = []
    segments = (_Segment * max(1, len(snapshot.segments)))()
    for i, (segment, hidden) in enumerate(zip(snapshot.segments, snapshot.hidden)):
        segments[i] = _describe(segment, hidden, keep)
    pub_id = lib.hashlake_publish(snapshot.nbytes or 0, len(snapshot.segments), segments,
                                  snapshot.model_version.encode())
    if pub_id < 0:
        raise MemoryError("hashlake_hamming: cannot publish a snapshot (out of memory)")
    publication = Publication(pub_id, keep)
    with _LOCK:
        _PUBLISHED[snapshot] = publication
    weakref.finalize(snapshot, _retire, publication)
    return pub_id


def pin(con: duckdb.DuckDBPyConnection, snapshot: Snapshot) -> None:
    """Make ``snapshot`` the one ``con``'s database searches. The caller holds the snapshot for as
    long as it stays pinned (the pin itself does not keep it alive)."""
    snapshot_id = publish(snapshot)
    slot = con.execute("SELECT hashlake_slot()").fetchone()[0]
    if _library().hashlake_pin(slot, snapshot_id) != 0:
        raise RuntimeError(f"hashlake_hamming: unknown slot {slot}")


def _retire(publication: Publication) -> None:
    with _LOCK:
        _RETIRED.append(publication)
        _sweep()


def _sweep() -> None:
    """Drop the buffers of retired snapshots that no running call reads any more (under _LOCK)."""
    lib = _LIB
    if lib is None:
        return
    _RETIRED[:] = [p for p in _RETIRED if lib.hashlake_forget(p.id) == 0]


def _describe(segment: Segment, hidden: np.ndarray, keep: list) -> _Segment:
    """The extension's view of ``segment`` with ``hidden`` rows: the segment's own part is described
    once (segments never change) and copied, so a refresh describes only its new segment and the hidden
    lists (describing a 1M-row segment's columns again took half of a +1% refresh)."""
    view = _segment_view(segment)
    desc = _Segment.from_buffer_copy(view.desc)
    hidden = np.ascontiguousarray(hidden, dtype=np.int64)
    keep += view.keep
    keep.append(hidden)
    desc.hidden = hidden.ctypes.data
    desc.n_hidden = hidden.size
    return desc


@dataclass(frozen=True)
class _SegmentView:
    """A segment as the extension sees it, hidden rows aside: made once per segment (segments never change)."""

    desc: _Segment
    keep: list  # every buffer ``desc`` points into
    tie_ranks: np.ndarray  # (rows,) uint32, also in ``keep``: what ``tie_rank_bytes`` counts


_VIEWS: "weakref.WeakKeyDictionary[Segment, _SegmentView]" = weakref.WeakKeyDictionary()


def _segment_view(segment: Segment) -> _SegmentView:
    with _LOCK:
        found = _VIEWS.get(segment)
    if found is not None:
        return found
    desc, keep = _Segment(), []
    codes = np.ascontiguousarray(segment.codes)
    keep.append(codes)
    desc.rows = segment.rows
    desc.codes = codes.ctypes.data
    columns = segment.columns
    for name in ("bucket", "key", "etag"):
        setattr(desc, name, _strings(columns.column(name), keep))
    for name in ("size", "last_modified", "encoded_at"):
        if name in columns.column_names:  # absent: search_rows answers NULL
            setattr(desc, name, _int64s(columns.column(name), keep))
    if "labels" in columns.column_names:
        desc.labels = _string_lists(columns.column("labels"), keep)
    mih = segment.mih
    if mih is not None:
        if mih.tables > MAX_TABLES:
            raise ValueError(f"a segment has {mih.tables} hash tables; the extension takes at most {MAX_TABLES}")
        desc.tables = mih.tables
        for t in range(mih.tables):
            offsets = np.ascontiguousarray(mih.offsets[t], dtype=np.int32)
            order = np.ascontiguousarray(mih.order[t], dtype=np.uint32)
            keep += [offsets, order]
            desc.starts[t], desc.key_bits[t] = mih.starts[t], mih.key_bits[t]
            desc.table_offsets[t], desc.table_rows[t] = offsets.ctypes.data, order.ctypes.data
    ranks = tie_ranks(segment)
    keep.append(ranks)
    desc.tie_rank = ranks.ctypes.data
    if segment.radius_profile is not None:
        profile = np.ascontiguousarray(segment.radius_profile, dtype=np.float64)
        keep.append(profile)
        desc.radius_profile = profile.ctypes.data
    view = _SegmentView(desc, keep, ranks)
    with _LOCK:
        _VIEWS[segment] = view
    return view


def tie_ranks(segment: Segment) -> np.ndarray:
    """(rows,) uint32: each row's position in the segment's (bucket, key) order, bytewise as DuckDB orders
    VARCHAR. With it a k-NN drops rows tied at the k-th distance by one integer compare instead of
    keeping them all for a sort by strings (a million identical codes). ~0.4 s per million rows of random
    keys here; ``_segment_view`` keeps them with the segment's view."""
    if segment.rows >= 2**32:
        raise ValueError(f"a segment holds {segment.rows} rows; the extension takes fewer than 2**32")
    order = pc.sort_indices(segment.columns.select(["bucket", "key"]),
                            sort_keys=[("bucket", "ascending"), ("key", "ascending")]).to_numpy()
    ranks = np.empty(segment.rows, np.uint32)
    ranks[order] = np.arange(segment.rows, dtype=np.uint32)
    return ranks


def tie_rank_bytes(snapshot: Snapshot) -> int:
    """Bytes of the tie ranks held for ``snapshot``'s segments (4 per row of each published segment)."""
    with _LOCK:
        return sum(view.tie_ranks.nbytes for s in snapshot.segments if (view := _VIEWS.get(s)) is not None)


_EMPTY = np.zeros(1, np.uint8)  # a valid address for the data of a column of empty strings


def _strings(column: pa.ChunkedArray, keep: list) -> _Strings:
    """A utf8 column → pointers to its int32 offsets (at the array's offset) and its character data."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type != pa.string():
        array = array.cast(pa.string())
    if array.null_count:
        raise ValueError("bucket, key, etag and label items never hold nulls")
    keep.append(array)
    _, offsets, data = array.buffers()
    return _Strings(offsets.address + 4 * array.offset, data.address if data is not None and data.size else _EMPTY.ctypes.data)


def _validity(array: pa.Array) -> _Validity:
    bitmap = array.buffers()[0]
    return _Validity(bitmap.address if array.null_count and bitmap is not None else None, array.offset)


def _int64s(column: pa.ChunkedArray, keep: list) -> _Int64s:
    """An int64 or timestamp(us) column → a pointer to its values (at the array's offset) and its nulls."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_timestamp(array.type) and array.type.unit != "us":
        array = array.cast(pa.timestamp("us", tz=array.type.tz))
    elif not (pa.types.is_timestamp(array.type) or array.type == pa.int64()):
        array = array.cast(pa.int64())
    keep.append(array)
    values = array.buffers()[1]
    if values is None:  # no rows: nothing will be read
        return _Int64s()
    return _Int64s(values.address + 8 * array.offset, _validity(array))


def _string_lists(column: pa.ChunkedArray, keep: list) -> _StringLists:
    """A list<string> column → pointers to its int32 list offsets (at the array's offset), its nulls,
    and its items (which never hold nulls)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(array.type) and array.type.value_type == pa.string()):
        array = array.cast(pa.list_(pa.string()))
    keep.append(array)
    offsets = array.buffers()[1]
    if offsets is None:  # no rows: nothing will be read
        return _StringLists()
    return _StringLists(offsets.address + 4 * array.offset, _validity(array), _strings(array.values, keep))