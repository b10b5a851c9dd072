"""Losses that train through a binarization: GreedyHash (sign, straight-through) and unsupervised BiHalf."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..binarize import bi_half
from ..outputs import HashOutputs
from .base import HashLoss, off_diagonal


class GreedyHashLoss(HashLoss):
    """GreedyHash (Su et al., NeurIPS 2018): cross-entropy of the classifier on sign(h), plus
    ``alpha`` · mean | |h| − 1 |³, which keeps h near ±1 so the straight-through gradient is accurate.

    Needs ``outputs.logits`` from ``GreedyHashHead`` (the model does the sign). Multi-label: the
    target distribution spreads evenly over an image's labels.
    """

    def __init__(self, bits: int, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        if outputs.logits is None:
            raise ValueError("GreedyHashLoss needs outputs.logits: use a greedyhash_* model (GreedyHashHead)")
        labels = labels.float()
        target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
        classification = -(target * F.log_softmax(outputs.logits, dim=1)).sum(dim=1).mean()
        return classification + self.alpha * (outputs.h.abs() - 1).pow(3).abs().mean()


class BiHalfLoss(HashLoss):
    """Unsupervised BiHalf (Li & van Gemert, AAAI 2021): codes b = BiHalf(h) should preserve the
    cosine similarities of the backbone features, mean over pairs of (cos(b_i, b_j) − cos(f_i, f_j))².

    Features are centred on the batch mean first: pooled CNN features are non-negative, and
    uncentred all cosines would sit near 1 while code cosines span [−1, 1]. Labels are ignored.
    """

    def __init__(self, bits: int, gamma: float = 3.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, outputs: HashOutputs, labels: torch.Tensor | None = None, progress: float = 0.0) -> torch.Tensor:
        b = bi_half(outputs.h, self.gamma)  # (B, K) ±1, half of the batch on each side per bit
        features = outputs.features.detach()  # the targets; the hash layer must not reshape them
        features = F.normalize(features - features.mean(dim=0, keepdim=True), dim=1)
        code_cosine = b @ b.T / b.shape[1]  # (B, B)
        return off_diagonal((code_cosine - features @ features.T).pow(2)).mean()
