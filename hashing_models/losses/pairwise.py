"""Pairwise losses: similar images (sharing a label) get close codes, dissimilar ones far codes — DSH, DPSH, HashNet, DHN.

All compare every pair of distinct images in the batch, (B, B), so no pair sampling is needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..outputs import HashOutputs
from .base import HashLoss, label_similarity, off_diagonal


def _pairwise_likelihood(theta: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """−log p(S | θ) with p(s=1) = σ(θ), elementwise (B, B): softplus(θ) − s·θ, stable for large |θ|."""
    return F.softplus(theta) - similarity * theta


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log cosh x without overflow: |x| + log(1 + e^(−2|x|)) − log 2 (cosh overflows float32 past |x| ≈ 89)."""
    return x.abs() + F.softplus(-2 * x.abs()) - math.log(2.0)


class DSHLoss(HashLoss):
    """DSH (Liu et al., CVPR 2016) — also the pairwise margin loss of "mga".

    For a pair with squared distance d = ‖h_i − h_j‖²: similar → d / 2, dissimilar →
    max(margin − d, 0) / 2; plus ``alpha`` · Σ_k | |h_k| − 1 | per image, pulling outputs to ±1.
    margin defaults to 2·bits (the paper's choice: half the largest distance between ±1 codes).
    """

    def __init__(self, bits: int, margin: float | None = None, alpha: float = 0.01) -> None:
        super().__init__()
        self.margin = 2.0 * bits if margin is None else margin
        self.alpha = alpha

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        h = outputs.h  # (B, K)
        similarity = label_similarity(labels)  # (B, B)
        distance = torch.cdist(h, h).pow(2)  # (B, B) squared Euclidean
        pair = 0.5 * similarity * distance + 0.5 * (1 - similarity) * F.relu(self.margin - distance)
        quantization = (h.abs() - 1).abs().sum(dim=1).mean()
        return off_diagonal(pair).mean() + self.alpha * quantization


class DPSHLoss(HashLoss):
    """DPSH (Li et al., IJCAI 2016): pairwise likelihood with θ_ij = ½ h_iᵀh_j, plus eta · mean (h − sign h)²."""

    def __init__(self, bits: int, eta: float = 0.1) -> None:
        super().__init__()
        self.eta = eta

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        h = outputs.h
        theta = 0.5 * h @ h.T  # (B, B)
        likelihood = off_diagonal(_pairwise_likelihood(theta, label_similarity(labels))).mean()
        return likelihood + self.eta * (h - h.sign()).pow(2).mean()


class DHNLoss(HashLoss):
    """DHN (Zhu et al., AAAI 2016): pairwise likelihood on θ = ½ h_iᵀh_j scaled by ``alpha``, plus
    ``lam`` · mean log cosh(|h| − 1), a smooth surrogate of the L1 distance to ±1."""

    def __init__(self, bits: int, alpha: float = 1.0, lam: float = 0.1) -> None:
        super().__init__()
        self.alpha, self.lam = alpha, lam

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        h = outputs.h
        theta = self.alpha * 0.5 * h @ h.T  # (B, B)
        likelihood = off_diagonal(_pairwise_likelihood(theta, label_similarity(labels))).mean()
        return likelihood + self.lam * _log_cosh(h.abs() - 1).mean()


class HashNetLoss(HashLoss):
    """HashNet (Cao et al., ICCV 2017): weighted pairwise likelihood on u = tanh(β·h), with continuation.

    β(progress) = (1 + gamma · progress) ** power grows through training, so tanh(βh) tends to
    sign(h) and the network learns the binary code it will be evaluated with. With the defaults
    (gamma 0.2 per epoch, power 0.5) β is 1 at the start, ≈3.3 after 50 epochs, ≈4.6 after 100,
    close to the original schedule (0.005 per iteration at ~40 iterations per epoch).
    θ_ij = alpha · u_iᵀu_j; similar and dissimilar pairs are re-weighted to equal total weight,
    since dissimilar pairs outnumber similar ones (9:1 on CIFAR-10).
    The model's code is sign(h) = sign(tanh(βh)) for any β, so the schedule never changes codes.
    """

    def __init__(self, bits: int, alpha: float = 0.1, gamma: float = 0.2, power: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.gamma, self.power = alpha, gamma, power

    def beta(self, progress: float) -> float:
        """The continuation's tanh sharpness at ``progress`` epochs."""
        return (1.0 + self.gamma * max(progress, 0.0)) ** self.power

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        u = torch.tanh(self.beta(progress) * outputs.h)  # (B, K)
        similarity = off_diagonal(label_similarity(labels))  # (B·(B−1),)
        nll = off_diagonal(_pairwise_likelihood(self.alpha * u @ u.T, label_similarity(labels)))
        positives = similarity.sum()
        negatives = similarity.numel() - positives
        # Each pair class carries half of the total weight; a class absent from the batch carries none.
        weight = torch.where(
            similarity > 0,
            similarity.numel() / positives.clamp(min=1) / 2,
            similarity.numel() / negatives.clamp(min=1) / 2,
        )
        return (weight * nll).sum() / similarity.numel()
