"""Re-encode step of fine-tune mode: every current image gets a code under the candidate from its bytes,
through a Ray Data actor pool.

The candidate's backbone is new, so the stored features cannot be used: each image is read from the
bucket and goes through the encode workers' own read ▶ decode ▶ prepare ▶ forward stages
(``workers.encode.runner``'s loader, the downloads overlapping the forward) in ``ImageEncoder``
actors: one per GPU where the cluster has GPUs (``num_gpus=1`` each), else
``Settings.finetune_reencode_actors`` on the CPUs. The driver commits each block of codes rows, and
the new backbone's pooled features in the same transaction (what a later head-mode run trains on),
with ``LakeWriter.commit``.

Resumable as head mode's: the rows to do are the active version's current rows with no code under the
candidate yet (``reencode.todo_sql``). An image that fails to read or decode, or was overwritten since
it was listed, gets no row here: the flip step's staged reconciler has the encode workers encode it
and record its failure.

The evaluate step uses the same pipeline on the labelled images it scores (``candidate_codes``), so
their codes are written once and the re-encode step skips them; a candidate the gate rejects keeps
those rows, unserved (queries read the active version's), until ``hashlake model gc`` removes them.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from hashlake.config import Settings
from hashlake.lake.schema import CODES_SCHEMA, FEATURES_SCHEMA, LAKE
from hashlake.lake.writer import LakeWriter
from scheduler.retrain.data import current_snapshot
from scheduler.retrain.reencode import TEST_BLOCK_DELAY_ENV, todo_sql
from scheduler.retrain.train import settings_payload

log = logging.getLogger(__name__)

REF_COLUMNS = ("bucket", "key", "etag", "version_id", "size", "mtime_ns")
# what an actor returns: the codes rows, and the pooled features of each (NULL: none kept) under ``backbone``
ENCODED_SCHEMA = pa.schema([*CODES_SCHEMA, pa.field("feature", pa.binary()), pa.field("backbone", pa.string())])


class ImageEncoder:
    """Ray Data actor: a block of codes rows of the active version → the candidate's codes rows (and
    features) of the objects that read, decode and encode (the workers' stages, on the actor's device)."""

    def __init__(self, settings: dict, version: str, batch_id: str, threads: int | None):
        import torch

        from hashlake.catalog import Catalog
        from hashlake.store import ObjectStore
        from workers.encode.active_model import load_model, resolve_device

        if threads:
            torch.set_num_threads(threads)  # Ray gives a 1-CPU actor one OpenMP thread otherwise
        self.settings = Settings(**settings)
        self.store = ObjectStore(self.settings)
        self.loaded = load_model(Catalog(self.store, self.settings), version, resolve_device(self.settings.device))
        self.batch_id = batch_id

    def __call__(self, block: pa.Table) -> pa.Table:
        from hashlake.lake.features import encode_features
        from workers.encode.runner import read_and_encode
        from workers.encode.write import codes_table
        from workers.messages import ObjectRef

        refs = [ObjectRef(r["bucket"], r["key"], r["etag"], size=r["size"], mtime_ns=r["mtime_ns"],
                          version_id=r["version_id"]) for r in block.select(list(REF_COLUMNS)).to_pylist()]
        ok, _failures, codes, features, _, _ = read_and_encode(refs, self.store, self.settings, self.loaded,
                                                                self.batch_id)
        current = [i for i, item in enumerate(ok) if item.fetched.info.etag == item.fetched.ref.etag]
        fetched = [ok[i].fetched for i in current]
        if not fetched:
            return ENCODED_SCHEMA.empty_table()
        rows = codes_table(fetched, codes[current], self.loaded.card, self.batch_id, datetime.now(timezone.utc))
        blobs = (encode_features(features[current]) if features is not None
                 else pa.nulls(len(fetched), pa.binary()))
        return (rows.append_column("feature", blobs)
                .append_column("backbone", pa.array([self.loaded.backbone_id] * len(fetched), pa.string())))


def _features_rows(block: pa.Table) -> pa.Table | None:
    kept = block.filter(pc.is_valid(block.column("feature")))
    if not kept.num_rows:
        return None
    return pa.table({f.name: kept.column(f.name) for f in FEATURES_SCHEMA}).cast(FEATURES_SCHEMA)


def _pool(settings: Settings) -> dict:
    """map_batches' resources: one actor per GPU, or the settings' CPU actors sharing the CPUs."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"actors": gpus, "num_gpus": 1, "threads": settings.torch_threads}
    actors = settings.finetune_reencode_actors
    threads = settings.torch_threads or max(1, int(resources.get("CPU", 1)) // actors)
    return {"actors": actors, "num_gpus": 0, "threads": threads}


def encode_rows(settings: Settings, rows: pa.Table, candidate: str, batch_id: str, *,
                test_delay_s: float = 0.0) -> Iterator[pa.Table]:
    """Run ``rows`` (codes rows: bucket, key, etag, version_id, size, mtime_ns) through the actor pool;
    yields, block by block once committed, the candidate's codes rows written (ENCODED_SCHEMA).
    test_delay_s: the test hook's sleep before each commit (a kill then lands between two blocks)."""
    import ray

    if not rows.num_rows:
        return
    block_images = settings.finetune_block_images
    pool = _pool(settings)
    blocks = max(1, -(-rows.num_rows // block_images))  # ceil: one block per actor call
    dataset = ray.data.from_arrow(rows.select(list(REF_COLUMNS))).repartition(blocks)
    encoded = dataset.map_batches(ImageEncoder, fn_constructor_args=(settings_payload(settings), candidate, batch_id,
                                                                     pool["threads"]),
                                  batch_format="pyarrow", batch_size=block_images,
                                  compute=ray.data.ActorPoolStrategy(size=pool["actors"]), num_gpus=pool["num_gpus"])
    writer = LakeWriter(settings)
    try:
        for block in encoded.iter_batches(batch_format="pyarrow", batch_size=block_images):
            if block.num_rows:
                if test_delay_s:
                    log.warning("test hook %s: sleeping %s s before a re-encode block", TEST_BLOCK_DELAY_ENV,
                                test_delay_s)
                    time.sleep(test_delay_s)
                writer.commit(block.select([f.name for f in CODES_SCHEMA]).cast(CODES_SCHEMA), None,
                              _features_rows(block))
                yield block
    finally:
        writer.close()


def reencode_images(settings: Settings, con: duckdb.DuckDBPyConnection, *, active: str, candidate: str,
                    backbone: str, run_id: str, progress: Callable[[int, int], None]) -> dict:
    """Write the candidate's codes rows (and its backbone's features) for every current image of ``active``
    not coded under ``candidate`` yet; returns the step's figures. ``backbone``: the active version's (only
    to reuse head mode's query of what is to do; its features are not read)."""
    started = time.monotonic()
    at = current_snapshot(con)
    todo = con.execute(todo_sql(active, candidate, at), {"backbone": backbone}).to_arrow_table()
    total = todo.num_rows
    progress(0, total)
    done = 0
    delay = float(os.environ.get(TEST_BLOCK_DELAY_ENV) or 0)
    for block in encode_rows(settings, todo, candidate, f"{run_id}-reencode", test_delay_s=delay):
        done += block.num_rows
        progress(done, total)
    seconds = time.monotonic() - started
    return {"rows": done, "seconds": round(seconds, 3), "rows_per_s": round(done / seconds, 1) if seconds else None,
            "left_to_flip": total - done, "snapshot": at}


def candidate_codes(settings: Settings, con: duckdb.DuckDBPyConnection, *, active: str, candidate: str,
                    backbone: str, refs: pa.Table, run_id: str, progress: Callable[[int, int], None]) -> list:
    """The candidate's codes of the images ``refs`` (bucket, key, etag), encoded from their bytes now
    where the lake has none yet (and written, so the re-encode step skips them): a list aligned with
    ``refs``, ``bytes`` or None (unreadable now, or overwritten since)."""
    at = current_snapshot(con)
    wanted = refs.select(["bucket", "key", "etag"])
    todo = con.execute(todo_sql(active, candidate, at), {"backbone": backbone}).to_arrow_table()
    # (the ref columns only: Arrow's join carries no list column such as labels)
    todo = todo.select(list(REF_COLUMNS)).join(wanted, keys=["bucket", "key", "etag"], join_type="inner")
    progress(0, todo.num_rows)
    done = 0
    for block in encode_rows(settings, todo, candidate, f"{run_id}-evaluate"):
        done += block.num_rows
        progress(done, todo.num_rows)
    con.register("_hashlake_wanted", wanted)
    try:
        got = con.execute(f"""
            SELECT w.bucket, w.key, w.etag, any_value(c.code) AS code FROM _hashlake_wanted AS w
            JOIN (SELECT bucket, key, etag, code FROM {LAKE}.codes WHERE model = $candidate) AS c
              USING (bucket, key, etag)
            GROUP BY ALL""", {"candidate": candidate}).fetchall()
    finally:
        con.unregister("_hashlake_wanted")
    code_of = {(b, k, e): code for b, k, e, code in got}
    return [code_of.get(ref) for ref in zip(*(wanted.column(n).to_pylist() for n in ("bucket", "key", "etag")))]
