"""CodeIndex loading and refresh from shards in a folder: the visibility rule (newest version per key,
tombstones, duplicates), incremental refresh, rewritten shards, compaction and merging of segments,
and sharing one index per process."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest

from hashlake.index import CodeIndex, FolderSource, knn, shared_index
from hashlake.index import code_index
from hashlake.shards import (TOMBSTONES_SCHEMA, ShardMeta, build_codes_table, codes_path, to_parquet_bytes,
                             tombstones_path)

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
VERSION = "v1"


def write_codes(root: Path, batch: str, rows: list[tuple[str, str, int, int]], bits: int = 16,
                version: str = VERSION) -> None:
    """rows: (key, etag, minutes after T0 for last_modified, code as int)."""
    dicts = [dict(key=k, bucket="images", etag=e, size=1, last_modified=T0 + timedelta(minutes=m),
                  encoded_at=T0 + timedelta(hours=1), labels=None) for k, e, m, _ in rows]
    codes = np.array([[(c >> (8 * (bits // 8 - 1 - i))) & 0xFF for i in range(bits // 8)] for *_, c in rows],
                     np.uint8).reshape(len(rows), bits // 8)
    path = root / codes_path(version, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_parquet_bytes(build_codes_table(dicts, codes, ShardMeta(version, bits, "test"))))


def write_tombstones(root: Path, batch: str, rows: list[tuple[str, int]]) -> None:
    table = pa.table({"key": [k for k, _ in rows], "bucket": ["images"] * len(rows),
                      "deleted_at": [T0 + timedelta(minutes=m) for _, m in rows]}, schema=TOMBSTONES_SCHEMA)
    path = root / tombstones_path(batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_parquet_bytes(table))


def visible(index: CodeIndex) -> dict[str, str]:
    """key → etag of every visible row, read back through a search that returns everything."""
    snap = index.snapshot
    if not snap.segments:
        return {}
    table = knn(snap, np.zeros((1, snap.bits // 8), np.uint8), 10**6)[0]
    return dict(zip(table.column("key").to_pylist(), table.column("etag").to_pylist()))


def test_newest_version_wins_and_tombstones_hide(tmp_path):
    write_codes(tmp_path, "a", [("x", "x1", 1, 1), ("y", "y1", 1, 2), ("z", "z1", 1, 3)])
    index = CodeIndex(FolderSource(tmp_path), VERSION)
    index.refresh()
    assert visible(index) == {"x": "x1", "y": "y1", "z": "z1"}

    write_codes(tmp_path, "b", [("x", "x2", 5, 4), ("y", "y0", 0, 5)])  # x overwritten; y: an older version
    write_tombstones(tmp_path, "t1", [("z", 2)])  # z deleted after its only version
    snap = index.refresh()
    assert visible(index) == {"x": "x2", "y": "y1"}
    assert snap.rows == 2 and len(snap.segments) == 2

    write_tombstones(tmp_path, "t2", [("x", 3)])  # older than x2: hides nothing
    write_codes(tmp_path, "c", [("z", "z0", 1, 6)])  # a late shard of z's deleted version stays hidden
    index.refresh()
    assert visible(index) == {"x": "x2", "y": "y1"}


def test_duplicates_collapse_and_refresh_without_news_keeps_snapshot(tmp_path):
    write_codes(tmp_path, "a", [("x", "x1", 1, 1), ("x", "x1", 1, 1)])
    write_codes(tmp_path, "b", [("x", "x1", 1, 1)])
    index = CodeIndex(FolderSource(tmp_path), VERSION)
    snap = index.refresh()
    assert snap.rows == 1
    assert index.refresh() is snap


def test_rewritten_shard_rebuilds(tmp_path):
    write_codes(tmp_path, "a", [("x", "x1", 1, 1)])
    index = CodeIndex(FolderSource(tmp_path), VERSION)
    index.refresh()
    write_codes(tmp_path, "a", [("q", "q1", 1, 1), ("r", "r1", 1, 7)])  # same name, new content
    index.refresh()
    assert visible(index) == {"q": "q1", "r": "r1"}


def test_wrong_bits_and_wrong_folder_are_named(tmp_path):
    write_codes(tmp_path, "a", [("x", "x1", 1, 1)], bits=16)
    write_codes(tmp_path, "b", [("y", "y1", 1, 1)], bits=32)
    with pytest.raises(ValueError, match=r"b\.parquet holds 32-bit codes but this index holds 16-bit"):
        CodeIndex(FolderSource(tmp_path), VERSION).refresh()
    write_codes(tmp_path / "other", "c", [("y", "y1", 1, 1)], version="v2")
    (tmp_path / "other" / "codes" / "v2").rename(tmp_path / "other" / "codes" / "v3")
    with pytest.raises(ValueError, match="holds model version 'v2', not 'v3'"):
        CodeIndex(FolderSource(tmp_path / "other"), "v3").refresh()


def test_compaction_and_merging_keep_answers(tmp_path):
    with mock.patch.object(code_index, "MAX_HIDDEN", 2), mock.patch.object(code_index, "MAX_SEGMENTS", 2):
        index = CodeIndex(FolderSource(tmp_path), VERSION)
        write_codes(tmp_path, "a", [(f"k{i}", "e1", 1, i) for i in range(10)])
        index.refresh()
        for step in range(4):  # each refresh overwrites two keys and adds a segment
            write_codes(tmp_path, f"b{step}", [(f"k{2 * step}", f"e{step + 2}", 5 + step, 100 + step),
                                               (f"k{2 * step + 1}", f"e{step + 2}", 5 + step, 200 + step)])
            snap = index.refresh()
            assert len(snap.segments) <= 2
            assert all(len(h) <= 2 for h in snap.hidden)
    expected = {f"k{i}": "e1" for i in range(10)}
    for step in range(4):
        expected[f"k{2 * step}"] = expected[f"k{2 * step + 1}"] = f"e{step + 2}"
    assert visible(index) == expected


def test_empty_folder_and_shared_index(tmp_path):
    source = FolderSource(tmp_path)
    index = shared_index(source, "nothing-here")
    assert index is shared_index(FolderSource(tmp_path), "nothing-here")
    assert index.refresh().rows == 0 and index.snapshot.bits is None
