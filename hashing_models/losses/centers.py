"""Losses towards fixed per-class hash centres: CSQ (BCE), DPN (bit-wise hinge), OrthoHash (cosine CE with margin).

Centres are ±1 codes far apart: rows of a Hadamard matrix and their negations when 2·bits ≥
classes, seeded Bernoulli codes otherwise. A multi-label image's target is the sign of the sum of
its labels' centres (ties broken by a fixed seeded ±1 vector).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..outputs import HashOutputs
from .base import HashLoss
from .hadamard import hadamard

_BERNOULLI_DRAWS = 20  # random centre sets tried; the one with the largest minimum distance wins


def make_hash_centers(num_classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """(num_classes, bits) ±1 float centres, pairwise Hamming distance ≥ bits/2 when from Hadamard."""
    if 2 * bits >= num_classes:
        try:
            rows = hadamard(bits)
        except ValueError:
            rows = None  # no Hadamard matrix of this order: fall through to random centres
        if rows is not None:
            return torch.cat([rows, -rows], 0)[:num_classes]
    generator = torch.Generator().manual_seed(seed)
    best, best_distance = None, -1.0
    for _ in range(_BERNOULLI_DRAWS):
        candidate = torch.randint(0, 2, (num_classes, bits), generator=generator).float() * 2 - 1
        distance = torch.cdist(candidate, candidate, p=1) / 2  # Hamming distances (C, C)
        distance.fill_diagonal_(bits)
        if distance.min().item() > best_distance:
            best, best_distance = candidate, distance.min().item()
    return best


class _CenterLoss(HashLoss):
    """Holds the centres and gives each image's target code."""

    def __init__(self, bits: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("centers", make_hash_centers(num_classes, bits, seed))  # (C, K)
        tie_break = torch.randint(0, 2, (bits,), generator=torch.Generator().manual_seed(seed + 1)).float() * 2 - 1
        self.register_buffer("tie_break", tie_break)  # (K,)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) multi-hot → (B, K) ±1 target codes: the centre, or sign of the sum of centres."""
        total = labels.float() @ self.centers  # (B, K)
        return torch.where(total == 0, self.tie_break.expand_as(total), total.sign())


class CSQLoss(_CenterLoss):
    """CSQ (Yuan et al., CVPR 2020): BCE between (tanh h + 1)/2 and the target centre's bits, plus
    ``lam`` · mean (|tanh h| − 1)². BCE on (tanh h + 1)/2 equals BCE-with-logits on 2h (stable)."""

    def __init__(self, bits: int, num_classes: int, lam: float = 1e-4, seed: int = 0) -> None:
        super().__init__(bits, num_classes, seed)
        self.lam = lam

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        h = outputs.h
        target_bits = (self.targets(labels) + 1) / 2  # (B, K) in {0, 1}
        center = F.binary_cross_entropy_with_logits(2 * h, target_bits)
        return center + self.lam * (torch.tanh(h).abs() - 1).pow(2).mean()


class DPNLoss(_CenterLoss):
    """DPN (Fan et al., IJCAI 2020): bit-wise polarization, mean over bits of max(margin − h_k·t_k, 0).

    Each output is pushed past ±margin on the side of its target centre's bit, which both
    fits the centre and quantizes, with no separate quantization term.
    """

    def __init__(self, bits: int, num_classes: int, margin: float = 1.0, seed: int = 0) -> None:
        super().__init__(bits, num_classes, seed)
        self.margin = margin

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        return F.relu(self.margin - outputs.h * self.targets(labels)).mean()


class OrthoHashLoss(_CenterLoss):
    """OrthoHash (Hoe et al., NeurIPS 2021): cross-entropy over ``scale`` · (cos(h, c_j) − margin·y_j).

    The class codes c_j are the (orthogonal) centres; maximizing cosine to one's own code is
    maximizing Hamming agreement. Multi-label: the target distribution spreads evenly over an
    image's labels, each with the margin.
    """

    def __init__(self, bits: int, num_classes: int, scale: float = 8.0, margin: float = 0.2, seed: int = 0) -> None:
        super().__init__(bits, num_classes, seed)
        self.scale, self.margin = scale, margin

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        labels = labels.float()
        cosine = F.normalize(outputs.h, dim=1) @ F.normalize(self.centers, dim=1).T  # (B, C)
        logits = self.scale * (cosine - self.margin * labels)
        target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
