"""Loading backbone weights: from a local checkpoint file, or a library download with an offline-friendly error."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# What ``pretrained`` may be: False (random init), True (the library's ImageNet weights), or a file path.
Pretrained = bool | str | Path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``; unwrap {"state_dict": …}/{"model": …}; drop DataParallel's "module." prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` into ``module``; on mismatch name the source and the first differing keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = set(module.state_dict())
        missing = sorted(expected - set(state))[:5]
        unexpected = sorted(set(state) - expected)[:5]
        raise ValueError(
            f"weights from {source} do not fit {type(module).__name__}: missing {missing}, "
            f"unexpected {unexpected} (first 5 each); {str(exc).splitlines()[0]}"
        ) from None


def download_state_dict(backbone: str, fetch: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Run the library's own download (``fetch``); if it fails, say how to pass a local file instead."""
    try:
        return fetch()
    except OSError as exc:  # URLError, socket errors, permission errors on the cache dir
        raise RuntimeError(
            f"could not download ImageNet weights for backbone {backbone!r} ({exc}); this machine may be "
            f"offline: download the checkpoint elsewhere and pass pretrained='/path/to/{backbone}.pth'"
        ) from exc
