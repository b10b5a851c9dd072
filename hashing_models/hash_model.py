"""HashModel: backbone + hash head behind the calls every hashing model answers (forward, encode, freeze)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import codes
from .backbones import Backbone
from .heads import pool_stage_maps
from .outputs import HashOutputs
from .preprocess import InputConfig

# Features a head consumes: pooled vectors (B, D), or three stage maps (B, C_s, H_s, W_s) for "mga".
Features = torch.Tensor | tuple[torch.Tensor, ...]


class HashModel(nn.Module):
    """A deep hashing model: images → continuous outputs ``h`` (B, bits) for training, packed codes for search.

    - ``forward(images) -> HashOutputs`` (h, features, and logits for classifier-aided heads)
    - ``forward_features(images)`` / ``forward_head(features)``: the two halves, so a trainer can
      cache backbone features once and train the head alone.
    - ``encode(images) -> np.ndarray (B, bits // 8) uint8``: codes packed by ``codes.pack_signs``.
    """

    def __init__(
        self, backbone: Backbone, head: nn.Module, *, method: str, bits: int, multi_stage: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.method = method
        self.bits = codes.check_bits(bits)
        self.multi_stage = multi_stage  # the head reads the last three stage maps instead of pooled features
        self.backbone_frozen = False

    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    @property
    def input_config(self) -> InputConfig:
        return self.backbone.input_config

    def forward_features(self, images: torch.Tensor) -> Features:
        """(B, 3, S, S) → pooled features (B, D), or for multi-stage models three maps (B, C_s, H_s, W_s)."""
        if self.multi_stage:
            return self.backbone.forward_stages(images)
        return self.backbone(images)

    def forward_head(self, features: Features) -> HashOutputs:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> HashOutputs:
        return self.forward_head(self.forward_features(images))

    def encode(self, images: torch.Tensor) -> np.ndarray:
        """Normalized images (B, 3, S, S) → packed codes (B, bits // 8) uint8, bit i = h[:, i] > 0.

        Runs in eval mode (BatchNorm running statistics, no dropout) whatever the current mode,
        so a code does not depend on its batch; the previous mode is restored.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                device = next(self.parameters()).device
                h = self(images.to(device)).h
        finally:
            self.train(was_training)
        return codes.pack_signs(h)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or resume) training the backbone: no gradients, and BatchNorm statistics kept fixed.

        Stage 1 of two-stage training (head only on a frozen backbone), then ``freeze_backbone(False)``
        to fine-tune end to end.
        """
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> HashModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # a frozen backbone must not update BatchNorm running statistics
        return self

    def cacheable_features(self, features: Features, grid: int = 4) -> Features:
        """Features in the form a frozen-backbone trainer stores on disk; ``forward_head`` accepts it.

        Pooled vectors are returned as they are. Stage maps are average-pooled to at most
        grid×grid cells: full maps are too large to cache (ResNet-50 at 224 px: 0.7 M floats per
        image), while a 4×4 grid costs ΣC_s·16 floats (ResNet-50: 57 k) and keeps where in the
        image each stage responds, which the attention needs. The head is then trained on grids
        and applied to full maps when fine-tuning and encoding.
        """
        if isinstance(features, tuple):
            return pool_stage_maps(features, grid)
        return features
