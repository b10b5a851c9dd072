"""Checkpoints: one file holding a trained model's weights, resolved training config, metrics and model card.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``
(tensors, strings, numbers, lists and dicts only — loading never runs pickled code)::

    {"format": "hashlake-checkpoint/1", "arch": "csq_effnetlite0_64", "state_dict": {...},
     "config": {...resolved TrainConfig...}, "metrics": {"val_map": 0.71, ...}, "card": {...}}

``card`` has the fields of ``hashlake.catalog.ModelCard`` (version, arch, method, backbone, bits,
input_size, description, training, data, metrics, created_at), so publishing a checkpoint is
``Catalog.publish(ModelCard(**ckpt.card), ckpt.state_dict)``. Files are written to a temporary
name and renamed, so a crash never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones.weights import Pretrained
from .hash_model import HashModel
from .registry import ModelName, create_model

FORMAT = "hashlake-checkpoint/1"
_KEYS = ("format", "arch", "state_dict", "config", "metrics", "card")


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, not a checkpoint, or does not fit the model asked for."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint; see the module doc for what each part holds."""

    arch: str  # registry name <method>_<backbone>_<bits>
    state_dict: dict[str, torch.Tensor]  # the whole HashModel's weights (backbone + head)
    config: dict  # the resolved TrainConfig as a dict
    metrics: dict  # e.g. {"val_map": ..., "best_epoch": ...}
    card: dict  # ModelCard fields

    @property
    def bits(self) -> int:
        return ModelName.parse(self.arch).bits


def save_checkpoint(path: str | Path, model: HashModel, *, arch: str, config: dict, metrics: dict,
                    card: dict) -> Path:
    """Write ``model``'s weights with config, metrics and card to ``path`` (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "arch": arch,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "config": config, "metrics": metrics, "card": card}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, *, arch: str | None = None) -> Checkpoint:
    """Read a checkpoint; with ``arch``, also require that it holds that model (method, backbone, bits).

    Raises ``CheckpointError`` naming the file for a truncated or foreign file, and naming both
    architectures for a mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read — truncated or not a "
            f"torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "re-copy it or retrain"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a hashlake checkpoint (format {found!r}, expected {FORMAT!r}); "
                              "a bare state dict loads with create_model(name, checkpoint=path)")
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by save_checkpoint")
    if arch is not None and payload["arch"] != arch:
        _raise_mismatch(path, payload["arch"], arch)
    return Checkpoint(arch=payload["arch"], state_dict=payload["state_dict"], config=payload["config"],
                      metrics=payload["metrics"], card=payload["card"])


def _raise_mismatch(path: Path, found: str, expected: str) -> None:
    have, want = ModelName.parse(found), ModelName.parse(expected)
    what = [f"{field} {getattr(have, field)!r} ≠ {getattr(want, field)!r}"
            for field in ("method", "backbone", "bits") if getattr(have, field) != getattr(want, field)]
    raise CheckpointError(f"checkpoint {path} holds {found!r}, not {expected!r} ({', '.join(what)}); "
                          "load it with the model it was trained for")


def restore_into(model: HashModel, checkpoint: Checkpoint, source: str = "checkpoint") -> HashModel:
    """Load a checkpoint's weights into ``model`` strictly; a mismatch names the arch and the differing keys."""
    expected = f"{model.method}_{model.backbone_name}_{model.bits}"
    if checkpoint.arch != expected:
        _raise_mismatch(Path(source), checkpoint.arch, expected)
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} ({checkpoint.arch}) does not fit the model: {str(exc).splitlines()[0]} "
                              "— was it trained with another class count or head?") from None
    return model


def model_from_checkpoint(path: str | Path, *, arch: str | None = None) -> tuple[HashModel, Checkpoint]:
    """Build the checkpoint's model (no download: backbone weights come from the file) and load it."""
    checkpoint = load_checkpoint(path, arch=arch)
    config = checkpoint.config
    pretrained: Pretrained = False  # every weight is in the checkpoint; don't fetch ImageNet weights first
    model = create_model(checkpoint.arch, pretrained, img_size=config.get("img_size"),
                         num_classes=config.get("num_classes", 10), head=config.get("head"))
    return restore_into(model, checkpoint, str(path)), checkpoint
