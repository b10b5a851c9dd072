"""CodeIndex loading from the lake and refreshing from its change feed: the current-rows rule (newest
version per key at full precision, deletes of keys, of versions and of vanished versions, duplicates),
incremental refresh equal to a fresh load (also across compaction), segment compaction and merging,
one shared index per process, and the bound on a lake read that does not return (a catalog table locked
in PostgreSQL)."""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest

from hashlake import query_metrics
from hashlake.index import CodeIndex, LakeSource, knn, shared_index
from hashlake.index import code_index
from hashlake.index.lake_source import LakeReadStalled
from hashlake.lake import init_lake
from hashlake.lake.catalog_db import connect_catalog
from hashlake.lake.maintenance import compact
from hashlake.lake.schema import CODES_SCHEMA, DELETES_SCHEMA
from hashlake.lake.writer import LakeWriter

VERSION = "v1"
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SECOND = 1_000_000_000  # ns
BASE = 1_790_000_000 * SECOND  # an mtime_ns in 2026


@pytest.fixture
def lake(settings, store):  # store: the buckets exist
    init_lake(settings)
    writer = LakeWriter(settings)
    yield writer
    writer.close()


def write_codes(lake: LakeWriter, rows: list[tuple], bits: int = 16, version: str = VERSION) -> None:
    """rows: (key, etag, mtime_ns, code as int[, version_id])."""
    lake.commit(pa.Table.from_pylist([
        {"bucket": "images", "key": r[0], "etag": r[1], "version_id": r[4] if len(r) > 4 else None, "size": 1,
         "last_modified": T0, "mtime_ns": r[2], "code": int(r[3]).to_bytes(bits // 8, "big"), "model": version,
         "encoded_at": T0, "labels": None, "batch_id": "b"} for r in rows], schema=CODES_SCHEMA), None)


def write_deletes(lake: LakeWriter, rows: list[tuple]) -> None:
    """rows: (key, mtime_ns[, version_id[, etag]])."""
    lake.commit_deletes(pa.Table.from_pylist([
        {"bucket": "images", "key": r[0], "version_id": r[2] if len(r) > 2 else None,
         "etag": r[3] if len(r) > 3 else None, "mtime_ns": r[1], "deleted_at": T0, "batch_id": "d"} for r in rows],
        schema=DELETES_SCHEMA))


def visible(index: CodeIndex) -> dict[str, str]:
    """key → etag of every visible row, read back through a search that returns everything."""
    snap = index.snapshot
    if not snap.segments:
        return {}
    table = knn(snap, np.zeros((1, snap.bits // 8), np.uint8), 10**6)[0]
    return dict(zip(table.column("key").to_pylist(), table.column("etag").to_pylist()))


def fresh(settings, version: str = VERSION) -> dict[str, str]:
    index = CodeIndex(LakeSource(settings), version)
    index.refresh()
    return visible(index)


def test_newest_version_wins_and_deletes_hide(settings, lake):
    write_codes(lake, [("x", "x1", BASE + 1, 1), ("y", "y1", BASE + 1, 2), ("z", "z1", BASE + 1, 3)])
    index = CodeIndex(LakeSource(settings), VERSION)
    index.refresh()
    assert visible(index) == {"x": "x1", "y": "y1", "z": "z1"}

    write_codes(lake, [("x", "x2", BASE + 5, 4), ("y", "y0", BASE, 5)])  # x overwritten; y: an older version
    write_deletes(lake, [("z", BASE + 2)])  # z deleted after its only version
    snap = index.refresh()
    assert visible(index) == {"x": "x2", "y": "y1"}
    assert snap.rows == 2

    write_deletes(lake, [("x", BASE + 3)])  # older than x2: hides nothing
    write_codes(lake, [("z", "z0", BASE + 1, 6)])  # a late row of z's deleted version stays hidden
    index.refresh()
    assert visible(index) == {"x": "x2", "y": "y1"}
    assert fresh(settings) == visible(index)


def test_within_one_second_order_is_kept_at_full_precision(settings, lake):
    # delete then re-upload 300 ms later, in the same second: the new upload is current
    write_codes(lake, [("cat", "c1", BASE + 100_000_000, 1)])
    index = CodeIndex(LakeSource(settings), VERSION)
    index.refresh()
    write_deletes(lake, [("cat", BASE + 200_000_000)])
    write_codes(lake, [("cat", "c2", BASE + 500_000_000, 2)])
    index.refresh()
    assert visible(index) == {"cat": "c2"}
    # two overwrites within one second, the newer bytes encoded first: the newest bytes win
    write_codes(lake, [("dog", "d3", BASE + 900_000_000, 3)])
    index.refresh()
    write_codes(lake, [("dog", "d2", BASE + 600_000_000, 4)])
    index.refresh()
    assert visible(index) == {"cat": "c2", "dog": "d3"}
    assert fresh(settings) == visible(index)


def test_an_event_arriving_after_a_later_one_does_not_win(settings, lake):
    index = CodeIndex(LakeSource(settings), VERSION)
    write_codes(lake, [("a", "a2", BASE + 20, 1)])
    write_deletes(lake, [("b", BASE + 30)])
    index.refresh()
    write_codes(lake, [("a", "a1", BASE + 10, 2), ("b", "b1", BASE + 25, 3)])  # late: older than what came first
    index.refresh()
    assert visible(index) == {"a": "a2"}


def test_a_delete_of_one_version_leaves_the_live_object(settings, lake):
    write_codes(lake, [("v", "e1", BASE + 1, 1, "ver-1")])
    index = CodeIndex(LakeSource(settings), VERSION)
    index.refresh()
    write_codes(lake, [("v", "e2", BASE + 2, 2, "ver-2")])
    index.refresh()
    write_deletes(lake, [("v", BASE + 3, "ver-1")])  # the non-current version removed: the live one stays
    index.refresh()
    assert visible(index) == {"v": "e2"}
    write_codes(lake, [("w", "w1", BASE + 1, 3, "ver-a"), ("w", "w2", BASE + 2, 4, "ver-b")])
    index.refresh()
    write_deletes(lake, [("w", BASE + 3, "ver-b")])  # the current version removed: the older one is current again
    index.refresh()
    assert visible(index) == {"v": "e2", "w": "w1"}
    assert fresh(settings) == visible(index)


def test_a_reconciler_delete_hides_the_vanished_version_and_not_a_later_upload(settings, lake):
    # moto lists whole seconds: the re-upload has the same order as the vanished version, another etag
    write_codes(lake, [("k", "old", BASE, 1)])
    write_deletes(lake, [("k", BASE, None, "old")])
    write_codes(lake, [("k", "new", BASE, 2)])
    assert fresh(settings) == {"k": "new"}


def test_duplicates_collapse_and_refresh_without_news_keeps_snapshot(settings, lake):
    write_codes(lake, [("x", "x1", BASE + 1, 1), ("x", "x1", BASE + 1, 1)])
    index = CodeIndex(LakeSource(settings), VERSION)
    snap = index.refresh()
    assert snap.rows == 1
    assert index.refresh() is snap


def test_refresh_across_compaction_equals_a_fresh_load(settings, lake):
    index = CodeIndex(LakeSource(settings), VERSION)
    for step in range(6):
        write_codes(lake, [(f"k{i}", f"e{step}", BASE + step, step * 10 + i) for i in range(step, step + 5)])
        if step == 3:
            write_deletes(lake, [("k1", BASE + 3)])
            compact(settings)  # flushes the inlined rows into files, merges them
        index.refresh()
    assert visible(index) == fresh(settings)
    assert len(visible(index)) == 9 and "k1" not in visible(index)


def test_wrong_bits_are_named(settings, lake):
    write_codes(lake, [("x", "x1", BASE, 1)], bits=16)
    index = CodeIndex(LakeSource(settings), VERSION)
    index.refresh()
    write_codes(lake, [("y", "y1", BASE, 1)], bits=32)
    with pytest.raises(ValueError, match="have 32 to 32 bits but this index holds 16-bit codes"):
        index.refresh()


def test_compaction_and_merging_keep_answers(settings, lake):
    with mock.patch.object(code_index, "MAX_HIDDEN", 2), mock.patch.object(code_index, "MAX_SEGMENTS", 2):
        index = CodeIndex(LakeSource(settings), VERSION)
        write_codes(lake, [(f"k{i}", "e1", BASE + 1, i) for i in range(10)])
        index.refresh()
        for step in range(4):  # each refresh overwrites two keys and adds a segment
            write_codes(lake, [(f"k{2 * step}", f"e{step + 2}", BASE + 5 + step, 100 + step),
                               (f"k{2 * step + 1}", f"e{step + 2}", BASE + 5 + step, 200 + step)])
            snap = index.refresh()
            assert len(snap.segments) <= 2
            assert all(len(h) <= 2 for h in snap.hidden)
    expected = {f"k{i}": "e1" for i in range(10)}
    for step in range(4):
        expected[f"k{2 * step}"] = expected[f"k{2 * step + 1}"] = f"e{step + 2}"
    assert visible(index) == expected


def test_time_travel_reads_an_earlier_snapshot(settings, lake):
    write_codes(lake, [("a", "a1", BASE, 1)])
    source = LakeSource(settings)
    before = source.current_snapshot()
    write_codes(lake, [("b", "b1", BASE, 2)])
    assert source.codes(VERSION, before).column("key").to_pylist() == ["a"]
    assert sorted(source.codes(VERSION, source.current_snapshot()).column("key").to_pylist()) == ["a", "b"]


def test_empty_lake_and_shared_index(settings, lake):
    index = shared_index(LakeSource(settings), "nothing-here")
    assert index is shared_index(LakeSource(settings), "nothing-here")
    assert index.refresh().rows == 0 and index.snapshot.bits is None


class CatalogLock:
    """An ACCESS EXCLUSIVE lock on the catalog's inlined-rows tables, held by a PostgreSQL session of
    its own: every lake read of those rows waits on it inside PostgreSQL, a statement that does not
    return until ``release`` (at the latest ``safety_s`` later, so that a broken bound fails the test
    instead of hanging it)."""

    def __init__(self, settings, safety_s: float = 60.0):
        self.conn = connect_catalog(settings)
        tables = [r[0] for r in self.conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ducklake_inlined_data_%'").fetchall()]
        assert tables, "the test's rows are inlined in the catalog"
        self.conn.execute("BEGIN")
        self.conn.execute("LOCK TABLE " + ", ".join(f'"{t}"' for t in tables) + " IN ACCESS EXCLUSIVE MODE")
        self._released = threading.Event()
        self._safety = threading.Timer(safety_s, self.release)
        self._safety.start()

    def release(self) -> None:
        if not self._released.is_set():
            self._released.set()
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self._safety.cancel()


def test_a_stalled_change_read_is_abandoned_and_the_refresh_loads_afresh(settings, lake):
    settings = settings.model_copy(update={"index_refresh_timeout_s": 3.0})
    write_codes(lake, [(f"k{i}", "e1", BASE, i) for i in range(5)])
    index = CodeIndex(LakeSource(settings), VERSION)
    index.refresh()
    write_codes(lake, [("k1", "e2", BASE + 1, 11), ("k9", "e1", BASE, 9)])
    lock = CatalogLock(settings)

    class ReleaseOnFallback(logging.Handler):  # the fresh load may read once the change read is given up
        def emit(self, record):
            if "loading afresh" in record.getMessage():
                threading.Timer(0.5, lock.release).start()
    handler = ReleaseOnFallback(logging.WARNING)
    code_index.log.addHandler(handler)
    stalled_before = query_metrics.LOADS.labels("stalled")._value.get()
    started = time.monotonic()
    try:
        snap = index.refresh()
    finally:
        code_index.log.removeHandler(handler)
        lock.release()
    elapsed = time.monotonic() - started
    assert query_metrics.LOADS.labels("stalled")._value.get() == stalled_before + 1
    assert 3.0 <= elapsed < 30, elapsed  # waited for the bound, not for the lock's safety release
    assert snap.rows == 6 and visible(index) == fresh(settings)
    assert visible(index)["k1"] == "e2"


def test_a_refresh_whose_load_stalls_too_keeps_its_snapshot(settings, lake, caplog):
    settings = settings.model_copy(update={"index_refresh_timeout_s": 2.0, "index_load_timeout_s": 2.0})
    write_codes(lake, [("a", "a1", BASE, 1)])
    index = CodeIndex(LakeSource(settings), VERSION)
    held = index.refresh()
    write_codes(lake, [("b", "b1", BASE, 2)])
    lock = CatalogLock(settings)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(LakeReadStalled, match="did not return within 2 s"):
            index.refresh()
    finally:
        lock.release()
    assert time.monotonic() - started < 30  # two bounded reads (and their interrupts), not the lock
    assert "changes since snapshot" in caplog.text and "postgresql://" in caplog.text  # what, and where
    assert index.snapshot is held and visible(index) == {"a": "a1"}  # still served
    index.refresh()  # the lock is gone: the next refresh catches up
    assert visible(index) == {"a": "a1", "b": "b1"} == fresh(settings)
