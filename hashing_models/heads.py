"""Hash heads: backbone features → continuous hash outputs ``h`` (B, bits), one head per kind of method.

Every head's ``forward(features)`` works standalone on pre-computed features, so a trainer can
train a head alone on a cached (N, D) feature matrix (or, for the attention head, cached stage maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import sign_straight_through
from .lsh import lsh_projection
from .outputs import HashOutputs


# Head families of the pooled-feature methods: how features become h. "linear": one fully connected
# layer; "mlp": two, with a hidden ReLU layer and dropout before each (DeepHash-pytorch's AlexNet hash
# layers, narrowed). On frozen features the MLP's dropout is what keeps a head fit on 4,500 rows general.
HEAD_FAMILIES = ("linear", "mlp")
MLP_HIDDEN = 512  # hidden units of the "mlp" family
MLP_DROPOUT = 0.5  # dropout probability before each of its two linear layers (training mode only)


def hash_layer(in_features: int, bits: int, family: str = "linear") -> nn.Module:
    """The module (B, D) → h (B, bits) of a head family (see ``HEAD_FAMILIES``)."""
    if family == "linear":
        return nn.Linear(in_features, bits)
    if family == "mlp":
        return nn.Sequential(nn.Dropout(MLP_DROPOUT), nn.Linear(in_features, MLP_HIDDEN), nn.ReLU(),
                             nn.Dropout(MLP_DROPOUT), nn.Linear(MLP_HIDDEN, bits))
    raise ValueError(f"head family {family!r} unknown; use one of {HEAD_FAMILIES}")


class CenteredInput(nn.Module):
    """A ``center`` (D,) buffer subtracted from a head's input features: saved with the weights, never
    touched by an optimiser, zeros until set (a trainer's ``fit_center``, ``lsh.fit_center``).

    Pooled CNN features are non-negative (mean 0.41, per-dimension spread 0.69 for EfficientNet-Lite0
    at 128 px), so uncentred every output of a fresh head shares one component as large as its spread.
    The pairwise likelihood losses (DPSH, DHN) answer that by shrinking all outputs together towards 0,
    where their gradient vanishes (it is bilinear in the outputs): the head ends with one code for
    every image. Centred, the same heads train (DPSH, 64 bits, MLP head, 128 px: query mAP 0.27 → 0.62,
    benchmarks/README.md).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(in_features))  # (D,)

    def fit_center(self, mean_feature: torch.Tensor) -> None:
        """Set the centre to the mean feature (D,) of the training (or reference) images."""
        self.center.copy_(mean_feature.to(self.center))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Heads saved before the centre existed saw uncentred features: a zero centre keeps their codes.
        if prefix + "center" not in state_dict and any(key.startswith(prefix) for key in state_dict):
            state_dict[prefix + "center"] = torch.zeros_like(self.center)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LinearHashHead(CenteredInput):
    """A hash layer on centred pooled features: (B, D) → h = hash(features − center) (B, bits). Used by
    most supervised methods.

    ``family`` "linear" (the default) is one fully connected layer, "mlp" the two-layer head of
    ``hash_layer``; either way the layer is ``self.hash``. ``features`` of the outputs are the input
    as given (uncentred).
    """

    def __init__(self, in_features: int, bits: int, family: str = "linear") -> None:
        super().__init__(in_features)
        self.hash = hash_layer(in_features, bits, family)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        return HashOutputs(h=self.hash(features - self.center), features=features)


class GreedyHashHead(LinearHashHead):
    """GreedyHash (Su et al., NeurIPS 2018): hash layer, then a classifier that sees sign(h).

    The sign's gradient is passed straight through, so the classification loss trains the hash
    layer as if the network were binary end to end. ``logits`` (B, num_classes).
    """

    def __init__(self, in_features: int, bits: int, num_classes: int, family: str = "linear") -> None:
        super().__init__(in_features, bits, family)
        self.classifier = nn.Linear(bits, num_classes)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        h = self.hash(features - self.center)
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


class FixedProjectionHead(CenteredInput):
    """Locality-sensitive hashing: h = (features − center) · P, nothing trained (``lsh.py`` defines it).

    P (D, bits) is the seeded Gaussian projection of ``lsh.lsh_projection`` (the baseline LSH draws the
    same one); sign(x · P) approximates the angle between centred feature vectors (Charikar's SimHash).
    ``center`` (D,) is the mean feature of reference images, set by ``lsh.fit_center``; zeros until then.
    Both are buffers: saved with the model, never updated by an optimiser.
    """

    def __init__(self, in_features: int, bits: int, seed: int = 0) -> None:
        super().__init__(in_features)
        projection = torch.from_numpy(lsh_projection(in_features, bits, seed)).float()
        self.register_buffer("projection", projection)  # (D, bits)

    def forward(self, features: torch.Tensor) -> HashOutputs:
        return HashOutputs(h=(features - self.center) @ self.projection, features=features)


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
