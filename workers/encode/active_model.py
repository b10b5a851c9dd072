"""Model stage: the active model version, loaded once per process, and the batched forward → packed codes.

``ModelHandle`` follows the catalog's active pointer (or ``Settings.model_version`` when pinned):
the pointer is one small GET, made at most every ``check_interval_s``, and the weights are only
loaded again when it names another version. torch is imported inside the functions that need it,
so that importing this module stays cheap.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from hashing_models.codes import pack_signs
from hashlake.catalog import Catalog, ModelCard
from hashlake.config import Settings
from hashlake.model_versions import backbone_id, load_version
from hashlake.store import ObjectStore

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

# How stale the active pointer may be: a promotion reaches every worker within this many seconds,
# at the cost of one GET of ~30 bytes per interval (not per batch).
POINTER_CHECK_INTERVAL_S = 5.0


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    model: Any  # hashing_models HashModel (a torch.nn.Module in eval mode, on ``device``)
    device: "torch.device"
    backbone_id: str  # ``hashlake.model_versions.backbone_id`` of the model, computed once at load: the features' key

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def pooled_features(self) -> bool:
        """Whether the head reads pooled vectors (B, D), the features the lake keeps. A multi-stage
        ("mga") head reads three stage maps instead: nothing is kept for it (its backbone's pooled
        vector is no part of the maps, and the maps are too large to keep per image)."""
        return not self.model.multi_stage


class Forwarded(NamedTuple):
    h: "torch.Tensor"  # (B, bits) float32 on CPU: the continuous hash outputs
    features: np.ndarray | None  # (B, D) float16: the backbone's pooled features; None when not asked or multi-stage


def resolve_device(setting: str) -> "torch.device":
    """``Settings.device`` → a torch device: auto = the first CUDA device when present, else CPU."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Settings.device is {setting!r} but torch sees no CUDA device; use 'auto' or 'cpu'")
    return device


def load_model(catalog: Catalog, version: str, device: "torch.device") -> LoadedModel:
    """The version's model (``hashlake.model_versions.load_version``) on ``device``, with its card and backbone id."""
    model = load_version(catalog, version)
    ident = backbone_id(model)  # hashed on the CPU, before the move: the same id on any device
    return LoadedModel(catalog.card(version), model.to(device), device, ident)


class ModelHandle:
    """The model this process encodes with; ``current()`` is cheap to call once per batch."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None, *,
                 check_interval_s: float = POINTER_CHECK_INTERVAL_S):
        self.settings = settings
        self.catalog = Catalog(store or ObjectStore(settings), settings)
        self.check_interval_s = check_interval_s
        self.device = resolve_device(settings.device)
        self._loaded: LoadedModel | None = None
        self._staged: LoadedModel | None = None  # the last version a batch named that is not the followed one
        self._checked_at = float("-inf")  # time.monotonic() of the last pointer read
        self._lock = threading.Lock()

    def current(self, version: str | None = None) -> LoadedModel:
        """The model of the wanted version: ``version`` when a batch names one (a staged re-encode),
        else the pinned or active one, loaded again when the pointer moved.

        A named version is kept beside the followed one (one of each per process: a promotion's
        re-encode runs while live uploads still use the active version). Raises
        ``hashlake.catalog.ModelNotFound`` when no version is active, or the named or pinned one is
        missing: the caller retries later rather than dropping the batch.
        """
        with self._lock:
            if version is not None:  # named: the active pointer does not matter (there may be none yet)
                for loaded in (self._loaded, self._staged):
                    if loaded is not None and loaded.version == version:
                        return loaded
                self._staged = self._load(version)
                return self._staged
            now = time.monotonic()
            if self._loaded is None or now - self._checked_at >= self.check_interval_s:
                wanted = self.settings.model_version or self.catalog.active()
                if self._loaded is None or self._loaded.version != wanted:
                    if self._staged is not None and self._staged.version == wanted:
                        self._loaded, self._staged = self._staged, None  # promoted: already in memory
                    else:
                        self._loaded = self._load(wanted)
                self._checked_at = now
            return self._loaded

    def _load(self, version: str) -> LoadedModel:
        started = time.perf_counter()
        loaded = load_model(self.catalog, version, self.device)
        log.info("loaded model version %s (%s, %d bits, %d px) on %s in %.1f s", version, loaded.card.arch,
                 loaded.card.bits, loaded.card.input_size, self.device, time.perf_counter() - started)
        return loaded


def prepare(loaded: LoadedModel, images: list["Image.Image"]) -> "torch.Tensor":
    """PIL images → the model's normalized input batch (B, 3, S, S), float32 on CPU."""
    from hashing_models.preprocess import prepare_images

    return prepare_images(images, loaded.model.input_config)


def forward(loaded: LoadedModel, pixels: "torch.Tensor", *, keep_features: bool = True) -> Forwarded:
    """Batched forward in inference mode: (B, 3, S, S) → continuous hash outputs h (B, bits) on CPU and,
    when ``keep_features`` and the model's head reads pooled vectors, the backbone's pooled features
    (B, D) as float16 numpy. The backbone runs once: ``forward_features`` then ``forward_head`` on its
    float32 output, exactly what ``model(pixels)`` computes; the codes come from the float32 features,
    the kept copy is rounded to float16 (what a retrained head is trained on and re-encodes from)."""
    import torch

    model = loaded.model
    with torch.inference_mode():
        features = model.forward_features(pixels.to(loaded.device, non_blocking=True))
        out = model.forward_head(features)
        kept = None
        if keep_features and loaded.pooled_features:
            kept = features.to(torch.float16).cpu().numpy()  # rounded on the device: half the transfer
    return Forwarded(out.h.float().cpu(), kept)


def pack(h: "torch.Tensor") -> np.ndarray:
    """Sign and pack per the codes contract: (B, bits) → (B, bits/8) uint8, bit i = h[:, i] > 0, MSB first."""
    return pack_signs(h)
