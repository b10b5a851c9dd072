"""Binarization layers with surrogate gradients: sign with straight-through, and BiHalf's median split.

They live apart from the losses because heads use them too (GreedyHash's classifier sees the
binary code). Both output ±1 with the packing convention: h > 0 → +1, otherwise −1.
"""
from __future__ import annotations

import torch


def hard_sign(h: torch.Tensor) -> torch.Tensor:
    """±1 with the codes convention: +1 where h > 0, −1 elsewhere (zero maps to −1, bit 0)."""
    return torch.where(h > 0, 1.0, -1.0).to(h.dtype)


def sign_straight_through(h: torch.Tensor) -> torch.Tensor:
    """Forward ``hard_sign(h)``; backward passes the gradient through unchanged (GreedyHash).

    Written as h + (sign(h) − h).detach(): the value is the sign, the derivative is the identity.
    """
    return h + (hard_sign(h) - h).detach()


class _BiHalf(torch.autograd.Function):
    """Per bit, the larger half of the batch gets +1 and the smaller half −1 (Li & van Gemert, AAAI 2021)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, gamma: float) -> torch.Tensor:  # h: (B, K)
        n = h.shape[0]
        order = h.argsort(dim=0, descending=True)  # (B, K) row indices, largest first
        ranked = torch.ones_like(h)
        ranked[n // 2 :] = -1.0  # the n//2 largest → +1, the rest → −1
        b = torch.empty_like(h).scatter_(0, order, ranked)
        ctx.save_for_backward(h, b)
        ctx.gamma = gamma
        return b

    @staticmethod
    def backward(ctx, grad_b: torch.Tensor):
        h, b = ctx.saved_tensors
        # Straight-through plus a pull of h towards its binary value (strength gamma).
        return grad_b + ctx.gamma * (h - b) / b.numel(), None


def bi_half(h: torch.Tensor, gamma: float = 3.0) -> torch.Tensor:
    """BiHalf layer: (B, K) → (B, K) ±1 with exactly half of the batch on each side of every bit.

    Maximises bit entropy by construction; needs B ≥ 2. Backward: straight-through plus
    ``gamma · (h − b) / numel``.
    """
    if h.shape[0] < 2:
        raise ValueError(f"bi_half needs a batch of at least 2 rows, got {h.shape[0]}")
    return _BiHalf.apply(h, gamma)
