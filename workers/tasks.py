"""The Celery tasks and the worker-process hooks: thin wrappers around ``workers.encode.runner``.

Per pool process: one ObjectStore, one ModelHandle (the model is loaded in ``worker_process_init``,
once, and reloaded only when the active pointer moves). Bookkeeping (retry and error counts) lives
in the task class, not in the bodies.
"""
from __future__ import annotations

import logging
import os

# The forward's OpenMP threads wait for work passively instead of spinning: a CPU worker shares its
# cores with its own download/decode threads, the intake and the store. Measured on this 2-core
# machine (EfficientNet-Lite0, 128 px, batch 32, 2 threads, one other busy process): 12 img/s
# spinning, 73 img/s passive. libgomp reads it once, when torch loads, so it is set before that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Task, signals

from hashlake.catalog import ModelNotFound
from hashlake.config import Settings, get_settings
from hashlake.store import ObjectStore, StoreUnavailable
from workers import metrics
from workers.celery_app import app
from workers.encode.model import ModelHandle
from workers.encode.runner import encode_batch, tombstone_batch
from workers.messages import ENCODE_TASK, TOMBSTONE_TASK, Batch

log = logging.getLogger(__name__)

# Retried, never recorded as failures: the store or the model will come back. The n-th retry waits
# a random time up to 2·2ⁿ s (jitter spreads a herd of workers), capped at 300 s, below the broker's
# visibility timeout; 10 retries span up to ~18 min. After that the task fails loudly and the
# reconciler re-announces the objects on its next pass.
TRANSIENT = (StoreUnavailable, ModelNotFound)
RETRY_OPTIONS = dict(autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=300, retry_jitter=True,
                     max_retries=10)


class _Process:
    """What one pool process keeps between tasks."""

    settings: Settings | None = None
    store: ObjectStore | None = None
    model: ModelHandle | None = None

    @classmethod
    def get(cls) -> type["_Process"]:
        if cls.settings is None:
            cls.settings = get_settings()
            cls.store = ObjectStore(cls.settings)
            cls.model = ModelHandle(cls.settings, cls.store)
        return cls


class BatchTask(Task):
    """Counts retries and errors per batch kind; the body stays a call into the runner."""

    kind = "encode"

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        metrics.observe_retry(self.kind)
        log.warning("%s batch will be retried: %s", self.kind, exc)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        metrics.BATCHES.labels(self.kind, "error").inc()


@app.task(name=ENCODE_TASK, base=BatchTask, **RETRY_OPTIONS)
def encode_batch_task(batch_json: dict) -> dict:
    batch = Batch.from_json(batch_json)
    proc = _Process.get()
    result = encode_batch(batch, proc.settings, proc.model, store=proc.store)
    metrics.observe_encode(result, batch)
    return result.summary()


@app.task(name=TOMBSTONE_TASK, base=BatchTask, kind="delete", **RETRY_OPTIONS)
def tombstone_batch_task(batch_json: dict) -> str:
    batch = Batch.from_json(batch_json)
    proc = _Process.get()
    key = tombstone_batch(batch, proc.settings, proc.store)
    metrics.observe_tombstones(batch)
    return key


# -- worker node (main process) ------------------------------------------------------------------
@signals.worker_init.connect
def _on_worker_init(**_) -> None:
    metrics.reset_multiproc_dir()
    # Import the heavy modules (torch, timm, the model registry) once here, before the pool forks,
    # so a (re)started child is ready sooner; importing torch does not initialise CUDA, so forking
    # stays safe.
    import hashing_models

    hashing_models.list_models()


@signals.worker_ready.connect
def _on_worker_ready(**_) -> None:
    settings = get_settings()
    metrics.start_exporter(metrics.exporter_port(settings.metrics_port + 1))


# -- pool child ----------------------------------------------------------------------------------
@signals.worker_process_init.connect
def _on_process_init(**_) -> None:
    import torch

    proc = _Process.get()
    if proc.settings.torch_threads:
        torch.set_num_threads(proc.settings.torch_threads)
    try:
        version = proc.model.current().version
        log.info("pool process %d ready with model %s (%d torch threads)", os.getpid(), version,
                 torch.get_num_threads())
    except (ModelNotFound, StoreUnavailable) as exc:
        # Not fatal: batches are retried until a model is active or the store answers.
        log.error("pool process %d has no model yet: %s", os.getpid(), exc)


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_) -> None:
    metrics.mark_process_dead(pid or os.getpid())
