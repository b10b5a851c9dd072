"""Losses of the hashing methods, one file per family, all with the signature ``loss(outputs, labels, progress)``.

A trainer drives every method the same way::

    model = create_model("csq_resnet50_64", pretrained=True)
    loss_fn = create_loss(model.method, bits=model.bits, num_classes=10).to(device)
    outputs = model(images)                                  # HashOutputs
    loss = loss_fn(outputs, labels_onehot, progress=epoch + step / steps_per_epoch)

    base.py              ``HashLoss`` (the one signature) and the label similarity pairwise losses share
    pairwise.py          similar images close, dissimilar far: DSH, DPSH, HashNet, DHN
    centers.py           towards fixed per-class hash centres: CSQ, DPN, OrthoHash
    hadamard.py          Hadamard matrices of the orders hash centres need
    ranking.py           triplet ranking loss in the manner of DNNH
    straight_through.py  losses that train through a binarization: GreedyHash, BiHalf
"""
from __future__ import annotations

from collections.abc import Callable

from .base import HashLoss, label_similarity
from .centers import CSQLoss, DPNLoss, OrthoHashLoss, make_hash_centers
from .pairwise import DHNLoss, DPSHLoss, DSHLoss, HashNetLoss
from .ranking import TripletRankingLoss
from .straight_through import BiHalfLoss, GreedyHashLoss

# method name → loss factory(bits, num_classes, **options); options are the loss class's keyword arguments.
_LOSSES: dict[str, Callable[..., HashLoss]] = {
    "dsh": lambda bits, num_classes, **kw: DSHLoss(bits, **kw),
    "dpsh": lambda bits, num_classes, **kw: DPSHLoss(bits, **kw),
    "hashnet": lambda bits, num_classes, **kw: HashNetLoss(bits, **kw),
    "dhn": lambda bits, num_classes, **kw: DHNLoss(bits, **kw),
    "csq": CSQLoss,
    "dpn": DPNLoss,
    "orthohash": OrthoHashLoss,
    "greedyhash": lambda bits, num_classes, **kw: GreedyHashLoss(bits, **kw),
    "bihalf": lambda bits, num_classes, **kw: BiHalfLoss(bits, **kw),
    "dnnh": lambda bits, num_classes, **kw: TripletRankingLoss(bits, **kw),
    "mga": lambda bits, num_classes, **kw: DSHLoss(bits, **kw),  # pairwise margin loss
}

TRAINABLE_METHODS = tuple(_LOSSES)


def create_loss(method: str, bits: int, num_classes: int, **options) -> HashLoss:
    """The loss of ``method`` (a model's ``.method``) for ``bits``-bit codes and ``num_classes`` labels."""
    if method == "lsh":
        raise ValueError("method 'lsh' is a fixed random projection with nothing to train; it has no loss")
    if method not in _LOSSES:
        raise ValueError(f"no loss for method {method!r}; known: {sorted(_LOSSES)}")
    return _LOSSES[method](bits, num_classes, **options)


__all__ = [
    "TRAINABLE_METHODS",
    "BiHalfLoss",
    "CSQLoss",
    "DHNLoss",
    "DPNLoss",
    "DPSHLoss",
    "DSHLoss",
    "GreedyHashLoss",
    "HashLoss",
    "HashNetLoss",
    "OrthoHashLoss",
    "TripletRankingLoss",
    "create_loss",
    "label_similarity",
    "make_hash_centers",
]
