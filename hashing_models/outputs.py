"""HashOutputs: what a hash model's forward returns and every loss consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HashOutputs:
    """One batch's outputs of a hash model.

    ``h`` defines the code: bit i of image b is ``h[b, i] > 0`` (``codes.pack_signs(h)``).
    Losses squash ``h`` (tanh, sigmoid, sign) as their method prescribes; the model does not,
    so the code never depends on a training-time schedule.
    """

    h: torch.Tensor  # (B, bits) continuous hash-layer outputs
    features: torch.Tensor  # (B, D) the pooled features the hash layer saw (unsupervised losses use them)
    logits: torch.Tensor | None = None  # (B, num_classes) class scores, only for classifier-aided heads (greedyhash)
