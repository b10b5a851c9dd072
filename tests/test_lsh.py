"""LSH has one definition: the served untrained model and the baseline centre, project and sign alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hashing_models.baselines import make_baseline
from hashing_models.codes import pack_signs
from hashing_models.lsh import fit_center
from hashing_models.registry import create_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _features(n: int = 200, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Non-negative features sharing a large mean, as pooled ReLU6 outputs are, in four clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (4, dim))
    return (3.0 + centres[np.arange(n) % 4] + 0.2 * rng.standard_normal((n, dim))).astype(np.float32)


def test_served_head_and_baseline_give_the_same_codes():
    model = create_model("lsh_vitsmall32_32")
    head = model.head
    dim = head.projection.shape[0]
    features = _features(dim=dim)
    baseline = make_baseline("lsh", 32, seed=0).fit(features)
    head.center.copy_(torch.from_numpy(features.mean(0)))
    served = pack_signs(head(torch.from_numpy(features)).h)
    assert (np.unpackbits(served) == np.unpackbits(baseline.encode(features))).mean() > 0.999


def test_centring_is_what_makes_bits_vary():
    model = create_model("lsh_vitsmall32_32")
    features = torch.from_numpy(_features(dim=model.head.projection.shape[0]))
    uncentred = model.head(features).h > 0  # (N, 32)
    model.head.center.copy_(features.mean(0))
    centred = model.head(features).h > 0
    # Shared mean dominates x·p: uncentred bits are nearly constant over images, centred ones split.
    assert (uncentred.float().mean(0) - 0.5).abs().mean() > 0.4
    assert (centred.float().mean(0) - 0.5).abs().mean() < 0.2


def test_fit_center_is_the_mean_feature_of_the_images():
    model = create_model("lsh_vitsmall32_32").eval()
    images = [Image.new("RGB", (40, 30), (20 * i, 100, 255 - 20 * i)) for i in range(5)]
    from hashing_models.preprocess import prepare_images

    with torch.inference_mode():
        expected = model.forward_features(prepare_images(images, model.input_config)).mean(0)
    assert fit_center(model, iter(images)) == 5
    torch.testing.assert_close(model.head.center, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no image"):
        fit_center(model, [])
    with pytest.raises(ValueError, match="fixed-projection"):
        fit_center(create_model("csq_vitsmall32_32"), images)


def test_a_version_published_without_a_centre_keeps_its_codes():
    model = create_model("lsh_vitsmall32_32")
    old_state = {k: v for k, v in model.state_dict().items() if k != "head.center"}  # as published before
    fresh = create_model("lsh_vitsmall32_32")
    fresh.head.center.fill_(1.0)
    fresh.load_state_dict(old_state, strict=True)
    assert torch.count_nonzero(fresh.head.center) == 0
