"""Model versions and the active pointer, kept in the index bucket.

    models/<version>/weights.pt   state dict, loaded with torch.load(weights_only=True)
    models/<version>/card.json    ModelCard: what the weights are and how they were made
    models/ACTIVE                 {"version": "...", "previous": "..."}: one small object, replaced in one PUT

The pointer also names the version it replaced (``previous``: what ``hashlake model rollback`` goes back
to), in the same object, so the two can never disagree: activating V when A is active writes
{"version": V, "previous": A}; re-activating the active version changes nothing. A pointer written
before ``previous`` existed reads as having none.

A version is immutable: publishing is a conditional create of both objects (``ObjectStore.create``,
``If-None-Match: *``), weights first, so of two publishers of one version id exactly one writes
anything, and the other gets ``FileExistsError``. A card written by a newer hashlake, with fields this
one does not know, loads with a warning (the unknown fields dropped), so workers can be upgraded one
at a time while new versions are published.
"""
from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone

from hashlake.config import Settings
from hashlake.store import ObjectExists, ObjectMissing, ObjectStore

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/"
ACTIVE_KEY = "models/ACTIVE"
_VERSION_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")


class ModelNotFound(LookupError):
    """The requested model version, or any active version, does not exist in the catalog."""


@dataclass(frozen=True)
class ModelCard:
    version: str  # e.g. "lsh_effnetlite0_64.2026-11-22" — also the codes/ folder name
    arch: str  # hashing_models registry name, e.g. "lsh_effnetlite0_64"
    method: str
    backbone: str
    bits: int
    input_size: int  # px, square
    description: str
    training: dict = field(default_factory=dict)  # resolved trainer config, empty for untrained heads
    data: str = ""  # what it was trained on
    metrics: dict = field(default_factory=dict)  # e.g. {"map_cifar10_all": 0.71}
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        """A card as ``card.json`` holds it. Fields this version does not know are dropped with a
        warning (a newer publisher's); a missing required field is a ``ValueError`` naming it."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"model card must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("model card of version %r has fields this hashlake does not know, ignored: %s "
                        "(written by a newer hashlake? upgrade this process to use them)", data.get("version"),
                        ", ".join(unknown))
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model card of version {data.get('version')!r} lacks the field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def check_version(version: str) -> str:
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: use lowercase letters, digits, '.', '_', '-'")
    return version


class Catalog:
    def __init__(self, store: ObjectStore, settings: Settings):
        self.store = store
        self.bucket = settings.index_bucket

    def publish(self, card: ModelCard, state_dict: dict) -> None:
        """Create weights, then card (the card's presence marks the version complete), each only if
        absent. ``FileExistsError`` when the version exists, or another publisher got there first."""
        import torch

        check_version(card.version)
        folder = f"{MODELS_PREFIX}{card.version}/"
        if self.store.exists(self.bucket, f"{folder}card.json"):  # the common refusal, before serializing
            raise FileExistsError(f"model version {card.version!r} already exists; versions are immutable")
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        try:
            self.store.create(self.bucket, f"{folder}weights.pt", buf.getvalue())
        except ObjectExists:
            raise FileExistsError(
                f"model version {card.version!r} is being published by someone else, or was and never finished "
                f"(s3://{self.bucket}/{folder}weights.pt exists without a card.json); versions are immutable: "
                f"publish under another version id") from None
        try:
            self.store.create(self.bucket, f"{folder}card.json", json.dumps(asdict(card), indent=2).encode(),
                              content_type="application/json")
        except ObjectExists:
            raise FileExistsError(f"model version {card.version!r} already exists; versions are immutable") from None

    def card(self, version: str) -> ModelCard:
        try:
            body, _ = self.store.get(self.bucket, f"{MODELS_PREFIX}{version}/card.json")
        except ObjectMissing:
            raise ModelNotFound(f"model version {version!r} not found in s3://{self.bucket}/{MODELS_PREFIX}") from None
        return ModelCard.from_json(body.decode())

    def weights(self, version: str) -> dict:
        import torch

        try:
            body, _ = self.store.get(self.bucket, f"{MODELS_PREFIX}{version}/weights.pt")
        except ObjectMissing:
            raise ModelNotFound(f"weights of model version {version!r} not found") from None
        try:
            return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise ValueError(f"weights of model version {version!r} are unreadable: {exc}") from exc

    def versions(self) -> list[str]:
        return sorted({o.key.split("/")[1] for o in self.store.list(self.bucket, MODELS_PREFIX)
                       if o.key.endswith("/card.json")})

    def _pointer(self) -> dict | None:
        try:
            body, _ = self.store.get(self.bucket, ACTIVE_KEY)
        except ObjectMissing:
            return None
        return json.loads(body)

    def active(self) -> str:
        """The active version id; ``ModelNotFound`` when none was ever activated."""
        pointer = self._pointer()
        if pointer is None:
            raise ModelNotFound(
                f"no active model: s3://{self.bucket}/{ACTIVE_KEY} is missing; run `hashlake model init`")
        return pointer["version"]

    def previous(self) -> str | None:
        """The version that was active before the active one (what a rollback returns to); None when
        there is none (never activated, activated once, or a pointer written before this was kept)."""
        pointer = self._pointer()
        return (pointer or {}).get("previous") or None

    def activate(self, version: str) -> None:
        """Point the active pointer at ``version``, recording the version it replaces as ``previous``
        (re-activating the active version keeps the pointer as it is)."""
        self.card(version)  # refuse to point at a version that does not exist
        pointer = self._pointer() or {}
        current = pointer.get("version")
        if current == version:
            return
        body = {"version": version, **({"previous": current} if current else {})}
        self.store.put(self.bucket, ACTIVE_KEY, json.dumps(body).encode(), content_type="application/json")
