"""Backbone: the interface every feature extractor answers (pooled features, last three stage maps)."""
from __future__ import annotations

import torch
from torch import nn

from ..preprocess import InputConfig


class Backbone(nn.Module):
    """Images (B, 3, H, W) → pooled features (B, num_features); CNNs also give their last three stage maps.

    Subclasses set ``name``, ``num_features``, ``input_config`` and, when they support
    multi-stage features, ``stage_channels`` (channels of the three maps, shallow to deep).
    """

    name: str
    num_features: int
    input_config: InputConfig
    stage_channels: tuple[int, int, int] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) → (B, D)
        raise NotImplementedError

    def forward_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → three maps (B, C_s, H_s, W_s), strides increasing (e.g. 8, 16, 32)."""
        raise ValueError(
            f"backbone {self.name!r} has no multi-stage feature maps; "
            "multi-granularity models need a CNN backbone (resnet18, resnet50, vgg16, alexnet, effnetlite0)"
        )
