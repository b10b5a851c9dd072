"""What travels through the broker: batches of object references, as plain JSON.

Tasks take ids and references, never objects (JSON serializer only). The intake builds these,
the encode and tombstone tasks consume them.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

# Task names are part of the wire format: the intake sends by name without importing the workers.
ENCODE_TASK = "hashlake.encode_batch"
TOMBSTONE_TASK = "hashlake.tombstone_batch"


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str  # decoded (not URL-encoded) object name
    etag: str = ""  # "" when the event carried none (deletes); the worker reads the real one
    size: int | None = None
    event_time: str | None = None  # ISO 8601 from the event (milliseconds)
    # Orders the versions of a key and its deletes, in ns since the epoch: MinIO's sequencer when the
    # event carried one, else the event's or the listing's time. None: unknown (the read's time is used).
    mtime_ns: int | None = None
    version_id: str | None = None  # a versioned bucket's version id; for a delete, the version removed


@dataclass(frozen=True)
class Batch:
    kind: str  # "encode" | "delete"
    objects: tuple[ObjectRef, ...]
    enqueued_at: float = field(default_factory=time.time)  # epoch s, for event-to-queryable latency
    # Worker-process deaths these objects already went through in the larger batches this one was split
    # from (see workers.deliveries); 0 for a batch from the intake. Not part of the batch's identity.
    crashes: int = 0
    # Encode under this model version (a staged re-encode before a promotion: ``hashlake model
    # promote``); None: the version the worker follows (pinned, else active) when it runs the batch.
    model_version: str | None = None

    @property
    def batch_id(self) -> str:
        # Derived from content: a re-sent batch (duplicate event, retry) has the same id. Deletes
        # carry no etag; their time and version are part of their identity.
        if self.kind == "delete":
            return batch_id_for((o.bucket, o.key, f"{o.mtime_ns or o.event_time or ''}/{o.version_id or ''}/{o.etag}")
                                for o in self.objects)
        return batch_id_for((o.bucket, o.key, o.etag) for o in self.objects)

    @property
    def delivery_key(self) -> str:
        """The batch's name in the delivery ledger (workers.deliveries): its id, and for a staged batch
        its version too, so that the same objects queued for two versions are counted apart."""
        return self.batch_id if self.model_version is None else f"{self.model_version}/{self.batch_id}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "batch_id": self.batch_id, "enqueued_at": self.enqueued_at,
                "crashes": self.crashes, "model_version": self.model_version,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict) -> "Batch":
        try:
            kind = data["kind"]
            objects = tuple(ObjectRef(**o) for o in data["objects"])
            crashes = int(data.get("crashes", 0))
            model_version = data.get("model_version")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed batch message ({exc}): {str(data)[:200]}") from None
        if kind not in ("encode", "delete"):
            raise ValueError(f"malformed batch message: unknown kind {kind!r}")
        if model_version is not None and (not isinstance(model_version, str) or not model_version):
            raise ValueError(f"malformed batch message: model_version {model_version!r} is not a version id")
        return cls(kind=kind, objects=objects, enqueued_at=float(data.get("enqueued_at", time.time())),
                   crashes=crashes, model_version=model_version)


def batch_id_for(objects: Iterable[tuple[str, str, str]]) -> str:
    """A stable id for a batch of (bucket, key, etag): same set, same id, whatever the order."""
    digest = hashlib.sha256()
    for bucket, key, etag in sorted(set(objects)):
        digest.update(f"{bucket}\0{key}\0{etag}\n".encode())
    return digest.hexdigest()[:24]
