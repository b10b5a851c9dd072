"""Trainer, feature cache and checkpoints: short real trainings on 1,000 CIFAR-10 images at 64 px."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from hashing_models.baselines import make_baseline
from hashing_models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, restore_into
from hashing_models.parquet_dataset import read_index
from hashing_models.evaluate import mean_average_precision
from hashing_models.features import extract_features
from hashing_models.protocols import Split
from hashing_models.registry import create_model
from hashing_models.trainer import TrainConfig, encode_images, lr_at, train, train_two_stage

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10.parquet"
PX = 64  # Lite0 features at 64 px: ~180 img/s on 2 busy cores, so the 1,000 images cost ~6 s once

pytestmark = [
    pytest.mark.skipif(not CIFAR10.is_file(), reason=f"CIFAR-10 parquet not found at {CIFAR10}: trainer tests need real images"),
    pytest.mark.usefixtures("torch_one_thread"),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return read_index(CIFAR10).labels.astype(np.int64)


def _split(labels: np.ndarray, per_class: tuple[int, int, int]) -> Split:
    """A small split, per class: (fit, val, query) images; database = fit ∪ val. Fixed seed."""
    rng = np.random.default_rng(0)
    parts: list[list[int]] = [[], [], []]
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(labels == label))[: sum(per_class)]
        for part, (lo, hi) in zip(parts, [(0, per_class[0]), (per_class[0], sum(per_class[:2])),
                                          (sum(per_class[:2]), sum(per_class))]):
            part.extend(chosen[lo:hi])
    fit, val, query = (np.sort(np.array(p, dtype=np.int64)) for p in parts)
    return Split("cifar10", 0, query=query, train=fit, val=val, database=np.union1d(fit, val))


@pytest.fixture(scope="module")
def split(labels) -> Split:
    return _split(labels, (70, 10, 20))  # 1,000 images: 700 fit, 100 val, 200 query


def _config(**overrides) -> TrainConfig:
    base = dict(method="csq", bits=32, img_size=PX, epochs=20, eval_every=10, batch_size=64, lr=1e-3, head="linear")
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def trained(split, cache_dir):
    return train(_config(), CIFAR10, split=split, cache_dir=cache_dir)


def test_frozen_training_beats_itq_on_the_same_features(trained, split, labels, cache_dir):
    query = encode_images(trained.model, CIFAR10, split.query, from_cache=True, cache_dir=cache_dir)
    database = encode_images(trained.model, CIFAR10, split.database, from_cache=True, cache_dir=cache_dir)
    deep = mean_average_precision(query, labels[split.query], database, labels[split.database], tie_expected=True)

    features = extract_features(trained.model.backbone, CIFAR10, np.concatenate([split.query, split.database]),
                                cache_dir=cache_dir)["pooled"]
    q_feat, db_feat = features[: len(split.query)], features[len(split.query):]
    itq = make_baseline("itq", 32, seed=0).fit(db_feat[np.isin(split.database, split.train)])
    itq_map = mean_average_precision(itq.encode(q_feat), labels[split.query], itq.encode(db_feat),
                                     labels[split.database], tie_expected=True)
    # Measured: CSQ ≈ 0.58, ITQ ≈ 0.22 (64 px features, 700 training images).
    assert deep > itq_map + 0.15, (deep, itq_map)
    assert trained.val_map > 0.4 and trained.best_epoch in (10, 20)


def test_cached_features_give_the_codes_of_end_to_end_encoding(trained, split, cache_dir):
    images = split.query[:16]
    cached = encode_images(trained.model, CIFAR10, images, from_cache=True, cache_dir=cache_dir)
    end_to_end = encode_images(trained.model, CIFAR10, images, from_cache=False)
    assert (cached == end_to_end).mean() > 0.99  # float rounding may flip a bit whose h is ~0


def test_same_seed_same_weights_and_metrics(trained, split, cache_dir):
    again = train(_config(), CIFAR10, split=split, cache_dir=cache_dir)
    without_time = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert without_time(again.history) == without_time(trained.history)
    for (name, a), b in zip(trained.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    other = train(_config(seed=1, epochs=1, eval_every=1), CIFAR10, split=split, cache_dir=cache_dir)
    assert not torch.equal(other.model.head.hash.weight, trained.model.head.hash.weight)


def test_checkpoint_round_trip(trained, split, tmp_path, cache_dir):
    from hashlake.catalog import ModelCard

    path = trained.save(tmp_path / "csq.pt", test_metrics={"map_query": 0.5})
    model, checkpoint = model_from_checkpoint(path, arch="csq_effnetlite0_32")
    for (name, a), b in zip(trained.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert checkpoint.config == asdict(trained.config)
    assert checkpoint.metrics["val_map"] == trained.val_map and checkpoint.metrics["map_query"] == 0.5
    card = ModelCard(**checkpoint.card)  # the catalog can publish what the trainer writes
    assert (card.arch, card.bits, card.input_size, card.training["seed"]) == ("csq_effnetlite0_32", 32, PX, 0)
    codes = encode_images(model, CIFAR10, split.query[:8], from_cache=False)
    assert np.array_equal(codes, encode_images(trained.model, CIFAR10, split.query[:8], from_cache=False))


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    path = trained.save(tmp_path / "whole.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt .*truncated"):
        load_checkpoint(cut)
    not_ours = tmp_path / "state_dict.pt"
    torch.save(trained.model.state_dict(), not_ours)
    with pytest.raises(CheckpointError, match="not a hashlake checkpoint"):
        load_checkpoint(not_ours)


def test_mismatched_checkpoint_is_a_clear_error(trained, tmp_path):
    path = trained.save(tmp_path / "csq32.pt")
    with pytest.raises(CheckpointError, match=r"bits 32 ≠ 16"):
        load_checkpoint(path, arch="csq_effnetlite0_16")
    with pytest.raises(CheckpointError, match=r"method 'csq' ≠ 'dsh'"):
        restore_into(create_model("dsh_effnetlite0_32", img_size=PX), load_checkpoint(path), str(path))
    wrong_classes = create_model("csq_effnetlite0_32", img_size=PX)
    checkpoint = load_checkpoint(path)
    checkpoint.state_dict["head.hash.weight"] = checkpoint.state_dict["head.hash.weight"][:, :100]
    with pytest.raises(CheckpointError, match="does not fit the model"):
        restore_into(wrong_classes, checkpoint, str(path))


def test_two_stage_mga_goes_through_the_same_loop(labels, cache_dir):
    """Stage 1 on cached stage-map grids, stage 2 end to end (tiny: 30 fit images, 1 epoch each)."""
    tiny = _split(labels, (3, 2, 0))
    frozen = _config(method="mga", bits=16, epochs=2, eval_every=1, batch_size=16)
    first, second = train_two_stage(frozen, _config(method="mga", bits=16, mode="finetune", epochs=1,
                                                    batch_size=16, lr=1e-4), CIFAR10, cache_dir=cache_dir,
                                    split=tiny)
    assert first.split is tiny and second.split is tiny
    assert len(first.history) == 2 and len(second.history) == 1
    assert not torch.equal(first.model.backbone.net.conv_stem.weight, second.model.backbone.net.conv_stem.weight)
    assert torch.equal(first.model.backbone.net.conv_stem.weight,
                       create_model("mga_effnetlite0_16", True, img_size=PX).backbone.net.conv_stem.weight)


def test_feature_cache_computes_only_missing_rows(split, cache_dir, caplog):
    backbone = create_model("csq_effnetlite0_32", True, img_size=PX).backbone
    new = np.setdiff1d(np.arange(12_000, 12_040), np.concatenate([split.train, split.val, split.query]))
    with caplog.at_level(logging.INFO, logger="hashing_models.features"):
        first = extract_features(backbone, CIFAR10, np.concatenate([split.val[:5], new]), cache_dir=cache_dir)
        again = extract_features(backbone, CIFAR10, new[::-1], cache_dir=cache_dir)
    assert [r.getMessage().split(" rows")[0] for r in caplog.records if "computing" in r.message] == \
        [f"computing {len(new)}"]
    assert np.array_equal(first["pooled"][5:][::-1], again["pooled"])


def test_config_names_bad_values():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        TrainConfig(method="nope")
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(method="lsh")
    with pytest.raises(ValueError, match="mode 'half'"):
        TrainConfig(method="csq", mode="half")
    cfg = TrainConfig(method="csq", lr=1.0, epochs=10, warmup_epochs=1.0, min_lr_ratio=0.0)
    assert [round(lr_at(cfg, p), 6) for p in (0.0, 0.5, 1.0, 5.5, 10.0)] == [0.0, 0.5, 1.0, 0.5, 0.0]
