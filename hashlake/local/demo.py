"""`make demo`: stack up, upload a CIFAR-10 sample, wait until it is indexed, query it, report mAP, then
retrain: a head-mode retraining run on the stack's Ray head learns from the sample's labels, is gated,
re-encodes the sample from its stored features and becomes the active version; the same query and the
same mAP again.

Ends with ``RESULT demo_indexed``, ``demo_failures``, ``demo_map_before`` and ``demo_map_after``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hashlake.local import stack
from hashlake.config import Settings
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.sql import connect, refresh
from hashlake.store import ObjectStore
from hashlake.upload import upload_all

INDEX_TIMEOUT_S = 900  # 1,000 images at 128 px take ~15 s on 2 cores; generous for slow machines


def run_demo(dataset: Path | None, limit: int, workers: int | None, keep: bool, console: Console) -> None:
    base = Settings()
    config = stack.stack_dir(base) / stack.CONFIG_FILE
    if any(stack.pid_alive(r.pid) for r in stack.read_state(base)):
        console.print(f"using the running stack in {stack.stack_dir(base)}")
        settings = stack.load_stack_settings(config)
    else:
        console.print("starting the local stack")
        settings = stack.up(base, stack.StackOptions(workers=workers), log=console.print)
    try:
        _demo(settings, dataset or SAMPLE, limit, console)
    finally:
        if not keep:
            stack.down(base, log=console.print)


def _demo(settings: Settings, dataset: Path, limit: int, console: Console) -> None:
    store = ObjectStore(settings)
    images = list(iter_images(dataset, limit=limit))
    console.print(f"uploading {len(images)} images from {dataset} to s3://{settings.images_bucket}/")
    etags = upload_all(store, settings.images_bucket, images)
    expected = {(settings.images_bucket, key, etag) for key, etag in etags.items()}

    con = connect(settings)
    indexed, failed = _wait_indexed(con, expected, console)

    query = images[0]
    _top10(con, query, "before retraining", console)
    before = _sample_map(con)
    console.print(f"mAP@ALL over the indexed sample (each image queries the others): {before:.4f}")

    state = _retrain(settings, console)
    refresh(con)
    _top10(con, query, f"after retraining ({state.candidate})", console)
    after = _sample_map(con)
    gate = state.steps.get("evaluate", {})
    console.print(f"mAP@ALL over the indexed sample: {before:.4f} before, {after:.4f} after (the sample's "
                  f"evaluation split alone, images the head never trained on: {gate.get('active_map', float('nan')):.4f}"
                  f" → {gate.get('candidate_map', float('nan')):.4f})")
    print(f"RESULT demo_indexed {indexed}")
    print(f"RESULT demo_failures {failed}")
    print(f"RESULT demo_map_before {before:.4f}")
    print(f"RESULT demo_map_after {after:.4f}")


def _top10(con, query, when: str, console: Console) -> None:
    with tempfile.NamedTemporaryFile(suffix=Path(query.name).suffix) as tmp:
        tmp.write(query.body)
        tmp.flush()
        rows = con.execute(
            "SELECT key, distance, array_to_string(labels, ',') AS labels FROM search_rows(hash_image(?), 10)",
            [tmp.name]).fetchall()
    table = Table("rank", "key", "distance", "labels",
                  title=f"top 10 for {query.name} ({', '.join(query.labels)}), {when}")
    for rank, (key, distance, labels) in enumerate(rows, 1):
        table.add_row(str(rank), key, str(distance), labels)
    console.print(table)


def _retrain(settings: Settings, console: Console):
    """A head-mode retraining run submitted to the stack's Ray head, followed with a progress bar."""
    from scheduler.submit import submit_retrain, wait_with_progress

    run_id = submit_retrain(settings, mode="head")
    console.print(f"retraining: submitted run {run_id} to the Ray head at {settings.ray_address}")
    state = wait_with_progress(settings, run_id, console)
    if state.outcome != "succeeded":
        raise RuntimeError(f"retraining run {run_id} ended {state.outcome}: {state.reason}")
    return state


def _wait_indexed(con, expected: set[tuple[str, str, str]], console: Console) -> tuple[int, int]:
    """Poll the ``codes`` and ``failures`` views until every uploaded version is in one of them
    (``refresh`` moves the connection onto what the lake committed since the last poll)."""
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("indexing", total=len(expected))
        while True:
            refresh(con)
            done_codes = set(con.execute("SELECT bucket, key, etag FROM codes").fetchall())
            done_failed = set(con.execute("SELECT bucket, key, etag FROM failures").fetchall())
            indexed, failed = len(expected & done_codes), len(expected & done_failed)
            progress.update(task, completed=indexed + failed)
            if indexed + failed >= len(expected):
                return indexed, failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {indexed + failed} of {len(expected)} images were indexed after "
                                   f"{INDEX_TIMEOUT_S} s; see the logs under the stack folder")
            time.sleep(0.5)


def _sample_map(con) -> float:
    """Leave-one-out mAP@ALL over the indexed images that carry labels (NaN with fewer than two)."""
    from hashing_models.evaluate import mean_average_precision

    rows = con.execute("SELECT code, labels[1] FROM codes WHERE len(labels) > 0 ORDER BY key").fetchall()
    if len(rows) < 2:
        return float("nan")
    codes = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.uint8).reshape(len(rows), -1)
    names = np.unique([r[1] for r in rows], return_inverse=True)[1]
    return mean_average_precision(codes, names, codes, names, exclude_self=True)
