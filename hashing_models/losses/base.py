"""HashLoss: the one signature every method's loss has, and the label similarity the pairwise losses share."""
from __future__ import annotations

import torch
from torch import nn

from ..outputs import HashOutputs


class HashLoss(nn.Module):
    """A hashing method's training objective: ``loss(outputs, labels, progress) -> scalar``.

    outputs: the model's ``HashOutputs`` for the batch (``h`` (B, K), ``features``, ``logits``).
    labels: (B, C) float multi-hot label vectors (one-hot for single-label data). Two images
        are similar when they share at least one label.
    progress: training progress in epochs, fractional (``epoch + step / steps_per_epoch``);
        methods with schedules (HashNet's continuation) read it, the others ignore it.
    Losses may hold buffers (class centres): move them with ``.to(device)`` alongside the model.
    """

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        raise NotImplementedError


def label_similarity(labels: torch.Tensor) -> torch.Tensor:
    """(B, C) multi-hot → (B, B) float: 1 where two images share at least one label, else 0."""
    labels = labels.float()
    return (labels @ labels.T > 0).float()


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """(B, B) → the B·(B−1) entries off the diagonal (pairs of distinct images), flattened."""
    n = matrix.shape[0]
    return matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)]
