"""Hash heads: backbone features → continuous hash outputs ``h`` (B, bits), one head per kind of method.

Every head's ``forward(features)`` works standalone on pre-computed features, so a trainer can
train a head alone on a cached (N, D) feature matrix (or, for the attention head, cached stage maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import sign_straight_through
from .outputs import HashOutputs


class LinearHashHead(nn.Module):
    """One fully connected hash layer: (B, D) → h (B, bits). Used by most supervised methods."""

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        self.hash = nn.Linear(in_features, bits)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        return HashOutputs(h=self.hash(features), features=features)


class GreedyHashHead(LinearHashHead):
    """GreedyHash (Su et al., NeurIPS 2018): hash layer, then a classifier that sees sign(h).

    The sign's gradient is passed straight through, so the classification loss trains the hash
    layer as if the network were binary end to end. ``logits`` (B, num_classes).
    """

    def __init__(self, in_features: int, bits: int, num_classes: int) -> None:
        super().__init__(in_features, bits)
        self.classifier = nn.Linear(bits, num_classes)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        h = self.hash(features)
        return HashOutputs(h=h, features=features, logits=self.classifier(sign_straight_through(h)))


class DivideEncodeHead(nn.Module):
    """DNNH's divide-and-encode module (Lai et al., CVPR 2015): bit i sees only slice i of the features.

    (B, D) → (B, bits): features are cut into ``bits`` equal slices of D // bits values (the
    remainder is dropped), and each slice is mapped to one output, which makes bits less redundant.
    """

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        if in_features < bits:
            raise ValueError(f"divide-and-encode needs at least one feature per bit: {in_features} features, {bits} bits")
        self.bits, self.slice = bits, in_features // bits
        self.weight = nn.Parameter(torch.randn(bits, self.slice) / self.slice**0.5)  # (bits, D // bits)
        self.bias = nn.Parameter(torch.zeros(bits))

    def forward(self, features: torch.Tensor) -> HashOutputs:
        slices = features[:, : self.bits * self.slice].reshape(-1, self.bits, self.slice)  # (B, bits, D // bits)
        return HashOutputs(h=(slices * self.weight).sum(-1) + self.bias, features=features)


class FixedProjectionHead(nn.Module):
    """Locality-sensitive hashing: a fixed Gaussian projection (D, bits) drawn from ``seed``; nothing to train.

    sign(x · P) approximates the angle between feature vectors (Charikar's SimHash), so codes
    from a pretrained backbone are useful without any training. P is a buffer: saved with the
    model, never updated by an optimiser.
    """

    def __init__(self, in_features: int, bits: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(in_features, bits, generator=generator))  # (D, bits)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        return HashOutputs(h=features @ self.projection, features=features)


class AttentionPoolHead(nn.Module):
    """Multi-granularity attention head ("mga"): three stage maps → attention-pooled, concatenated → h.

    For each stage s with map F_s (B, C_s, H_s, W_s): A_s = sigmoid(conv1x1(F_s)) (B, 1, H_s, W_s),
    pooled_s = mean over H_s·W_s of A_s ⊙ F_s (B, C_s). Concatenating the three gives (B, ΣC_s),
    which a linear layer maps to (B, bits). The 1×1 convolutions are pointwise, so the head
    accepts maps of any spatial size (full-size maps, or the pooled grids a frozen-backbone
    trainer caches, see ``HashModel.cacheable_features``).
    """

    def __init__(self, stage_channels: tuple[int, int, int], bits: int) -> None:
        super().__init__()
        self.attention = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1) for c in stage_channels)
        self.hash = nn.Linear(sum(stage_channels), bits)

    def attention_maps(self, stages: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Each stage's spatial attention (B, 1, H_s, W_s) in (0, 1); for inspection and plots."""
        return [torch.sigmoid(conv(fmap)) for conv, fmap in zip(self.attention, stages)]

    def forward(self, stages: tuple[torch.Tensor, ...]) -> HashOutputs:
        if len(stages) != len(self.attention):
            raise ValueError(f"attention head expects {len(self.attention)} stage maps, got {len(stages)}")
        pooled = [(a * fmap).mean(dim=(2, 3)) for a, fmap in zip(self.attention_maps(stages), stages)]
        features = torch.cat(pooled, dim=1)  # (B, ΣC_s)
        return HashOutputs(h=self.hash(features), features=features)


def pool_stage_maps(stages: tuple[torch.Tensor, ...], grid: int) -> tuple[torch.Tensor, ...]:
    """Average-pool each stage map to at most grid×grid cells (maps already smaller stay as they are)."""
    return tuple(
        F.adaptive_avg_pool2d(fmap, (min(grid, fmap.shape[2]), min(grid, fmap.shape[3]))) for fmap in stages
    )
