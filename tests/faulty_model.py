"""A registered model whose forward raises on some inputs, for the tests of a failing forward.

``faulty_effnetlite0_64`` is ``lsh_effnetlite0_64`` (same weights, same codes) except that its forward
raises ``ValueError`` on any batch holding a flat image (every pixel the same colour), as a model with
a numerical bug on degenerate inputs would; ``faultyprep_effnetlite0_64``'s preprocessing fails on
every image. Importing this module registers it; a Celery worker loads
it with ``--include faulty_model`` (with this folder on PYTHONPATH).
"""
from __future__ import annotations

import torch

from hashing_models import create_model
from hashing_models.registry import register_model


class _FaultyForward:
    # the backbone half: the worker's forward (forward_features, then forward_head) and model(images) both raise
    def forward_features(self, images: torch.Tensor):  # images (B, 3, S, S)
        flat = images.flatten(1).std(dim=1) < 1e-6  # (B,)
        if bool(flat.any()):
            raise ValueError(f"faulty model: {int(flat.sum())} flat image(s) in a batch of {len(images)}")
        return super().forward_features(images)


@register_model
def faulty_effnetlite0_64(pretrained=False, **kwargs):
    """lsh_effnetlite0_64 whose forward raises on a batch holding a flat image (tests only)."""
    model = create_model("lsh_effnetlite0_64", pretrained=pretrained, **kwargs)
    model.__class__ = type("FaultyHashModel", (_FaultyForward, model.__class__), {})
    return model


@register_model
def faultyprep_effnetlite0_64(pretrained=False, **kwargs):
    """lsh_effnetlite0_64 whose input config is broken (a 2-channel mean): preparing any image raises,
    as a preprocessing bug would (tests only)."""
    from dataclasses import replace

    model = create_model("lsh_effnetlite0_64", pretrained=pretrained, **kwargs)
    broken = replace(model.input_config, mean=(0.5, 0.5))
    model.__class__ = type("FaultyPrepHashModel", (model.__class__,), {"input_config": property(lambda self: broken)})
    return model
