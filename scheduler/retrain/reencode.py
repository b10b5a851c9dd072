"""Re-encode step of head mode: every current image of the active version gets a code under the candidate,
from its stored features, with Ray Data; no image is read.

The rows to do are the active version's current codes rows that have no code under the candidate yet
(so a rerun after a kill continues where the first attempt stopped), each matched to its first features
row of the active version's backbone (``todo_sql``). The driver reads them without their feature blobs
(~110 bytes a row); Ray Data then streams one pass over the features table joined to them
(``TodoFeatures``: one read task, blocks of ``reencode_block_rows``), maps the candidate's head over
each block (``HeadEncoder``), and the driver commits each block of codes rows as one lake transaction
(``LakeWriter.commit``, which inserts only what is not there) while the next blocks are read and
encoded. Images without features (failures under the active version, images encoded before features
were kept) are left to the flip step: ``promote``'s staged reconciler runs have the encode workers read
and encode those.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from hashing_models.codes import pack_signs
from hashlake.config import Settings
from hashlake.lake.connection import open_lake
from hashlake.lake.features import decode_features
from hashlake.lake.rules import current_codes_sql
from hashlake.lake.schema import CODES_SCHEMA, LAKE
from hashlake.lake.writer import LakeWriter
from scheduler.retrain.data import current_snapshot

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after each committed block, so a test can kill a job mid re-encode.
TEST_BLOCK_DELAY_ENV = "HASHLAKE_TEST_REENCODE_BLOCK_DELAY_S"

# The head runs on slices of a block this many rows long: a 2,048 × 1,280 float32 slice (10 MB) stays in
# cache from the float16 decode through the centring into the first layer; one 50,000-row block at a time
# (256 MB a pass) ran the MLP head 1.6× and the linear head 2.6× slower (benchmarks/README.md, reencode.py).
HEAD_SLICE_ROWS = 2048

# Ray CPUs of the read task, not the encoder's 1: Ray Data fuses a read and a map with equal resources
# into one actor, where the read would wait for each forward and each forward for the read.
READ_CPUS = 0.5

_TODO = "_hashlake_reencode_todo"  # the todo rows, registered on the read task's connection
_ROW_COLUMNS = ("bucket", "key", "etag", "version_id", "size", "last_modified", "mtime_ns", "labels")


def todo_sql(active: str, candidate: str, at: int) -> str:
    """The active version's current rows at snapshot ``at`` without a code under ``candidate``: their
    ``_ROW_COLUMNS`` and ``feature_at``, the ``encoded_at`` of the image version's first features row of
    the backbone ``$backbone`` (NULL: none stored). Reads the features table's identity columns only."""
    def table(name: str) -> str:
        return f"(SELECT * FROM {LAKE}.{name} AT (VERSION => {int(at)}))"

    def literal(version: str) -> str:
        return "'" + version.replace("'", "''") + "'"

    current = current_codes_sql(f"(SELECT * FROM {table('codes')} WHERE model = {literal(active)})", table("deletes"))
    return f"""
        SELECT {', '.join(f'c.{name}' for name in _ROW_COLUMNS)}, f.encoded_at AS feature_at
        FROM ({current}) AS c
        LEFT JOIN (SELECT bucket, key, etag, min(encoded_at) AS encoded_at FROM {table('features')}
                   WHERE backbone = $backbone GROUP BY bucket, key, etag) AS f
          ON f.bucket = c.bucket AND f.key = c.key AND f.etag = c.etag
        WHERE NOT EXISTS (SELECT 1 FROM {table('codes')} AS o
                          WHERE o.model = {literal(candidate)} AND o.bucket = c.bucket AND o.key = c.key
                            AND o.etag = c.etag)"""


def todo_features_sql(at: int) -> str:
    """The rows of ``_TODO`` (todo_sql's rows that have features) with their ``feature`` blob: one scan of
    the backbone's features at snapshot ``at``, probing a hash table of the todo rows, so the result
    streams (the blobs are never all held). An image version whose first features row is stored twice
    with one ``encoded_at`` (two deliveries of one batch committing at the same instant) comes twice,
    with identical blobs: its two identical codes rows collapse under the current-rows rule."""
    return f"""
        SELECT t.* EXCLUDE (feature_at), f.feature
        FROM (SELECT bucket, key, etag, encoded_at, feature FROM {LAKE}.features AT (VERSION => {int(at)})
              WHERE backbone = $backbone) AS f
        JOIN {_TODO} AS t
          ON f.bucket = t.bucket AND f.key = t.key AND f.etag = t.etag AND f.encoded_at = t.feature_at"""


