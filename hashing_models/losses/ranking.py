"""Triplet ranking loss in the manner of DNNH: an image's code is nearer to a similar image's than to a dissimilar one's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..outputs import HashOutputs
from .base import HashLoss, label_similarity


class TripletRankingLoss(HashLoss):
    """DNNH (Lai et al., CVPR 2015): mean over all in-batch triplets (anchor i, similar j, dissimilar k) of
    max(0, margin + ‖u_i − u_j‖² − ‖u_i − u_k‖²), with u = tanh(h) in (−1, 1)^K.

    For binary u, ‖u_i − u_j‖² is 4× their Hamming distance; the default margin bits/2 asks for a
    Hamming gap of bits/8. Memory O(B³): a batch of 128 makes 2 M triplet terms.
    """

    def __init__(self, bits: int, margin: float | None = None) -> None:
        super().__init__()
        self.margin = bits / 2 if margin is None else margin

    def forward(self, outputs: HashOutputs, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        u = torch.tanh(outputs.h)  # (B, K)
        distance = torch.cdist(u, u).pow(2)  # (B, B)
        similarity = label_similarity(labels).bool()
        eye = torch.eye(len(u), dtype=torch.bool, device=u.device)
        positive, negative = similarity & ~eye, ~similarity
        valid = positive[:, :, None] & negative[:, None, :]  # (B, B, B): (i, j, k) usable triplets
        if not valid.any():
            return u.sum() * 0.0  # no triplet in this batch: zero loss, still connected to the graph
        violation = F.relu(self.margin + distance[:, :, None] - distance[:, None, :])  # (B, B, B)
        return violation[valid].mean()
