"""Why an image was refused: the short reasons that ``failures`` rows carry, and the error that carries them.

A refusal is permanent for that (bucket, key, etag): it becomes one row of the lake's failures
table and the rest of the batch is still indexed. Transient trouble (``StoreUnavailable``) is never
a refusal: the task is retried instead. ``crashed_worker`` is the one reason no exception carries: an
object whose batch of one kept killing the worker process, or making the forward raise (see
``workers.deliveries``).
"""
from __future__ import annotations

from dataclasses import dataclass

from hashing_models.decode import CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, UndecodableImage
from workers.messages import ObjectRef

# The reasons, as written in failures.reason (and as the label of the failures metric): the
# decoder's five (hashing_models.decode), the store's, and the worker's own.
TOO_LARGE = "too_large"  # over Settings.max_object_bytes, refused unread
MISSING = "missing"  # the object vanished between the event and the read
UNREADABLE = "unreadable"  # the store refuses to serve it (AccessDenied, an archived object, ...)
# Encoding it alone killed the worker process, or raised (its forward, its preparation), delivery after delivery.
CRASHED_WORKER = "crashed_worker"
REASONS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, CORRUPT, TOO_MANY_PIXELS, TOO_LARGE, MISSING, UNREADABLE, CRASHED_WORKER)


class ImageRejected(UndecodableImage):
    """An object that cannot be encoded, for a permanent ``reason`` (one of ``REASONS``); the
    decoder raises its base class, the read and decode stages this one.

    ``etag`` is the etag of the bytes that were read ("" when nothing was read: missing, refused, too
    large), so that the failure row names the version that failed, not the one the event announced."""

    def __init__(self, reason: str, detail: str, *, etag: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; use one of {REASONS}")
        super().__init__(reason, detail)
        self.etag = etag


@dataclass(frozen=True)
class Failure:
    """One refused object: becomes one row of the lake's failures table."""

    ref: ObjectRef
    etag: str  # the etag of the bytes read when a read happened, else the event's
    reason: str
    detail: str
