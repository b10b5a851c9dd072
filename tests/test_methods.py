"""Head families, and a short frozen-track run on synthetic cached features that must beat ITQ on them.

The run is the real trainer (``train``: cached features, batches, validation selection) and the real
encoding path (``encode_images`` from the cache); only the cached feature values are synthetic, written
into the feature store of a tiny dataset file, so the whole file takes seconds.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashing_models.baselines import make_baseline
from hashing_models.checkpoint import model_from_checkpoint
from hashing_models.evaluate import mean_average_precision
from hashing_models.features import feature_stores
from hashing_models.heads import HEAD_FAMILIES, MLP_HIDDEN
from hashing_models.methods import METHODS
from hashing_models.protocols import Split
from hashing_models.registry import create_model
from hashing_models.trainer import TrainConfig, build_model, encode_images, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES, PER_CLASS = 10, 100  # 1,000 synthetic images: per class 50 fit, 10 val, 20 query, 20 more database
BACKBONE, PX = "vitsmall32", 32  # random weights (pretrained "none"): the features come from the store


def _dataset(tmp: Path) -> Path:
    """A dataset file of CIFAR-10's layout whose JPEGs are one tiny grey image (never decoded here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    table = pa.table({"path": [f"train/c{c}/{i:04d}.jpg" for i, c in enumerate(labels)],
                      "split": ["train"] * len(labels), "label": labels.astype(np.int8),
                      "label_name": [f"c{c}" for c in labels], "jpeg": [buffer.getvalue()] * len(labels)})
    path = tmp / "synthetic.parquet"
    pq.write_table(table, path)
    return path


def _features(labels: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Non-negative features (N, dim) like pooled ReLU6 outputs: a weak class signal spread over every
    dimension, under a stronger class-free nuisance in a few dimensions (which ITQ's PCA picks up)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((CLASSES, dim))
    nuisance = np.zeros((len(labels), dim))
    nuisance[:, :8] = 8.0 * rng.standard_normal((len(labels), 8))
    return np.maximum(0.0, 1.0 + 0.3 * prototypes[labels] + rng.standard_normal((len(labels), dim)) + nuisance
                      ).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(dataset file, cache folder, split, labels): features of every image already in the store."""
    tmp = tmp_path_factory.mktemp("synthetic")
    parquet, cache = _dataset(tmp), tmp / "features"
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    backbone = build_model(_config("csq")).backbone
    store = feature_stores(backbone, parquet, cache_dir=cache)["pooled"]
    store.write_rows(np.arange(len(labels)), _features(labels, backbone.num_features))
    parts: list[list[int]] = [[], [], [], []]
    for c in range(CLASSES):
        rows = np.flatnonzero(labels == c)
        for part, (lo, hi) in zip(parts, [(0, 50), (50, 60), (60, 80), (80, 100)]):
            part.extend(rows[lo:hi])
    fit, val, query, rest = (np.array(p, dtype=np.int64) for p in parts)
    split = Split("cifar10", 0, query=query, train=fit, val=val, database=np.sort(np.concatenate([fit, val, rest])))
    return parquet, cache, split, labels


def _config(method: str, **overrides) -> TrainConfig:
    base = dict(method=method, backbone=BACKBONE, pretrained="none", img_size=PX, bits=16, epochs=30,
                eval_every=10, batch_size=64, lr=1e-3)
    return TrainConfig(**(base | overrides))


def _test_map(result, synthetic) -> float:
    parquet, cache, split, labels = synthetic
    query = encode_images(result.model, parquet, split.query, from_cache=True, cache_dir=cache)
    database = encode_images(result.model, parquet, split.database, from_cache=True, cache_dir=cache)
    return mean_average_precision(query, labels[split.query], database, labels[split.database], tie_expected=True)


def _itq_map(synthetic) -> float:
    parquet, cache, split, labels = synthetic
    features = _features(labels, build_model(_config("csq")).backbone.num_features)
    itq = make_baseline("itq", 16, seed=0).fit(features[split.train_all])
    return mean_average_precision(itq.encode(features[split.query]), labels[split.query],
                                  itq.encode(features[split.database]), labels[split.database], tie_expected=True)


@pytest.mark.parametrize(("method", "head"), [("csq", "mlp"), ("dsh", "linear"), ("dpsh", "mlp"), ("dhn", "mlp")])
def test_short_frozen_run_beats_itq_on_the_same_features(synthetic, method, head):
    result = train(_config(method, head=head), synthetic[0], split=synthetic[2], cache_dir=synthetic[1])
    deep, itq = _test_map(result, synthetic), _itq_map(synthetic)
    assert deep > itq + 0.15, (method, head, deep, itq)
    assert result.best_epoch in (10, 20, 30)


def test_a_head_trained_on_stored_features_is_centred_on_the_fit_images(synthetic):
    parquet, cache, split, labels = synthetic
    result = train(_config("dpsh", head="mlp", epochs=1, eval_every=1), parquet, split=split, cache_dir=cache)
    expected = _features(labels, result.model.backbone.num_features)[split.train].astype(np.float64).mean(0)
    np.testing.assert_allclose(result.model.head.center.numpy(), expected, rtol=1e-5, atol=1e-5)
    features = torch.rand(4, result.model.backbone.num_features)
    model = result.model.eval()
    torch.testing.assert_close(model.forward_head(features).h, model.head.hash(features - model.head.center))


def test_a_head_saved_before_centring_loads_with_a_zero_centre():
    model = create_model("csq_vitsmall32_16", head="mlp")
    old_state = {k: v for k, v in model.state_dict().items() if k != "head.center"}  # as saved before
    fresh = create_model("csq_vitsmall32_16", head="mlp")
    fresh.head.center.fill_(1.0)
    fresh.load_state_dict(old_state, strict=True)
    assert torch.count_nonzero(fresh.head.center) == 0


def test_mlp_checkpoint_round_trip_keeps_its_head(synthetic, tmp_path):
    result = train(_config("greedyhash", head="mlp", epochs=2, eval_every=2), synthetic[0], split=synthetic[2],
                   cache_dir=synthetic[1])
    assert result.model.head.hash[1].out_features == MLP_HIDDEN
    model, checkpoint = model_from_checkpoint(result.save(tmp_path / "greedyhash.pt"))
    assert checkpoint.card["training"]["head"] == "mlp"
    features = torch.rand(4, model.backbone.num_features)
    torch.testing.assert_close(model.eval().forward_head(features).h, result.model.eval().forward_head(features).h)


def test_head_families_are_checked_by_method():
    for name, spec in METHODS.items():
        assert spec.head_families and set(spec.head_families) <= set(HEAD_FAMILIES), name
    mlp = create_model("dpsh_vitsmall32_16", head="mlp")
    assert [type(m).__name__ for m in mlp.head.hash] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert isinstance(create_model("dpsh_vitsmall32_16").head.hash, torch.nn.Linear)  # default: linear
    with pytest.raises(ValueError, match="has no 'mlp' head"):
        create_model("dnnh_vitsmall32_16", head="mlp")
    with pytest.raises(ValueError, match="has no 'deep' head"):
        create_model("csq_vitsmall32_16", head="deep")
