"""The sequential runner: one batch through read ▶ decode ▶ model ▶ pack ▶ write, with per-stage timings.

Celery task bodies call ``encode_batch`` / ``tombstone_batch``; so do the tests and the ingest
benchmark, so all of them measure the same code. A batch that keeps killing its worker process
(``workers.deliveries``) is cut in two by ``split_batch`` until the object that kills it is alone;
``record_crashed`` then writes that object's failure row. A forward that raises (``ForwardFailed``)
takes the same path (``workers.tasks``), and so does any other error that is not a refusal (``LoadFailed``);
a refusal of one object (any error of the decoder included) is that object's failure row, never the batch's.
Reading, decoding and preparing run on the process's I/O thread pool (downloads wait on the network,
Pillow releases the GIL while decoding); the forward runs on the calling thread with torch's own
intra-op threads, starting on the first images that are ready, so the rest of the batch downloads
while the model runs.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from hashing_models.decode import UndecodableImage, decode_image
from hashlake.config import Settings
from hashlake.lake.writer import LakeWriter, shared_writer
from hashlake.store import ObjectStore, StoreUnavailable
from workers.encode import active_model as model_stage
from workers.encode.active_model import LoadedModel, ModelHandle
from workers.encode.read import Fetched, io_pool, read_object
from workers.encode.rejects import CRASHED_WORKER, Failure, ImageRejected
from workers.encode.write import codes_table, deletes_table, failures_table, features_table, parse_event_time
from workers.deliveries import History
from workers.messages import Batch, ObjectRef

log = logging.getLogger(__name__)

# Test hook: seconds to sleep at the start of the model stage, so that a test can kill a worker
# while a batch is provably in flight (read done, nothing written). Never set in production.
TEST_INFER_DELAY_ENV = "HASHLAKE_TEST_INFER_DELAY_S"

# Smallest forward started while downloads are still arriving: chunks of ≥ 8 cost no throughput and let
# the rest of the batch download during the forward.
MIN_FORWARD_CHUNK = 8
# Largest forward on a CPU. EfficientNet-Lite0 at 128 px on a 2-core machine, 2 threads: 103–129 img/s
# in batches of 16, 82–104 at 32, 58–67 at 64, 47 at 512 (the activations outgrow the caches), so a
# re-encode's blocks of hundreds go through in chunks of 16; the encode workers' pipeline ran 57 img/s
# with it against 47 with chunks of 32 (benchmarks/ingest.py). A GPU takes whatever is pending.
CPU_FORWARD_CHUNK = 16


class ForwardFailed(RuntimeError):
    """The model's forward raised on a chunk of the batch (torch's out-of-memory included): the batch
    as a whole failed, not one object, so it is split like one that kills its worker (``workers.tasks``)."""


class LoadFailed(RuntimeError):
    """Reading or preparing one object raised an error that is no refusal (the decoder's errors all
    are): it may be that object or a fault of every object (a broken preprocessing), so the batch is
    split like one that kills its worker, and the object, once alone, recorded only after this process
    encoded its self-check image (``record_crashed``)."""


@dataclass
class EncodeResult:
    batch_id: str
    model_version: str
    encoded: int  # code rows committed
    failures_by_reason: dict[str, int]  # failure rows committed, by reason
    read_s: float  # from the batch's start until its last object was read, decoded and prepared (wall)
    infer_s: float  # forward + sign/pack, summed over the chunks (overlaps read_s)
    write_s: float  # rows built and committed to the lake
    written_at: float  # epoch s of the commit: the batch is queryable from then
    known: int = 0  # image versions the model version already held: not read again
    superseded: int = 0  # objects overwritten since their event: left to the newer version's own event
    event_times: list[float] = field(default_factory=list)  # epoch s of the encoded objects' events, when known

    @property
    def failed(self) -> int:
        return sum(self.failures_by_reason.values())

    def summary(self) -> dict:
        """JSON-safe digest, for logs and the task's return value."""
        return {"batch_id": self.batch_id, "model": self.model_version, "encoded": self.encoded,
                "failed": self.failures_by_reason, "known": self.known, "superseded": self.superseded,
                "read_s": round(self.read_s, 4), "infer_s": round(self.infer_s, 4), "write_s": round(self.write_s, 4)}


@dataclass(frozen=True)
class _Loaded:
    fetched: Fetched
    pixels: "object"  # torch.Tensor (1, 3, S, S), the image prepared for the model


