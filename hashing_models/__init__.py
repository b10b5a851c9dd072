"""hashing_models: deep hashing models (backbones, heads, losses), codes, evaluation and baselines.

``create_model`` and ``list_models`` are re-exported lazily: ``import hashing_models.codes`` must stay
cheap for the SQL layer and the CLI, so torch, timm and torchvision load only when a model is asked for.
"""
from __future__ import annotations

_LAZY = {"create_model": "registry", "list_models": "registry", "model_description": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
