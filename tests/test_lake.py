"""The lake under concurrency, against real PostgreSQL and S3: writers in several processes commit without
loss or conflict, compaction while writes and queries run loses and doubles nothing and fails no query,
and after compaction a table of N rows has a handful of files."""
from __future__ import annotations

import multiprocessing
import threading
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from hashlake import sql
from hashlake.lake import init_lake
from hashlake.lake.maintenance import compact
from hashlake.lake.schema import CODES_SCHEMA
from hashlake.lake.writer import LakeWriter
from workers.messages import ObjectRef

VERSION = "v1"
BATCH = 32
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)


def batch_rows(writer: int, batch: int) -> pa.Table:
    return pa.Table.from_pylist(
        [{"bucket": "images", "key": f"w{writer}/b{batch}/{i}.jpg", "etag": f"e{writer}-{batch}-{i}", "version_id": None,
          "size": 1, "last_modified": NOW, "mtime_ns": 1, "code": (writer * 1000 + batch * BATCH + i).to_bytes(8, "big"),
          "model": VERSION, "encoded_at": NOW, "labels": ["x"], "batch_id": f"{writer}-{batch}"} for i in range(BATCH)],
        schema=CODES_SCHEMA)


def commit_batches(settings, writer: int, batches: int) -> None:
    lake = LakeWriter(settings)
    for b in range(batches):
        lake.commit(batch_rows(writer, b), None)
    lake.close()


@pytest.fixture
def lake(settings, store):
    init_lake(settings)
    return settings


def test_writers_in_three_processes_commit_every_batch_once(lake):
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, as a worker process has
    procs = [context.Process(target=commit_batches, args=(lake, w, 20)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    con = sql.connect(lake, model_version=VERSION)
    assert con.sql("SELECT count(*), count(DISTINCT key) FROM codes").fetchone() == (3 * 20 * BATCH,) * 2
    assert con.sql("SELECT count(*) FROM lake.codes").fetchone()[0] == 3 * 20 * BATCH


def test_compaction_while_writing_and_querying_loses_and_doubles_nothing(lake):
    writer = LakeWriter(lake)
    errors: list[BaseException] = []
    done = threading.Event()
    seen: list[int] = []

    def query() -> None:
        con = sql.connect(lake, model_version=VERSION)
        try:
            while not done.is_set():
                sql.refresh(con)
                count, distinct = con.sql("SELECT count(*), count(DISTINCT key) FROM codes").fetchone()
                assert count == distinct
                assert con.sql("SELECT count(*) FROM lake.codes").fetchone()[0] >= count
                seen.append(count)
        except BaseException as exc:
            errors.append(exc)

    def maintain() -> None:
        try:
            while not done.is_set():
                compact(lake)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=query), threading.Thread(target=maintain)]
    for t in threads:
        t.start()
    try:
        for b in range(40):
            writer.commit(batch_rows(0, b), None)
            if b == 20:
                writer.commit(batch_rows(0, 3), None)  # a batch delivered twice adds nothing
    finally:
        done.set()
        for t in threads:
            t.join(120)
    assert errors == []
    assert seen == sorted(seen) and len(seen) > 1  # a reader's count only ever grows
    summary = compact(lake)
    con = sql.connect(lake, model_version=VERSION)
    assert con.sql("SELECT count(*), count(DISTINCT key) FROM codes").fetchone() == (40 * BATCH, 40 * BATCH)
    assert con.sql("SELECT count(*) FROM lake.codes").fetchone()[0] == 40 * BATCH
    # 41 commits of 32 rows: after compaction one file holds them (the target file size is far above)
    assert summary.files_after["codes"] == 1


def test_a_batch_written_out_by_compaction_is_still_known_and_not_doubled(lake):
    """The duplicate checks name the batch's lowest order so that the catalog skips older data files:
    a batch whose rows compaction moved from the catalog into a data file is found there all the same."""
    writer = LakeWriter(lake)
    base = batch_rows(7, 0)
    rows = base.set_column(base.schema.get_field_index("mtime_ns"), CODES_SCHEMA.field("mtime_ns"),
                           pa.array([5_000_000_000 + i * 1_000_000 for i in range(BATCH)], pa.int64()))
    writer.commit(rows, None)
    assert compact(lake).files_after["codes"] == 1
    refs = [ObjectRef(r["bucket"], r["key"], r["etag"], mtime_ns=r["mtime_ns"]) for r in rows.to_pylist()]
    every = {(r.bucket, r.key, r.etag) for r in refs}
    assert writer.known(VERSION, refs) == every
    # an older event of the same versions, or one without an order, is known too; a later upload of the
    # same bytes (after a delete) is a new version
    assert writer.known(VERSION, [replace(r, mtime_ns=r.mtime_ns - 3_000_000) for r in refs]) == every
    assert writer.known(VERSION, [replace(r, mtime_ns=None) for r in refs]) == every
    assert writer.known(VERSION, [replace(r, mtime_ns=r.mtime_ns + 60 * 10**9) for r in refs]) == set()
    writer.commit(rows, None)  # delivered again after compaction: adds nothing
    writer.close()
    con = sql.connect(lake, model_version=VERSION)
    assert con.sql("SELECT count(*) FROM lake.codes").fetchone()[0] == BATCH