def unique_refs(objects: tuple[ObjectRef, ...]) -> list[ObjectRef]:
    """One ref per (bucket, key), first seen first: a read returns the object's current version
    whatever etag the event named, so a second ref to the same key would only duplicate a row."""
    seen: dict[tuple[str, str], ObjectRef] = {}
    for ref in objects:
        seen.setdefault((ref.bucket, ref.key), ref)
    return list(seen.values())


def load_one(store: ObjectStore, settings: Settings, loaded: LoadedModel, ref: ObjectRef) -> _Loaded:
    """Read ▶ decode ▶ prepare one object (runs on an I/O thread). Refusals raise ``ImageRejected``
    carrying the etag of the bytes read, when a read happened; any error of the decoder is one.
    ``MemoryError`` (torch's allocation failures made one) and anything else pass through."""
    fetched = read_object(store, ref, settings.max_object_bytes)
    try:
        image = decode_image(fetched.body, settings.max_image_pixels, name=f"s3://{ref.bucket}/{ref.key}")
    except UndecodableImage as exc:
        raise ImageRejected(exc.reason, exc.detail, etag=fetched.info.etag) from None
    try:
        return _Loaded(fetched, model_stage.prepare(loaded, [image]))
    except Exception as exc:
        if _out_of_memory(exc):
            raise MemoryError(f"{exc.__class__.__name__}: {exc}") from exc
        raise


