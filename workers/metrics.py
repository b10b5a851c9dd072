"""Prometheus metrics of the encode workers, correct under Celery's prefork pool.

Pool children observe; the worker's main process exports. prometheus_client's multiprocess mode
keeps every process's values in files under ``PROMETHEUS_MULTIPROC_DIR`` (one folder per worker
node, emptied when the node starts), and the exporter sums them with ``MultiProcessCollector``,
so the numbers of a child that exited or was killed are still counted. The variable must be set
before prometheus_client is imported: the stack launcher sets it in the worker's environment.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_ENV = "HASHLAKE_WORKER_METRICS_PORT"  # the stack launcher passes metrics_port + 1 + worker index

# Every metric has a label, so no process writes a value file before it observes something.
IMAGES_ENCODED = Counter("hashlake_worker_images_encoded_total", "Images encoded and committed to the lake", ["model"])
# known: the model version already held the image version (a duplicate event or a retried batch);
# superseded: the object was overwritten between its event and the read.
IMAGES_SKIPPED = Counter("hashlake_worker_images_skipped_total", "Objects of a batch not encoded, by why", ["reason"])
FAILURES = Counter("hashlake_worker_failures_total", "Objects refused, one failures row each", ["reason"])
TOMBSTONES = Counter("hashlake_worker_tombstones_total", "Delete rows committed to the lake", ["bucket"])
BATCHES = Counter("hashlake_worker_batches_total", "Batches finished, by kind and outcome", ["kind", "outcome"])
# Per-batch stage durations: a batch of 32 at 128 px takes ~0.25 s of forward on 2 CPU cores.
STAGE_SECONDS = Histogram("hashlake_worker_stage_seconds", "Per-batch wall time of each encode stage",
                          ["stage"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# Event → queryable: from the intake's enqueue (source="enqueued") or the bucket event's own time
# (source="event") to the moment the batch is committed to the lake. The target is p95 ≤ 3 s.
EVENT_TO_QUERYABLE_SECONDS = Histogram(
    "hashlake_event_to_queryable_seconds", "From event (or enqueue) to the batch's commit to the lake",
    ["source"], buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 1800))


def observe_encode(result, batch) -> None:
    """Record one finished ``encode_batch`` (an ``EncodeResult``) of ``batch``."""
    IMAGES_ENCODED.labels(result.model_version).inc(result.encoded)
    IMAGES_SKIPPED.labels("known").inc(result.known)
    IMAGES_SKIPPED.labels("superseded").inc(result.superseded)
    for reason, count in result.failures_by_reason.items():
        FAILURES.labels(reason).inc(count)
    for stage, seconds in (("read", result.read_s), ("infer", result.infer_s), ("write", result.write_s)):
        STAGE_SECONDS.labels(stage).observe(seconds)
    if result.encoded:
        EVENT_TO_QUERYABLE_SECONDS.labels("enqueued").observe(max(0.0, result.written_at - batch.enqueued_at))
        for event_time in result.event_times:
            EVENT_TO_QUERYABLE_SECONDS.labels("event").observe(max(0.0, result.written_at - event_time))
    BATCHES.labels("encode", "ok").inc()


def observe_tombstones(batch) -> None:
    for ref in batch.objects:
        TOMBSTONES.labels(ref.bucket).inc()
    BATCHES.labels("delete", "ok").inc()


def observe_retry(kind: str) -> None:
    BATCHES.labels(kind, "retry").inc()


def multiproc_dir() -> Path:
    """The folder of per-process value files; a clear error when the worker was started without it."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        raise RuntimeError(f"{MULTIPROC_ENV} is not set: a prefork worker's metrics live in its pool children, "
                           f"which only multiprocess mode can export; set it to an empty folder per worker node")
    return Path(path)


def reset_multiproc_dir() -> Path:
    """Empty the folder at worker-node start: files of a previous run would be summed in as live."""
    path = multiproc_dir()
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def exporter_port(default: int) -> int:
    return int(os.environ.get(PORT_ENV, default))


def start_exporter(port: int) -> None:
    """Serve /metrics of all processes of this node (the main process calls this once)."""
    multiproc_dir()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr="0.0.0.0", registry=registry)
    log.info("worker metrics on http://0.0.0.0:%d/metrics (multiprocess dir %s)", port, os.environ[MULTIPROC_ENV])


def mark_process_dead(pid: int) -> None:
    """Drop a finished child's live gauges (counters and histograms stay summed)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
