"""The lake at scale: commits as the pipeline makes them, index load, change-feed refresh, count, search_rows,
and compaction, beside a single-file read of the same codes, in one run.

Starts its own PostgreSQL (the catalog, durable settings) and moto_server (the data files, in the index
bucket as the product keeps them), then:

  0. with ``--prefill P``: P images first, in blocks of ``Settings.reencode_block_rows`` rows per
     transaction (as a retraining's re-encode commits), so that the steps below run at P + N images
     without committing all of them 32 at a time (at ~100 commits/s that alone takes hours at 1M).
  1. commit: N images as the encode workers commit them: batches of 32 rows, each preceded by the
     workers' "what does this version already hold" query (``LakeWriter.known``), from two writer
     processes at once through ``hashlake.lake.writer``; compaction runs every ``--compact-every`` s
     meanwhile, as the stack's intake runs it. -> images/s
  2. compact once more; count the data files of the codes table.
  3. load: ``hashlake.sql.connect()`` builds the in-memory index from the lake, in a fresh process,
     timed beside pyarrow reading the same rows and columns from one Parquet file in the same bucket
     (one GET + ``pyarrow.parquet.read_table``). -> ratio
  4. refresh: 1% more images committed as in 1, then ``hashlake.sql.refresh`` on the open connection
     (the change feed since its snapshot). -> s
  5. ``SELECT count(*) FROM codes`` and ``SELECT key, distance, labels FROM search_rows('<hex>', 10)`` (the
     query benchmarks/hamming.py times), beside ``search`` (the engine alone) and ``search_rows`` with every
     column: medians of repeated runs. -> ms

    .venv/bin/python benchmarks/lake.py --images 1000000
    .venv/bin/python benchmarks/lake.py --images 20000 --compact-every 5     # a quick look
    .venv/bin/python benchmarks/lake.py --prefill 980000 --images 20000      # 1M, 20,000 of them as the pipeline

The RESULT lines come last.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashlake.config import Settings  # noqa: E402
from hashlake.lake.maintenance import compact  # noqa: E402
from hashlake.lake.schema import CODES_SCHEMA  # noqa: E402
from hashlake.lake.writer import LakeWriter  # noqa: E402
from private_lake import private_lake  # noqa: E402  (benchmarks/, this script's folder)
from workers.messages import ObjectRef  # noqa: E402

BATCH = 32  # Settings.batch_size's default: what one encode task commits (--batch to change)
VERSION = "bench-64"
BITS = 64
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch_table(start: int, n: int, codes: np.ndarray, batch: int = BATCH) -> pa.Table:
    """Rows start..start+n as an encode batch writes them (keys and etags as a bucket of JPEGs has)."""
    keys = [f"cifar/{LABELS[i % 10]}/{i:08d}.jpg" for i in range(start, start + n)]
    return pa.table({
        "bucket": ["images"] * n, "key": keys, "etag": [f"{i:032x}" for i in range(start, start + n)],
        "version_id": pa.nulls(n, pa.string()), "size": np.full(n, 2417, np.int64),
        "last_modified": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")),
        "mtime_ns": np.arange(start, start + n, dtype=np.int64) + 1_790_000_000_000_000_000,
        "code": pa.array([c.tobytes() for c in codes], pa.binary()), "model": [VERSION] * n,
        "encoded_at": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")), "labels": [[LABELS[i % 10]] for i in range(start, start + n)],
        "batch_id": [f"{i // batch:024x}" for i in range(start, start + n)]}, schema=CODES_SCHEMA)


def all_codes(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, BITS // 8), dtype=np.uint8)


def commit_range(settings: Settings, start: int, stop: int, codes_n: int, batch: int) -> None:
    """One writer process: batches of ``batch`` rows from start to stop, each after a ``known`` query."""
    codes = all_codes(codes_n)
    lake = LakeWriter(settings)
    for first in range(start, stop, batch):
        n = min(batch, stop - first)
        table = batch_table(first, n, codes[first:first + n], batch)
        refs = [ObjectRef("images", k, e, mtime_ns=m) for k, e, m in
                zip(table["key"].to_pylist(), table["etag"].to_pylist(), table["mtime_ns"].to_pylist())]
        lake.known(VERSION, refs)
        lake.commit(table, None)
    lake.close()


def prefill(settings: Settings, n: int, codes_n: int) -> float:
    """Rows 0..n in blocks of ``reencode_block_rows`` per transaction, one writer; return the wall seconds."""
    codes = all_codes(codes_n)
    lake = LakeWriter(settings)
    t0 = time.perf_counter()
    for first in range(0, n, settings.reencode_block_rows):
        rows = min(settings.reencode_block_rows, n - first)
        lake.commit(batch_table(first, rows, codes[first:first + rows]), None)
    lake.close()
    return time.perf_counter() - t0


def commit_with_writers(settings: Settings, start: int, stop: int, codes_n: int, batch: int = BATCH,
                        writers: int = 2) -> float:
    """Commit rows start..stop from ``writers`` processes at once; return the wall seconds."""
    context = multiprocessing.get_context("spawn")
    bounds = np.linspace(start, stop, writers + 1).astype(int) // batch * batch
    bounds[0] = start
    bounds[-1] = stop
    procs = [context.Process(target=commit_range, args=(settings, int(a), int(b), codes_n, batch))
             for a, b in zip(bounds[:-1], bounds[1:])]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a writer process exited with {p.exitcode}")
    return time.perf_counter() - t0


def load_in_fresh_process(settings: Settings, queue) -> None:
    from hashlake import sql

    t0 = time.perf_counter()
    con = sql.connect(settings, model_version=VERSION)
    queue.put((time.perf_counter() - t0, sql._state(con).snapshot.rows))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000, help="images committed 32 at a time")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per commit (an encode batch; "
                        "GPU workers run larger ones, Settings.batch_size)")
    parser.add_argument("--prefill", type=int, default=0, help="images committed before, in large blocks")
    parser.add_argument("--compact-every", type=float, default=60.0, help="s between compactions while committing")
    args = parser.parse_args()
    first = args.prefill
    n = first + args.images  # rows in the lake after step 1
    extra = max(args.batch, n // 100)

    with private_lake("hashlake-lake-bench-") as (settings, store):
        if first:
            print(f"prefill: {first} images in {prefill(settings, first, n + extra):.1f} s "
                  f"({settings.reencode_block_rows} per transaction)")
        # 1) commits, with compaction alongside as the stack runs it
        stop = threading.Event()
        compactions: list[float] = []

        def compactor() -> None:
            while not stop.wait(args.compact_every):
                compactions.append(compact(settings).seconds)
        thread = threading.Thread(target=compactor, daemon=True)
        thread.start()
        commit_s = commit_with_writers(settings, first, n, n + extra, args.batch)
        stop.set()
        thread.join()
        print(f"commit: {n - first} images on top of {first} in {commit_s:.1f} s from 2 writer processes, "
              f"{args.batch} per commit; "
              f"{len(compactions)} compactions meanwhile ({', '.join(f'{c:.1f}' for c in compactions)} s)")

        # 2) compaction
        summary = compact(settings)
        print(f"compaction: {summary}")

        # 3) load beside one Parquet file of the same rows and columns, in the same bucket
        from hashlake.index.lake_source import CODE_COLUMNS

        whole = batch_table(0, n, all_codes(n + extra)[:n]).select(list(CODE_COLUMNS))
        sink = io.BytesIO()
        pq.write_table(whole, sink, compression="zstd")
        store.put(settings.index_bucket, "reference/codes.parquet", sink.getvalue())
        del whole, sink
        loads, reads = [], []
        context = multiprocessing.get_context("spawn")
        for _ in range(3):
            queue = context.Queue()
            proc = context.Process(target=load_in_fresh_process, args=(settings, queue))
            proc.start()
            load_s, rows = queue.get()
            proc.join()
            assert rows == n, f"the index holds {rows} rows, {n} were committed"
            loads.append(load_s)
            t0 = time.perf_counter()
            body, _ = store.get(settings.index_bucket, "reference/codes.parquet")
            table = pq.read_table(io.BytesIO(body))
            reads.append(time.perf_counter() - t0)
            assert table.num_rows == n
            del body, table
        load_s, read_s = statistics.median(loads), statistics.median(reads)
        print(f"load: index {', '.join(f'{x:.2f}' for x in loads)} s; one Parquet file "
              f"{', '.join(f'{x:.2f}' for x in reads)} s")

        # 4) refresh after 1% more
        from hashlake import sql

        con = sql.connect(settings, model_version=VERSION)
        commit_with_writers(settings, n, n + extra, n + extra, args.batch)
        t0 = time.perf_counter()
        snapshot = sql.refresh(con)
        refresh_s = time.perf_counter() - t0
        assert snapshot.rows == n + extra

        # 5) count and search_rows
        query = all_codes(n + extra)[7].tobytes().hex()
        count_ms = median_ms(lambda: con.execute("SELECT count(*) FROM codes").fetchone(), 20)
        # search_rows as benchmarks/hamming.py measures it (the pre-lake figure: the same SQL), beside
        # the engine alone (search, keys only) and every codes column, on the same connection
        rows_sql = f"SELECT key, distance, labels FROM search_rows('{query}', 10)"
        rows_ms = median_ms(lambda: con.execute(rows_sql).fetchall(), 200)
        search_ms = median_ms(lambda: con.execute(f"SELECT * FROM search('{query}', 10)").fetchall(), 200)
        all_columns_ms = median_ms(lambda: con.execute(f"SELECT * FROM search_rows('{query}', 10)").fetchall(), 200)
        assert con.execute(f"SELECT distance FROM search_rows('{query}', 1)").fetchone()[0] == 0
        files = con.sql("SELECT count(*) FROM ducklake_list_files('lake', 'codes')").fetchone()[0]

    print(f"RESULT lake_images {n}")
    print(f"RESULT lake_commit_images_per_s {(n - first) / commit_s:.1f}")
    print(f"RESULT lake_load_s {load_s:.3f}")
    print(f"RESULT parquet_single_file_read_s {read_s:.3f}")
    print(f"RESULT lake_load_vs_parquet_ratio {load_s / read_s:.2f}")
    print(f"RESULT lake_refresh_1pct_s {refresh_s:.3f}")
    print(f"RESULT lake_count_ms {count_ms:.2f}")
    print(f"RESULT lake_search_ms {search_ms:.3f}")
    print(f"RESULT lake_search_rows_all_columns_ms {all_columns_ms:.3f}")
    print(f"RESULT lake_search_rows_ms {rows_ms:.3f}")
    print(f"RESULT lake_files_after_compact {files}")


if __name__ == "__main__":
    main()
