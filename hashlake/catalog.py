"""Model versions and the active pointer, kept in the index bucket.

    models/<version>/weights.pt   state dict, loaded with torch.load(weights_only=True)
    models/<version>/card.json    ModelCard: what the weights are and how they were made
    models/ACTIVE                 {"version": "..."}: one small object, replaced in one PUT

A version is immutable: publishing over an existing version is refused.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from hashlake.config import Settings
from hashlake.store import ObjectMissing, ObjectStore

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
        return cls(**json.loads(text))


def check_version(version: str) -> str:
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: use lowercase letters, digits, '.', '_', '-'")
    return version


class Catalog:
    def __init__(self, store: ObjectStore, settings: Settings):
        self.store = store
        self.bucket = settings.index_bucket

    def publish(self, card: ModelCard, state_dict: dict) -> None:
        """Store weights then card (the card's presence marks the version complete)."""
        import torch

        check_version(card.version)
        if self.store.exists(self.bucket, f"{MODELS_PREFIX}{card.version}/card.json"):
            raise FileExistsError(f"model version {card.version!r} already exists; versions are immutable")
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        self.store.put(self.bucket, f"{MODELS_PREFIX}{card.version}/weights.pt", buf.getvalue())
        self.store.put(self.bucket, f"{MODELS_PREFIX}{card.version}/card.json",
                       json.dumps(asdict(card), indent=2).encode(), content_type="application/json")

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

    def active(self) -> str:
        """The active version id; ``ModelNotFound`` when none was ever activated."""
        try:
            body, _ = self.store.get(self.bucket, ACTIVE_KEY)
        except ObjectMissing:
            raise ModelNotFound(
                f"no active model: s3://{self.bucket}/{ACTIVE_KEY} is missing; run `hashlake model init`"
            ) from None
        return json.loads(body)["version"]

    def activate(self, version: str) -> None:
        self.card(version)  # refuse to point at a version that does not exist
        self.store.put(self.bucket, ACTIVE_KEY, json.dumps({"version": version}).encode(),
                       content_type="application/json")