class TodoFeatures(Datasource):
    """Ray Data source: the todo rows with their feature blobs, read from the lake by one streaming read
    task in blocks of ``block_rows`` (one read task: the features table is scanned once, whatever the
    cluster's size; the hash join needs every todo row on its build side)."""

    def __init__(self, settings: Settings, at: int, backbone: str, todo: ray.ObjectRef, rows: int, block_rows: int):
        self.settings, self.at, self.backbone = settings, at, backbone
        self.todo, self.rows, self.block_rows = todo, rows, block_rows  # todo: todo_sql's rows with features

    def estimate_inmemory_data_size(self) -> None:
        return None  # the blobs' width is the backbone's; Ray Data sizes the blocks as they come

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [ReadTask(self._read, BlockMetadata(num_rows=self.rows, size_bytes=None, exec_stats=None))]

    def _read(self) -> Iterator[pa.Table]:
        con = open_lake(self.settings)
        try:
            # the join as written: the todo rows are the hash table, the features scan probes it and streams.
            # Left to the optimizer, equal row counts can make the features (every blob) the hash table.
            con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
            con.register(_TODO, ray.get(self.todo))
            result = con.execute(todo_features_sql(self.at), {"backbone": self.backbone})
            for batch in result.fetch_record_batch(self.block_rows):
                yield pa.Table.from_batches([batch])
        finally:
            con.close()


class HeadEncoder:
    """Ray Data map: a block of rows with ``feature`` blobs → the same rows with the candidate's ``code``
    in place of ``feature``."""

    def __init__(self, head):
        self.head = head.eval()

    def __call__(self, block: pa.Table) -> pa.Table:
        import torch

        blobs = block.column("feature").combine_chunks()
        with torch.inference_mode():
            codes = [pack_signs(self.head(torch.from_numpy(decode_features(blobs.slice(start, HEAD_SLICE_ROWS)))).h)
                     for start in range(0, len(blobs), HEAD_SLICE_ROWS)]  # (≤ HEAD_SLICE_ROWS, bits/8) uint8 each
        packed = np.concatenate(codes) if codes else np.zeros((0, 1), np.uint8)
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(packed.shape[1]), len(packed),
                                                      [None, pa.py_buffer(packed)])
        return block.drop_columns(["feature"]).append_column("code", column)


def codes_rows(block: pa.Table, candidate: str, batch_id: str) -> pa.Table:
    """A block mapped by ``HeadEncoder`` → CODES_SCHEMA rows under ``candidate``."""
    n = block.num_rows
    now = pa.scalar(datetime.now(timezone.utc), CODES_SCHEMA.field("encoded_at").type)
    columns = {name: block.column(name) for name in (*_ROW_COLUMNS, "code")}  # code: cast to binary below
    columns.update(model=pa.repeat(candidate, n), encoded_at=pa.repeat(now, n), batch_id=pa.repeat(batch_id, n))
    return pa.table({f.name: columns[f.name] for f in CODES_SCHEMA}).cast(CODES_SCHEMA)


def reencode_head(settings: Settings, con: duckdb.DuckDBPyConnection, *, active: str, candidate: str,
                  backbone: str, head, run_id: str, progress: Callable[[int, int], None]) -> dict:
    """Write the candidate's codes rows; returns the step's figures."""
    started = time.monotonic()
    at = current_snapshot(con)
    rows = con.execute(todo_sql(active, candidate, at), {"backbone": backbone}).to_arrow_table()
    todo_s = time.monotonic() - started
    first_block_s = None  # todo read → first block encoded: Ray Data's start, the encoder actor's, one read and forward
    without_features = rows.column("feature_at").null_count  # left to the flip step's encode workers
    todo = rows.filter(pc.is_valid(rows.column("feature_at")))
    total = todo.num_rows
    progress(0, total)
    done = 0
    block_rows = settings.reencode_block_rows
    delay = float(os.environ.get(TEST_BLOCK_DELAY_ENV) or 0)
    if total:
        source = TodoFeatures(settings, at, backbone, ray.put(todo), total, block_rows)
        encoded = ray.data.read_datasource(source, override_num_blocks=1, num_cpus=READ_CPUS).map_batches(
            HeadEncoder, fn_constructor_args=(head,), batch_format="pyarrow", batch_size=block_rows,
            compute=ray.data.ActorPoolStrategy(size=1))
        writer = LakeWriter(settings)
        try:
            # batch_size: Ray Data merges the read's tables into blocks of up to 128 MB (its target block size)
            for block in encoded.iter_batches(batch_format="pyarrow", batch_size=block_rows):
                if first_block_s is None:
                    first_block_s = round(time.monotonic() - started - todo_s, 3)
                writer.commit(codes_rows(block, candidate, f"{run_id}-reencode"), None)
                done += block.num_rows
                progress(done, total)
                if delay:
                    log.warning("test hook %s: sleeping %s s after a re-encode block", TEST_BLOCK_DELAY_ENV, delay)
                    time.sleep(delay)
        finally:
            writer.close()
    seconds = time.monotonic() - started
    return {"rows": done, "seconds": round(seconds, 3), "rows_per_s": round(done / seconds, 1) if seconds else None,
            "without_features": without_features, "snapshot": at, "todo_s": round(todo_s, 3),
            "first_block_s": first_block_s}