def _out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` (CUDA), and on CPU a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory", torch 2.14)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def encode_batch(batch: Batch, settings: Settings, model_handle: ModelHandle, *,
                 store: ObjectStore | None = None, lake: LakeWriter | None = None) -> EncodeResult:
    """Encode every object of ``batch`` and commit its codes and its refusals to the lake in one
    transaction, under the batch's ``model_version`` when it names one (a staged re-encode), else the
    version the handle follows.

    Image versions the model version already holds are skipped before anything is read; an object whose
    bytes are no longer the version its event announced (overwritten since) is skipped after the read:
    the newer version's own event, or the reconciler, brings it with its own order.

    Raises ``ModelNotFound`` (no active model) before reading anything, and ``StoreUnavailable`` /
    ``LakeUnavailable`` when the store or the lake does not answer: all mean "retry the whole batch
    later"; nothing half-done is visible, since the batch commits at the end, whole.
    """
    if batch.kind != "encode":
        raise ValueError(f"encode_batch got a {batch.kind!r} batch {batch.batch_id}; deletes go to tombstone_batch")
    store = store or model_handle.catalog.store
    lake = lake or shared_writer(settings)
    loaded = model_handle.current(batch.model_version)
    batch_id = batch.batch_id

    # 0) what the version already holds costs nothing
    refs = unique_refs(batch.objects)
    held = lake.known(loaded.version, refs)
    todo = [r for r in refs if (r.bucket, r.key, r.etag) not in held]

    # 1+2) read ▶ decode ▶ prepare on the I/O threads, the forward overlapping them
    ok, failures, codes, features, read_s, infer_s = read_and_encode(todo, store, settings, loaded, batch_id)
    current = [i for i, item in enumerate(ok) if not _superseded(item.fetched.ref, item.fetched.info.etag)]
    failures_now = [f for f in failures if not _superseded(f.ref, f.etag)]
    superseded = len(ok) - len(current) + len(failures) - len(failures_now)
    ok, codes = [ok[i] for i in current], codes[current]
    features = features[current] if features is not None else None

    # 3) commit the batch's rows (codes, failures, features) in one transaction
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    fetched = [item.fetched for item in ok]
    lake.commit(codes_table(fetched, codes, loaded.card, batch_id, now) if ok else None,
                failures_table(failures_now, loaded.version, batch_id, now) if failures_now else None,
                features_table(fetched, features, loaded.backbone_id, batch_id, now)
                if ok and features is not None else None)
    write_s = time.perf_counter() - started

    event_times = [_epoch(item.fetched.ref.event_time) for item in ok if item.fetched.ref.event_time]
    return EncodeResult(batch_id, loaded.version, len(ok), dict(Counter(f.reason for f in failures_now)),
                        read_s, infer_s, write_s, time.time(), len(refs) - len(todo), superseded, event_times)


def _superseded(ref: ObjectRef, etag_read: str) -> bool:
    """The bytes read are not the version the event announced (the object was overwritten since)."""
    return bool(ref.etag and etag_read and etag_read != ref.etag)


def read_and_encode(refs: list[ObjectRef], store: ObjectStore, settings: Settings, loaded: LoadedModel,
                    batch_id: str) -> tuple[list[_Loaded], list[Failure], np.ndarray, np.ndarray | None, float, float]:
    """Load every ref on the I/O pool; forward the images as they arrive, in chunks of at least
    ``MIN_FORWARD_CHUNK`` (or whatever remains) and at most ``largest_forward``: the downloads still
    running overlap the forward.

    Returns (loaded, failures, codes (N, bits/8) in the order of loaded, the backbone's pooled features
    (N, D) float16 in the same order or None (``Settings.keep_features`` off, a multi-stage model),
    read_s, infer_s). Raises
    ``ForwardFailed`` when a chunk's forward raises, ``LoadFailed`` when loading an object raised
    anything but a refusal, ``StoreUnavailable`` when the store does not answer, ``MemoryError`` naming
    the object whose load ran out.
    """
    started = time.perf_counter()
    pool = io_pool(settings.download_concurrency)
    futures = [pool.submit(load_one, store, settings, loaded, ref) for ref in refs]
    ok: list[_Loaded] = []
    failures: list[Failure] = []
    pending: list[_Loaded] = []  # loaded, not yet through the model
    chunks: list[np.ndarray] = []
    feature_chunks: list[np.ndarray | None] = []
    read_s = infer_s = 0.0
    largest = largest_forward(loaded.device) or len(refs)
    for i, (ref, future) in enumerate(zip(refs, futures)):
        try:
            item = future.result()  # StoreUnavailable propagates: the whole batch is retried
            ok.append(item)
            pending.append(item)
        except ImageRejected as exc:  # the read and decode stages' refusals
            failures.append(Failure(ref, exc.etag or ref.etag, exc.reason, exc.detail))
        except MemoryError as exc:
            # Not a refusal (it may be the other images' share of memory); the task ends the process
            # (workers.tasks). The message names the object whose load ran out.
            raise MemoryError(f"out of memory reading or decoding s3://{ref.bucket}/{ref.key}") from exc
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise LoadFailed(f"loading s3://{ref.bucket}/{ref.key} for batch {batch_id} raised "
                             f"{exc.__class__.__name__}: {exc}") from exc
        last = i == len(refs) - 1
        if last:
            read_s = time.perf_counter() - started
        if pending and (last or len(pending) >= largest or
                        (len(pending) >= MIN_FORWARD_CHUNK and not futures[i + 1].done())):
            forward_started = time.perf_counter()
            if not chunks:
                _test_delay(batch_id)
            chunk_codes, chunk_features = _forward_chunk(loaded, pending, batch_id, settings.keep_features)
            chunks.append(chunk_codes)  # (n, bits/8) uint8
            feature_chunks.append(chunk_features)  # (n, D) float16, or None
            infer_s += time.perf_counter() - forward_started
            pending = []
    codes = np.concatenate(chunks) if chunks else np.zeros((0, loaded.card.bits // 8), np.uint8)
    features = None
    if feature_chunks and all(f is not None for f in feature_chunks):
        features = np.concatenate(feature_chunks)
    return ok, failures, codes, features, read_s, infer_s


def largest_forward(device) -> int | None:
    """The most images one forward takes on ``device`` (a torch.device): ``CPU_FORWARD_CHUNK`` on a CPU,
    None (no bound) on an accelerator."""
    return CPU_FORWARD_CHUNK if device.type == "cpu" else None


def _forward_chunk(loaded: LoadedModel, items: list[_Loaded], batch_id: str,
                   keep_features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Forward ▶ sign ▶ pack ``items``: codes (n, bits/8) uint8, and the backbone's pooled features (n, D)
    float16 of the same forward when ``keep_features`` (None otherwise, and for a multi-stage model).
    Any error of the forward (a model that raises on some input, torch out of memory on a too large
    chunk) becomes ``ForwardFailed`` naming the batch and its objects; ``MemoryError`` passes through
    (the process ends, as for a read)."""
    import torch

    pixels = torch.cat([item.pixels for item in items])  # (n, 3, S, S)
    try:
        out = model_stage.forward(loaded, pixels, keep_features=keep_features)
        return model_stage.pack(out.h), out.features
    except MemoryError:
        raise
    except Exception as exc:
        first = items[0].fetched.ref
        where = f"s3://{first.bucket}/{first.key}" + (f" and {len(items) - 1} more" if len(items) > 1 else "")
        raise ForwardFailed(f"the forward of model {loaded.version} over {len(items)} images of batch {batch_id} "
                            f"({where}) raised {exc.__class__.__name__}: {exc}") from exc


def split_batch(batch: Batch, deaths: int) -> tuple[Batch, Batch]:
    """Cut a batch that killed its worker ``deaths`` times into two halves, each carrying the deaths
    its objects went through so far. Bisection finds one poison object among n in about log2(n)
    rounds, and keeps the innocent objects in batches as large as possible."""
    refs = unique_refs(batch.objects)
    if len(refs) < 2:
        raise ValueError(f"batch {batch.batch_id} holds one object; record it with record_crashed instead")
    middle = len(refs) // 2
    crashes = batch.crashes + deaths
    return (Batch("encode", tuple(refs[:middle]), batch.enqueued_at, crashes, batch.model_version),
            Batch("encode", tuple(refs[middle:]), batch.enqueued_at, crashes, batch.model_version))


def record_crashed(batch: Batch, history: History, settings: Settings, model_handle: ModelHandle, *,
                   lake: LakeWriter | None = None) -> EncodeResult:
    """Commit one ``crashed_worker`` failure row per object of ``batch`` (a batch of one, once ``split_batch`` is done) whose worker process died
    ``history.unfinished`` times.

    First this process encodes a tiny image of its own making: if the decoder or the model kills
    every process (a broken driver, a bad build), it dies here too and the batch is delivered again,
    instead of every object of the bucket becoming a failure row. The etag is the event's: no read
    of the object ever finished.
    """
    loaded = model_handle.current(batch.model_version)
    _check_this_process_encodes(loaded, settings)
    started = time.perf_counter()
    deaths = history.unfinished
    detail = (f"encoding it killed the worker process {deaths + batch.crashes} times ({deaths} in a batch of its "
              f"own, {batch.crashes} in the larger batches it was split from); last death: {history.describe()}")
    if not history.exit and history.cause:  # the deliveries ended in an error, not a process death
        detail = (f"encoding it failed {deaths + batch.crashes} times ({deaths} in a batch of its own, {batch.crashes} "
                  f"in the larger batches it was split from); last error: {history.cause}")
    failures = [Failure(ref, ref.etag, CRASHED_WORKER, f"s3://{ref.bucket}/{ref.key}: {detail}")
                for ref in unique_refs(batch.objects)]
    lake = lake or shared_writer(settings)
    lake.commit(None, failures_table(failures, loaded.version, batch.batch_id, datetime.now(timezone.utc)))
    return EncodeResult(batch.batch_id, loaded.version, 0, {CRASHED_WORKER: len(failures)}, 0.0, 0.0,
                        time.perf_counter() - started, time.time())


def tombstone_batch(batch: Batch, settings: Settings, *, lake: LakeWriter | None = None) -> int:
    """Commit a delete batch's rows to the lake's deletes table; return how many."""
    if batch.kind != "delete":
        raise ValueError(f"tombstone_batch got a {batch.kind!r} batch {batch.batch_id}; encodes go to encode_batch")
    rows = deletes_table(batch, datetime.now(timezone.utc))
    (lake or shared_writer(settings)).commit_deletes(rows)
    return rows.num_rows


def _check_this_process_encodes(loaded: LoadedModel, settings: Settings) -> None:
    """Decode ▶ prepare ▶ forward a 32×32 JPEG made in memory, through the same stages as any object."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 96, 64)).save(buf, format="JPEG")
    image = decode_image(buf.getvalue(), settings.max_image_pixels, name="the self-check image")
    model_stage.pack(model_stage.forward(loaded, model_stage.prepare(loaded, [image]), keep_features=False).h)


def _epoch(event_time: str) -> float:
    return parse_event_time(event_time).timestamp()


def _test_delay(batch_id: str) -> None:
    delay = os.environ.get(TEST_INFER_DELAY_ENV)
    if delay:
        log.warning("test hook %s: sleeping %s s in the model stage of batch %s", TEST_INFER_DELAY_ENV, delay, batch_id)
        time.sleep(float(delay))
