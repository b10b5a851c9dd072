"""Re-encode step of head mode: every current image of the active version gets a code under the candidate,
from its stored features, with Ray Data; no image is read.

The rows to do are the active version's current codes rows that have features of its backbone and no
code under the candidate yet (so a rerun after a kill continues where the first attempt stopped). Ray
Data maps the candidate's head over them in blocks; the driver commits each block of codes rows as one
lake transaction (``LakeWriter.commit``, which inserts only what is not there). Images without features
(failures under the active version, images encoded before features were kept) are left to the flip
step: ``promote``'s staged reconciler runs have the encode workers read and encode those.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from hashing_models.codes import pack_signs
from hashlake.config import Settings
from hashlake.lake.schema import CODES_SCHEMA, LAKE
from hashlake.lake.writer import LakeWriter
from hashlake.lake.features import decode_features
from scheduler.retrain.data import current_snapshot, features_sql

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after each committed block, so a test can kill a job mid re-encode.
TEST_BLOCK_DELAY_ENV = "HASHLAKE_TEST_REENCODE_BLOCK_DELAY_S"


def todo_sql(active: str, candidate: str, at: int) -> str:
    """The active version's current rows without a code under ``candidate``, each with its feature of
    ``$backbone`` (NULL: none stored)."""
    version = "'" + candidate.replace("'", "''") + "'"
    return f"""
        SELECT t.* FROM ({features_sql(active, at, labelled=False)}) AS t
        WHERE NOT EXISTS (SELECT 1 FROM (SELECT * FROM {LAKE}.codes AT (VERSION => {int(at)})) AS o
                          WHERE o.model = {version} AND o.bucket = t.bucket AND o.key = t.key AND o.etag = t.etag)"""


class HeadEncoder:
    """Ray Data map: a block of rows with ``feature`` blobs → the same rows with the candidate's ``code``."""

    def __init__(self, head):
        self.head = head.eval()

    def __call__(self, block: pa.Table) -> pa.Table:
        import torch

        features = torch.from_numpy(decode_features(block.column("feature")))
        with torch.inference_mode():
            codes = pack_signs(self.head(features).h)  # (n, bits/8) uint8
        return block.drop_columns(["feature"]).append_column(
            "new_code", pa.array([row.tobytes() for row in codes], pa.binary()))


def codes_rows(block: pa.Table, candidate: str, batch_id: str) -> pa.Table:
    """A block mapped by ``HeadEncoder`` → CODES_SCHEMA rows under ``candidate``."""
    n = block.num_rows
    now = datetime.now(timezone.utc)
    columns = {name: block.column(name) for name in ("bucket", "key", "etag", "version_id", "size", "last_modified",
                                                     "mtime_ns", "labels")}
    columns.update(code=block.column("new_code"), model=pa.array([candidate] * n, pa.string()),
                   encoded_at=pa.array([now] * n, CODES_SCHEMA.field("encoded_at").type),
                   batch_id=pa.array([batch_id] * n, pa.string()))
    return pa.table({f.name: columns[f.name] for f in CODES_SCHEMA}).cast(CODES_SCHEMA)


def reencode_head(settings: Settings, con: duckdb.DuckDBPyConnection, *, active: str, candidate: str,
                  backbone: str, head, run_id: str, progress: Callable[[int, int], None]) -> dict:
    """Write the candidate's codes rows; returns the step's figures."""
    import ray

    started = time.monotonic()
    at = current_snapshot(con)
    rows = con.execute(todo_sql(active, candidate, at), {"backbone": backbone}).to_arrow_table()
    without_features = rows.column("feature").null_count  # left to the flip step's encode workers
    todo = rows.filter(pc.is_valid(rows.column("feature")))
    total = todo.num_rows
    progress(0, total)
    done = 0
    block_rows = settings.reencode_block_rows
    delay = float(os.environ.get(TEST_BLOCK_DELAY_ENV) or 0)
    if total:
        dataset = ray.data.from_arrow(todo).repartition(max(1, -(-total // block_rows)))
        encoded = dataset.map_batches(HeadEncoder, fn_constructor_args=(head,), batch_format="pyarrow",
                                      batch_size=block_rows, concurrency=1)
        writer = LakeWriter(settings)
        try:
            for block in encoded.iter_batches(batch_format="pyarrow", batch_size=block_rows):
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
            "without_features": without_features, "snapshot": at}
