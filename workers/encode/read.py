"""Read stage: fetch a batch's objects from the store, concurrently, on one thread pool per process.

The pool is created once per process (and per size) and reused by every batch: creating threads
per batch costs ~1 ms per thread and, worse, warms no connection pool. Keyed by pid as well, since
a pool created before a fork has no threads in the child.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from hashlake.store import ObjectInfo, ObjectMissing, ObjectRefused, ObjectStore, ObjectTooLarge
from workers.encode.rejects import EMPTY, MISSING, TOO_LARGE, UNREADABLE, ImageRejected
from workers.messages import ObjectRef


@dataclass(frozen=True)
class Fetched:
    ref: ObjectRef
    body: bytes
    info: ObjectInfo  # etag, size, last_modified and user metadata (labels) as the store has them now


def read_object(store: ObjectStore, ref: ObjectRef, max_bytes: int) -> Fetched:
    """One object's bytes and info. Raises ``ImageRejected`` (missing, too large, empty) for
    permanent conditions; ``StoreUnavailable`` passes through so that the task is retried."""
    try:
        body, info = store.get(ref.bucket, ref.key, max_bytes=max_bytes)
    except ObjectMissing as exc:
        raise ImageRejected(MISSING, str(exc)) from None
    except ObjectTooLarge as exc:
        raise ImageRejected(TOO_LARGE, str(exc)) from None
    except ObjectRefused as exc:
        raise ImageRejected(UNREADABLE, str(exc)) from None
    if not body:
        raise ImageRejected(EMPTY, f"s3://{ref.bucket}/{ref.key} is a zero-byte object", etag=info.etag)
    return Fetched(ref, body, info)


def io_pool(threads: int) -> ThreadPoolExecutor:
    """The process's thread pool for downloads and decoding (``Settings.download_concurrency``)."""
    return _pool(os.getpid(), threads)


def start_io_threads(threads: int) -> None:
    """Start every thread of the process's pool now (a worker calls it once per pool process, before
    any batch), instead of on demand mid-batch: a batch that exhausts the process's memory then gets a
    MemoryError from the allocation that failed, never a failed or hung thread start elsewhere."""
    barrier = threading.Barrier(threads)  # each task holds its thread until all of them run at once
    for future in [io_pool(threads).submit(barrier.wait, 30.0) for _ in range(threads)]:
        future.result()


@lru_cache(maxsize=4)
def _pool(pid: int, threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"hashlake-io-{pid}")
