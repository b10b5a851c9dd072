"""Vision Transformer backbones: torchvision ViT-B/16 (ImageNet weights) and a small ViT for 32 px images trained from scratch."""
from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from ..preprocess import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputConfig,
)
from .base import Backbone
from .weights import Pretrained, download_state_dict, load_into, read_state_dict


class ViTB16Backbone(Backbone):
    """torchvision ViT-B/16: (B, 3, S, S) → class token (B, 768); S a multiple of 16.

    Pretrained weights made for another size (224 for IMAGENET1K_V1) get their position
    embeddings interpolated to S, as torchvision does for fine-tuning at a new resolution.
    """

    name = "vitb16"
    num_features = 768

    def __init__(self, pretrained: Pretrained = False, img_size: int = 224) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"vitb16 needs img_size divisible by 16 (patch size), got {img_size}")
        net = torchvision.models.vit_b_16(weights=None, image_size=img_size)
        if pretrained is True:
            weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
            state, source = download_state_dict(self.name, lambda: weights.get_state_dict(progress=False)), str(weights)
        elif pretrained:
            state, source = read_state_dict(pretrained), str(pretrained)
        if pretrained:
            state = interpolate_embeddings(img_size, 16, state)  # no-op when sizes already match
            load_into(net, state, source)
        net.heads = nn.Identity()  # forward now returns the class token's final representation
        self.net = net
        self.input_config = InputConfig(size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 768)


class ViTSmall32Backbone(Backbone):
    """A small ViT for CIFAR-sized inputs, trained from scratch: 4 px patches, width 384, depth 6, 6 heads.

    (B, 3, S, S) → class token (B, 384); S a multiple of 4 (default 32 → 64 tokens + class token).
    Depth 6 instead of ViT-S's 12 keeps it trainable on small data and fast on CPU.
    Pretrained: only a local file of this model's own state dict (no published weights exist).
    """

    name = "vitsmall32"
    num_features = 384

    def __init__(self, pretrained: Pretrained = False, img_size: int = 32) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"vitsmall32 needs img_size divisible by 4 (patch size), got {img_size}")
        self.net = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size, patch_size=4, embed_dim=384, depth=6, num_heads=6, num_classes=0
        )
        if pretrained is True:
            raise ValueError(
                "vitsmall32 has no published ImageNet weights (it is trained from scratch); "
                "pass pretrained='/path/to/vitsmall32.pth' or pretrained=False"
            )
        if pretrained:
            load_into(self.net, read_state_dict(pretrained), str(pretrained))
        self.input_config = InputConfig(size=img_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, interpolation="bilinear")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 384)
