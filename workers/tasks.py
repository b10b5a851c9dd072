"""The Celery tasks and the worker-process hooks: thin wrappers around ``workers.encode.runner``.

Per pool process: one ObjectStore, one ModelHandle (the model is loaded in ``worker_process_init``,
once, and reloaded only when the active pointer moves), one DeliveryLedger. Bookkeeping (retry and
error counts) lives in the task class, not in the bodies.

Poison batches. A pool child that dies with a batch in hand has it requeued at once (acks_late +
reject_on_worker_lost). Each delivery of an encode batch is counted in the delivery ledger
(``workers.deliveries``); a delivery that finds ``CRASHES_BEFORE_SPLIT`` earlier deaths of its batch
does not encode it again: it sends the two halves as new batches (``runner.split_batch``), or, for a
batch of one object, records that object as a ``crashed_worker`` failure (``runner.record_crashed``).
One poison image among 32 thus costs about 2 × (1 + log2 32) = 12 child restarts; every other object
is indexed. A delivery that raises an error that is neither transient nor one object's refusal (a
forward that raises: ``runner.ForwardFailed``, ``runner.LoadFailed``) is counted the same way, and retried after a backoff
instead of acked with its objects dropped. A MemoryError (under a memory rlimit, or with overcommit
off) is made a death too: the child exits, so that the batch takes the same path as one the OOM
killer ended (a failed task would be acked and its other objects dropped), and the next child starts
on a clean heap. So is a child
killed at the hard time limit: its batch is requeued (``acks_on_timeout=False``), not dropped.
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
from celery.exceptions import Reject, WorkerLostError
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.request import Request
from kombu.exceptions import OperationalError

from hashlake.catalog import ModelNotFound
from hashlake.config import Settings, get_settings
from hashlake.lake.writer import LakeUnavailable
from hashlake.store import ObjectStore, StoreUnavailable
from workers import metrics
from workers.celery_app import app
from workers.deliveries import DeliveryLedger, History
from workers.encode.active_model import ModelHandle
from workers.encode.read import start_io_threads
from workers.encode.rejects import CRASHED_WORKER
from workers.encode.runner import encode_batch, record_crashed, split_batch, tombstone_batch, unique_refs
from workers.messages import ENCODE_TASK, TOMBSTONE_TASK, Batch

log = logging.getLogger(__name__)

# Retried, never recorded as failures: the store or the model will come back. The n-th retry waits
# a random time up to 2·2ⁿ s (jitter spreads a herd of workers), capped at 300 s, below the broker's
# visibility timeout; 10 retries span up to ~18 min. After that the task fails loudly and the
# reconciler re-announces the objects on its next pass.
TRANSIENT = (StoreUnavailable, LakeUnavailable, ModelNotFound)
RETRY_OPTIONS = dict(autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=300, retry_jitter=True,
                     max_retries=10)

# Deaths of a batch's worker process before the batch is split (or, alone, recorded). One death can be
# bad luck (the OOM killer picking this child for another's memory, a node restart); two in a row
# on the same batch is a pattern.
CRASHES_BEFORE_SPLIT = 2
# Exit status of a child that ran out of memory: ENOMEM, so that the node's "Worker exited
# prematurely: exitcode 12" says why.
OUT_OF_MEMORY_EXIT = 12


class _Process:
    """What one pool process keeps between tasks."""

    settings: Settings | None = None
    store: ObjectStore | None = None
    model: ModelHandle | None = None
    ledger: DeliveryLedger | None = None

    @classmethod
    def get(cls) -> type["_Process"]:
        if cls.settings is None:
            cls.settings = get_settings()
            cls.store = ObjectStore(cls.settings)
            cls.model = ModelHandle(cls.settings, cls.store)
            cls.ledger = DeliveryLedger.for_settings(cls.settings)
        return cls


class BatchRequest(Request):
    """The node's main process side of a delivery: when the pool child dies with an encode batch in
    hand, or is killed at the hard time limit, note how in the delivery ledger, for the failure row
    that may follow."""

    _ledger: DeliveryLedger | None = None  # the main process's own client

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            self._note_death(str(exc))  # "Worker exited prematurely: signal 11 (SIGSEGV) Job: 3."
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft, timeout):
        if not soft:
            self._note_death(f"killed at the hard time limit of {timeout} s (a decode or forward that never ended)")
        return super().on_timeout(soft, timeout)

    def _note_death(self, text: str) -> None:
        if self.task_name != ENCODE_TASK:
            return
        try:
            key = Batch.from_json(self.args[0]).delivery_key
        except (ValueError, IndexError, AttributeError):
            return  # a malformed message: the task itself says so when it runs
        if BatchRequest._ledger is None:
            BatchRequest._ledger = DeliveryLedger.for_settings(get_settings())
        BatchRequest._ledger.note(key, "exit", text)


class BatchTask(Task):
    """Counts retries and errors per batch kind; the body stays a call into the runner."""

    Request = BatchRequest
    kind = "encode"

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        metrics.observe_retry(self.kind)
        log.warning("%s batch will be retried: %s", self.kind, exc)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        metrics.BATCHES.labels(self.kind, "error").inc()


# acks_on_timeout=False: a batch whose child is killed at the hard time limit (an image whose decode
# never ends, a process deadlocked after running out of memory) is requeued, not acked and dropped; its
# start stays counted in the ledger, so a batch that always hangs is split like one that always crashes.
@app.task(name=ENCODE_TASK, base=BatchTask, acks_on_timeout=False, **RETRY_OPTIONS)
def encode_batch_task(batch_json: dict) -> dict:
    batch = Batch.from_json(batch_json)
    proc = _Process.get()
    history = proc.ledger.start(batch.delivery_key)
    try:
        if history.unfinished >= CRASHES_BEFORE_SPLIT:
            summary = _isolate(batch, history, proc)
        else:
            result = encode_batch(batch, proc.settings, proc.model, store=proc.store)
            metrics.observe_encode(result, batch)
            summary = result.summary()
    except MemoryError as exc:
        _die_out_of_memory(batch, exc, proc.ledger)  # never returns: the start stays counted, as a death
    except (*TRANSIENT, Reject):
        proc.ledger.finish(batch.delivery_key, done=False)  # a retry or a requeue: it comes again, nothing died
        raise
    except Exception as exc:
        _retry_as_a_death(batch, exc, proc.ledger)  # never returns: the start stays counted, as a death
    # Not reached either when the process is being ended mid-batch (SystemExit at the hard time limit,
    # a cold shutdown): that start stays counted too.
    proc.ledger.finish(batch.delivery_key, done=True)
    return summary


def _isolate(batch: Batch, history: History, proc: type[_Process]) -> dict:
    """A batch whose worker process died ``history.unfinished`` times: send its halves, or record its
    one object as ``crashed_worker``."""
    if len(unique_refs(batch.objects)) == 1:
        result = record_crashed(batch, history, proc.settings, proc.model)
        log.error("batch %s (%s) killed the worker process %d times on its own (last: %s); recorded as %s",
                  batch.batch_id, _where(batch), history.unfinished, history.describe(), CRASHED_WORKER)
        for reason, count in result.failures_by_reason.items():
            metrics.FAILURES.labels(reason).inc(count)
        metrics.BATCHES.labels("encode", "crashed").inc()
        return result.summary()
    halves = split_batch(batch, history.unfinished)
    hard, soft = encode_batch_task.request.timelimit or (None, None)  # a message's own limits, if it had any
    try:
        for half in halves:
            encode_batch_task.apply_async(args=[half.to_json()], time_limit=hard, soft_time_limit=soft)
    except OperationalError as exc:
        # Not acked: the batch comes back and is split again; a half sent twice adds nothing to the lake.
        raise Reject(f"could not send the halves of batch {batch.batch_id}: {exc}", requeue=True) from exc
    log.error("batch %s of %d objects killed the worker process %d times (last: %s); split into %s",
              batch.batch_id, len(unique_refs(batch.objects)), history.unfinished, history.describe(),
              " and ".join(f"{h.batch_id} ({len(h.objects)})" for h in halves))
    metrics.BATCHES.labels("encode", "split").inc()
    return {"batch_id": batch.batch_id, "split_into": [h.batch_id for h in halves]}


def _retry_as_a_death(batch: Batch, exc: Exception, ledger: DeliveryLedger) -> None:
    """An error that is neither a refusal of one object (those are failure rows) nor transient: the
    forward raised (``ForwardFailed``: a model that fails on some input, torch out of memory on the
    batch) or a bug. Acking the task would drop every object of the batch, so it counts as a death
    in the ledger and the batch is delivered again after a backoff: the delivery that finds
    ``CRASHES_BEFORE_SPLIT`` of them splits it, and the object that makes it fail ends alone and
    recorded as ``crashed_worker`` naming the error. The backoff (as ``RETRY_OPTIONS``) keeps a model
    that fails on everything, self-check included, from spinning."""
    cause = f"{exc.__class__.__name__} in pool process {os.getpid()}: {exc}"
    ledger.fail(batch.delivery_key, cause)
    retries = encode_batch_task.request.retries
    countdown = get_exponential_backoff_interval(RETRY_OPTIONS["retry_backoff"], retries,
                                                 RETRY_OPTIONS["retry_backoff_max"], RETRY_OPTIONS["retry_jitter"])
    log.error("batch %s (%s) failed: %s; delivered again in %d s, split after %d such failures", batch.batch_id,
              _where(batch), cause, countdown, CRASHES_BEFORE_SPLIT, exc_info=exc)
    raise encode_batch_task.retry(exc=exc, countdown=countdown)


def _die_out_of_memory(batch: Batch, exc: MemoryError, ledger: DeliveryLedger) -> None:
    cause = f"MemoryError in pool process {os.getpid()}: {exc!r}"
    ledger.note(batch.delivery_key, "cause", cause)
    log.critical("batch %s (%s): %s; the process exits (status %d) and the batch is delivered again",
                 batch.batch_id, _where(batch), cause, OUT_OF_MEMORY_EXIT)  # handlers flush every record
    os._exit(OUT_OF_MEMORY_EXIT)  # no cleanup, no Python shutdown: as the OOM killer would end it


def _where(batch: Batch) -> str:
    refs = unique_refs(batch.objects)
    first = f"s3://{refs[0].bucket}/{refs[0].key}" if refs else "no objects"
    return first if len(refs) == 1 else f"{first} and {len(refs) - 1} more"


@app.task(name=TOMBSTONE_TASK, base=BatchTask, kind="delete", **RETRY_OPTIONS)
def tombstone_batch_task(batch_json: dict) -> int:
    batch = Batch.from_json(batch_json)
    proc = _Process.get()
    rows = tombstone_batch(batch, proc.settings)
    metrics.observe_tombstones(batch)
    return rows


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
    start_io_threads(proc.settings.download_concurrency)
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
