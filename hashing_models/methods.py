"""Hashing methods: for each, its head, which backbones and code lengths are registered, and a one-line description.

The matching loss of each method is ``losses.create_loss(method, …)``; this table holds what the
model needs, the losses package what training needs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .backbones import BACKBONES, CNN_BACKBONES, Backbone
from .codes import SUPPORTED_BITS
from .heads import (
    HEAD_FAMILIES,
    AttentionPoolHead,
    DivideEncodeHead,
    FixedProjectionHead,
    GreedyHashHead,
    LinearHashHead,
)

# Code lengths registered for trained methods (the literature's usual 16–64); lsh gets every supported one.
TRAINED_BITS = (16, 32, 48, 64)

# make_head(backbone, bits, num_classes, seed, family) → head module; family is one of the spec's head_families
HeadFactory = Callable[..., nn.Module]


def _linear(backbone: Backbone, bits: int, num_classes: int, seed: int, family: str = "linear") -> nn.Module:
    return LinearHashHead(backbone.num_features, bits, family)


def _greedy(backbone: Backbone, bits: int, num_classes: int, seed: int, family: str = "linear") -> nn.Module:
    return GreedyHashHead(backbone.num_features, bits, num_classes, family)


def _divide_encode(backbone: Backbone, bits: int, num_classes: int, seed: int, family: str = "linear") -> nn.Module:
    return DivideEncodeHead(backbone.num_features, bits)


def _projection(backbone: Backbone, bits: int, num_classes: int, seed: int, family: str = "linear") -> nn.Module:
    return FixedProjectionHead(backbone.num_features, bits, seed)


def _attention(backbone: Backbone, bits: int, num_classes: int, seed: int, family: str = "linear") -> nn.Module:
    if backbone.stage_channels is None:
        raise ValueError(f"method 'mga' needs a CNN backbone with stage maps ({CNN_BACKBONES}), not {backbone.name!r}")
    return AttentionPoolHead(backbone.stage_channels, bits)


@dataclass(frozen=True)
class MethodSpec:
    """How to build one hashing method's model."""

    name: str  # the first part of model names, e.g. "csq" in csq_resnet50_64
    description: str  # one line for listings
    make_head: HeadFactory
    multi_stage: bool = False  # the head reads three stage maps instead of pooled features
    trainable: bool = True  # False: fixed projection, used as built
    supervised: bool = True  # False: the loss ignores labels
    backbones: tuple[str, ...] = BACKBONES  # backbones registered for this method
    bits: tuple[int, ...] = TRAINED_BITS  # code lengths registered for this method
    # head families the method can be built with (heads.HEAD_FAMILIES); the first is the default.
    # Heads whose structure is the method (divide-and-encode, attention, fixed projection) have one.
    head_families: tuple[str, ...] = HEAD_FAMILIES

    def build_head(self, backbone: Backbone, bits: int, num_classes: int = 10, seed: int = 0,
                   family: str | None = None) -> nn.Module:
        """This method's head on ``backbone``; ``family`` None is the default family."""
        family = family or self.head_families[0]
        if family not in self.head_families:
            raise ValueError(f"method {self.name!r} has no {family!r} head; its head families: {self.head_families}")
        return self.make_head(backbone, bits, num_classes, seed, family)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("dsh", "DSH: pairwise contrastive loss with margin and L1 quantization (Liu et al., CVPR 2016)", _linear),
        MethodSpec("dpsh", "DPSH: pairwise likelihood of label similarity plus quantization (Li et al., IJCAI 2016)", _linear),
        MethodSpec("hashnet", "HashNet: weighted pairwise likelihood on tanh(beta*h), beta grows by continuation (Cao et al., ICCV 2017)", _linear),
        MethodSpec("dhn", "DHN: pairwise likelihood plus smooth log-cosh quantization (Zhu et al., AAAI 2016)", _linear),
        MethodSpec("csq", "CSQ: binary cross-entropy to Hadamard hash centres per class (Yuan et al., CVPR 2020)", _linear),
        MethodSpec("dpn", "DPN: bit-wise hinge polarization towards class hash centres (Fan et al., IJCAI 2020)", _linear),
        MethodSpec("orthohash", "OrthoHash: cross-entropy over cosine to orthogonal class codes with margin (Hoe et al., NeurIPS 2021)", _linear),
        MethodSpec("greedyhash", "GreedyHash: classifier on sign(h) with straight-through gradient, cubic penalty (Su et al., NeurIPS 2018)", _greedy),
        MethodSpec("bihalf", "BiHalf: unsupervised, batch median split per bit, feature-similarity preservation (Li & van Gemert, AAAI 2021)", _linear, supervised=False),
        MethodSpec("dnnh", "DNNH: divide-and-encode head with triplet ranking loss (Lai et al., CVPR 2015)", _divide_encode, head_families=("linear",)),
        MethodSpec("mga", "MGA: spatial attention on the last three CNN stages, pooled and concatenated, pairwise margin loss", _attention, multi_stage=True, backbones=CNN_BACKBONES, head_families=("linear",)),
        MethodSpec("lsh", "LSH: pretrained backbone + fixed seeded Gaussian projection, no training", _projection, trainable=False, supervised=False, bits=SUPPORTED_BITS, head_families=("linear",)),
    )
}
