"""From training to serving: a checkpoint written by the trainer is published as a model version, the
worker stage loads it and its codes are the trained model's own; a bad file never reaches the catalog.

A real (tiny) fine-tuning of GreedyHash, whose head has a classifier, on 30 CIFAR-10 images at 32 px."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hashing_models.checkpoint import CheckpointError
from hashing_models.parquet_dataset import read_index
from hashing_models.preprocess import prepare_images
from hashing_models.protocols import Split
from hashing_models.trainer import TrainConfig, train
from hashlake.catalog import Catalog
from hashlake.cli import app
from hashlake.model_versions import init_model, publish_checkpoint
from hashlake.sql import connect
from scheduler.promote import PromoteError, promote
from workers.encode.active_model import ModelHandle
from workers.encode.runner import encode_batch
from workers.messages import Batch, ObjectRef

from conftest import cli_env, lake_rows

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10.parquet"

pytestmark = [
    pytest.mark.skipif(not CIFAR10.is_file(), reason=f"CIFAR-10 parquet not found at {CIFAR10}"),
    pytest.mark.usefixtures("torch_one_thread"),
]


@pytest.fixture(scope="module")
def trained():
    labels = read_index(CIFAR10).labels.astype(np.int64)
    picked = np.sort(np.concatenate([np.flatnonzero(labels == c)[:5] for c in range(10)]))
    fit, val = picked[np.arange(50) % 5 < 3], picked[np.arange(50) % 5 >= 3]
    split = Split("cifar10", 0, query=val, train=fit, val=val, database=picked)
    cfg = TrainConfig(method="greedyhash", bits=16, img_size=32, mode="finetune", epochs=1, eval_every=1,
                      batch_size=16, lr=1e-4)
    return train(cfg, CIFAR10, split=split)


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    return trained.save(tmp_path / "greedyhash.pt", {"map_query_tie_expected": 0.5})


def test_a_published_checkpoint_is_what_workers_encode_with(settings, store, trained, checkpoint, cifar_jpegs):
    untrained = init_model(settings, "lsh_effnetlite0_64", img_size=32, store=store)
    card = publish_checkpoint(settings, checkpoint, store=store)

    catalog = Catalog(store, settings)
    assert catalog.active() == card.version != untrained.version
    assert catalog.card(card.version) == card
    assert (card.arch, card.bits, card.input_size) == ("greedyhash_effnetlite0_16", 16, 32)
    assert card.training["mode"] == "finetune" and card.training["num_classes"] == 10
    assert card.metrics["map_query_tie_expected"] == 0.5 and "val_map_tie_expected" in card.metrics

    items = cifar_jpegs[:6]
    refs = []
    for i, (_, _, body) in enumerate(items):
        refs.append(ObjectRef(settings.images_bucket, f"c/{i}.jpg", store.put(settings.images_bucket, f"c/{i}.jpg", body)))
    result = encode_batch(Batch("encode", tuple(refs)), settings, ModelHandle(settings, store), store=store)
    assert result.model_version == card.version and result.encoded == len(items)

    rows = lake_rows(settings, "codes")
    got = np.stack([np.frombuffer(r["code"], np.uint8) for r in sorted(rows, key=lambda r: r["key"])])
    model = trained.model
    images = [Image.open(io.BytesIO(body)).convert("RGB") for _, _, body in items]
    np.testing.assert_array_equal(got, model.encode(prepare_images(images, model.input_config)))
    # A query image gets the same code in SQL: hash_image builds the card's model as the workers do.
    con = connect(settings)
    queried = [con.execute("SELECT hash_image(?::BLOB)", [body]).fetchone()[0] for _, _, body in items]
    np.testing.assert_array_equal(np.stack([np.frombuffer(q, np.uint8) for q in queried]), got)


def test_a_bad_checkpoint_or_a_taken_version_publishes_nothing(settings, store, checkpoint, tmp_path):
    catalog = Catalog(store, settings)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        publish_checkpoint(settings, truncated, store=store)
    assert catalog.versions() == []

    publish_checkpoint(settings, checkpoint, version="greedy-a", store=store)
    with pytest.raises(FileExistsError, match="greedy-a"):
        publish_checkpoint(settings, checkpoint, version="greedy-a", activate=False, store=store)
    assert catalog.versions() == ["greedy-a"] and catalog.active() == "greedy-a"


def test_automatic_version_ids_taken_in_the_same_second_get_a_suffix(settings, store, checkpoint):
    # new_version is to the second: three publishes in a row mostly share one (the second call of a pair
    # failed with FileExistsError before); whatever the clock did, every one is published, each under its
    # own id, and the weights behind each are the checkpoint's
    cards = [publish_checkpoint(settings, checkpoint, activate=False, store=store) for _ in range(3)]
    versions = [card.version for card in cards]
    assert len(set(versions)) == 3, versions
    catalog = Catalog(store, settings)
    assert sorted(catalog.versions()) == sorted(versions)
    assert all(v.startswith(f"{cards[0].arch}-{cards[0].input_size}px-") for v in versions)


def test_cli_names_the_bad_file_and_fails(settings, store, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    result = CliRunner().invoke(app, ["model", "publish", str(bad)], env=cli_env(settings))
    assert result.exit_code == 1
    assert "notes.pt" in result.output and "cannot be read" in result.output
    assert Catalog(store, settings).versions() == []


def test_promote_refuses_an_unknown_version_and_waits_for_no_intake(settings, store, cifar_jpegs):
    active = init_model(settings, "lsh_effnetlite0_64", img_size=32, store=store)
    staged = init_model(settings, "lsh_effnetlite0_64", img_size=48, activate=False, store=store)
    store.put(settings.images_bucket, "a.jpg", cifar_jpegs[0][2])
    listed = CliRunner().invoke(app, ["model", "list"], env=cli_env(settings))  # 80 columns: no terminal
    assert listed.exit_code == 0 and active.version in listed.output and staged.version in listed.output
    unknown = CliRunner().invoke(app, ["model", "promote", "no-such-version"], env=cli_env(settings))
    assert unknown.exit_code == 1 and "'no-such-version' not found" in unknown.output
    # No intake runs for this test's Redis namespace: the re-encode could never happen, so it says so
    # at once instead of waiting out the timeout, and the pointer stays where it was.
    alone = CliRunner().invoke(app, ["model", "promote", staged.version, "--poll", "0.1"], env=cli_env(settings))
    assert alone.exit_code == 1 and "no intake is running" in " ".join(alone.output.split())  # unwrapped
    # Pinned workers would never follow the pointer: refused before anything is queued.
    with pytest.raises(PromoteError, match="settings pin model version"):
        promote(settings.model_copy(update={"model_version": active.version}), staged.version)
    # A retraining run's candidate replaces the version it was evaluated against, or nothing.
    with pytest.raises(PromoteError, match=f"the active version is '{active.version}', not 'older'"):
        promote(settings, staged.version, expected_active="older")
    assert Catalog(store, settings).active() == active.version
