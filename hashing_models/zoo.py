"""Every registered model variant: one entrypoint per method × backbone × bits, all built by ``_create_hash_model``.

Written as a loop rather than 338 three-line functions; each entrypoint is still a named
function (``csq_resnet50_64``) that only assembles arguments, listable via ``list_models``.
"""
from __future__ import annotations

from pathlib import Path

from .backbones import Pretrained, create_backbone
from .backbones.weights import load_into, read_state_dict
from .methods import METHODS
from .hash_model import HashModel
from .registry import ModelEntrypoint, register_model


def _create_hash_model(
    method: str,
    backbone: str,
    bits: int,
    pretrained: Pretrained = False,
    *,
    img_size: int | None = None,
    num_classes: int = 10,
    seed: int = 0,
    head: str | None = None,
    checkpoint: str | Path | None = None,
) -> HashModel:
    """Build backbone and head for ``method`` (``head``: its head family, None the method's default);
    load a whole-model ``checkpoint`` last when given."""
    spec = METHODS[method]
    trunk = create_backbone(backbone, pretrained, img_size)
    hash_head = spec.build_head(trunk, bits, num_classes, seed, head)
    model = HashModel(trunk, hash_head, method=method, bits=bits, multi_stage=spec.multi_stage)
    if checkpoint is not None:
        load_into(model, read_state_dict(checkpoint), str(checkpoint))
    return model


def _variant(method: str, backbone: str, bits: int) -> ModelEntrypoint:
    def entrypoint(pretrained: Pretrained = False, **kwargs) -> HashModel:
        return _create_hash_model(method, backbone, bits, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{method}_{backbone}_{bits}"
    entrypoint.__doc__ = f"{METHODS[method].description}. Backbone {backbone}, {bits} bits."
    return entrypoint


for _spec in METHODS.values():
    for _backbone in _spec.backbones:
        for _bits in _spec.bits:
            register_model(_variant(_spec.name, _backbone, _bits))
