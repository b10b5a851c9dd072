"""Exactness of hashlake.index search: knn and within equal brute force (hamming_reference) on random
snapshots — every code length, several segments, hidden rows, duplicate codes, ties, k beyond the
table, radius 0 and full — through each path: multi-index hashing, flat scan, and the automatic choice."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashing_models.codes import SUPPORTED_BITS, hamming_reference
from hashlake.index import knn, within
from hashlake.index.mih import MultiIndexHash, plan
from hashlake.index.snapshot import Segment, Snapshot, radius_profile
from hashlake.native import loader

PATHS = ("auto", "mih", "flat")


def identity(keys: list[str]) -> pa.Table:
    n = len(keys)
    stamp = pa.array([0] * n, pa.timestamp("us", tz="UTC"))
    return pa.table({"bucket": pa.array(["b" if i % 3 else "a" for i in range(n)], pa.string()),
                     "key": pa.array(keys, pa.string()), "etag": pa.array(["e"] * n, pa.string()),
                     "last_modified": stamp, "encoded_at": stamp})


def segment(codes: np.ndarray, keys: list[str], tables: int | None) -> Segment:
    """A segment with tables even when small (Segment.build only indexes large ones)."""
    seg = Segment.build(codes, identity(keys))
    if tables is None or codes.shape[0] == 0:
        return seg
    _, key_bits = plan(codes.shape[1] * 8, max(codes.shape[0], 2))
    key_bits = max(1, min(key_bits, codes.shape[1] * 8 // tables))
    return Segment(seg.codes, seg.columns, MultiIndexHash(seg.codes, tables, key_bits), radius_profile(seg.codes))


@st.composite
def snapshots(draw, path: str):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    nbytes = bits // 8
    sizes = draw(st.lists(st.integers(1, 120), min_size=0, max_size=3))
    # a small pool of codes makes duplicates and ties at the cut frequent
    pool_size = draw(st.sampled_from([2, 7, 1000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = rng.integers(0, 256, (pool_size, nbytes), dtype=np.uint8)
    segments, hidden, offset = [], [], 0
    for size in sizes:
        codes = pool[rng.integers(0, pool_size, size)]
        keys = [f"k{offset + i:05d}" for i in range(size)]
        offset += size
        tables = None if path == "flat" else draw(st.integers(1, 4))
        segments.append(segment(codes, keys, tables))
        hide = rng.random(size) < draw(st.sampled_from([0.0, 0.2, 0.9]))
        hidden.append(np.flatnonzero(hide).astype(np.int64))
    queries = np.concatenate([pool[rng.integers(0, pool_size, 2)], rng.integers(0, 256, (1, nbytes), dtype=np.uint8)])
    return Snapshot(model_version="v", bits=bits, segments=tuple(segments), hidden=tuple(hidden)), queries


def brute_force(snapshot: Snapshot, query: np.ndarray) -> list[tuple[int, str, str]]:
    """Every visible row as (distance, bucket, key), in the stated order."""
    rows = []
    for seg, hid in zip(snapshot.segments, snapshot.hidden):
        d = hamming_reference(query[None], seg.codes)[0]
        visible = np.setdiff1d(np.arange(seg.rows), hid)
        buckets, keys = seg.columns.column("bucket").to_pylist(), seg.columns.column("key").to_pylist()
        rows += [(int(d[i]), buckets[i], keys[i]) for i in visible]
    return sorted(rows)


def as_rows(table: pa.Table) -> list[tuple[int, str, str]]:
    return list(zip(table.column("distance").to_pylist(), table.column("bucket").to_pylist(),
                    table.column("key").to_pylist()))


@contextmanager
def forced(path: str):
    """Pin the extension's method; "auto" leaves the choice to its cost model."""
    loader.force_method({"auto": loader.AUTO, "mih": loader.ALWAYS_MIH, "flat": loader.ALWAYS_FLAT}[path])
    try:
        yield
    finally:
        loader.force_method(loader.AUTO)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_knn_equals_brute_force(path, data):
    snapshot, queries = data.draw(snapshots(path))
    k = data.draw(st.integers(1, snapshot.rows + 5))
    with forced(path):
        got = knn(snapshot, queries, k)
    for q, table in zip(queries, got):
        assert as_rows(table) == brute_force(snapshot, q)[:k]


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_within_equals_brute_force(path, data):
    snapshot, queries = data.draw(snapshots(path))
    radius = data.draw(st.one_of(st.just(0), st.integers(0, snapshot.bits), st.just(snapshot.bits)))
    with forced(path):
        got = within(snapshot, queries, radius)
    for q, table in zip(queries, got):
        assert as_rows(table) == [r for r in brute_force(snapshot, q) if r[0] <= radius]


def test_empty_snapshot_returns_nothing():
    empty = Snapshot(model_version="v", bits=64)
    q = np.zeros((1, 8), np.uint8)
    assert knn(empty, q, 10)[0].num_rows == 0
    assert within(empty, q, 3)[0].num_rows == 0


def test_bad_k_and_radius_are_refused():
    snap = Snapshot(model_version="v", bits=16, segments=(segment(np.zeros((3, 2), np.uint8), ["a", "b", "c"], None),),
                    hidden=(np.zeros(0, np.int64),))
    with pytest.raises(ValueError, match="k must be at least 1"):
        knn(snap, np.zeros((1, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="radius must be at least 0"):
        within(snap, np.zeros((1, 2), np.uint8), -1)


def test_large_segment_chooses_mih_and_stays_exact():
    """A segment big enough for real tables: near-duplicate queries take the MIH path, random ones
    fall back to the scan; both exact. (The choice is observable only through timing, so this
    checks answers on a realistic size rather than the path.)"""
    rng = np.random.default_rng(3)
    n = 120_000
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    seg = Segment.build(codes, identity([f"k{i:06d}" for i in range(n)]))
    assert seg.mih is not None and seg.radius_profile is not None
    snap = Snapshot(model_version="v", bits=64, segments=(seg,), hidden=(np.arange(0, n, 1000, dtype=np.int64),))
    near = codes[5].copy()
    near[0] ^= 0b101  # two bits away from row 5
    queries = np.stack([near, rng.integers(0, 256, 8, dtype=np.uint8)])
    ref = hamming_reference(queries, codes)
    ref[:, snap.hidden[0]] = 10**6
    for j, table in enumerate(knn(snap, queries, 10)):
        assert table.column("distance").to_pylist() == sorted(ref[j])[:10]
    for j, table in enumerate(within(snap, queries, 4)):
        assert sorted(table.column("distance").to_pylist()) == sorted(int(d) for d in ref[j] if d <= 4)


def test_mih_memory_and_plan():
    tables, key_bits = plan(64, 10_000_000)
    assert tables == 3 and key_bits <= 24
    codes = np.random.default_rng(0).integers(0, 256, (1000, 8), dtype=np.uint8)
    mih = MultiIndexHash(codes, 3, 10)
    assert mih.nbytes == 3 * (4 * 1000 + 4 * (2**10 + 1))
