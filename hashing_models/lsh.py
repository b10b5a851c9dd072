"""LSH on features, one definition for the served untrained model and the baseline of the benchmarks.

code = sign((x − μ) · P): P (D, K) is a Gaussian projection drawn from a seed, μ (D,) the mean feature
of a set of reference images. Centring matters for CNN features: pooled ReLU / ReLU6 outputs are
non-negative, so without it every x · p_k is dominated by the shared μ · p_k and most bits are the same
for every image (on the CIFAR-10 demo sample, see benchmarks/lsh_sample.py). ``baselines.LSH`` fits μ
on the training features; ``heads.FixedProjectionHead`` holds P and μ as buffers, and ``fit_center``
sets μ from images, as ``hashlake model init`` does.

Only numpy is imported at module level: ``baselines`` (numpy-only) uses ``lsh_projection``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and PIL load only where a model is centred
    from PIL import Image

    from .hash_model import HashModel

CENTER_BATCH = 64  # images per forward pass when fitting the centre (64 × 3 × 224² floats ≈ 38 MB)


def lsh_projection(dim: int, bits: int, seed: int = 0) -> np.ndarray:
    """The Gaussian projection P (dim, bits), float64, the same for a given (dim, bits, seed) everywhere."""
    return np.random.default_rng(seed).standard_normal((dim, bits))


def fit_center(model: HashModel, images: Iterable[Image.Image] | Sequence[Image.Image]) -> int:
    """Set an LSH model's centre μ to the mean pooled feature of ``images`` (RGB PIL images); returns their count.

    The images go through the model's own preprocessing and backbone in eval mode, as a worker
    encodes them, so μ is the mean of exactly the features the projection will see.
    """
    import torch

    from .heads import FixedProjectionHead
    from .preprocess import prepare_images

    head = model.head
    if not isinstance(head, FixedProjectionHead):
        raise ValueError(f"fit_center centres a fixed-projection (lsh) model, not a {model.method!r} one")
    was_training = model.training
    model.eval()
    total, count, batch = None, 0, []
    try:
        with torch.inference_mode():
            def flush() -> None:
                nonlocal total, count
                features = model.forward_features(prepare_images(batch, model.input_config)).double()  # (B, D)
                total = features.sum(0) if total is None else total + features.sum(0)
                count += len(batch)
                batch.clear()

            for image in images:
                batch.append(image)
                if len(batch) == CENTER_BATCH:
                    flush()
            if batch:
                flush()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("fit_center got no image: the reference image set is empty")
    head.fit_center(total / count)
    return count
