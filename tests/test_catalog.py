"""The catalog against real moto S3: a version is created once (of concurrent publishers exactly one
writes anything), and a card with fields this hashlake does not know loads with a warning."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict

import pytest
import torch

from hashlake.catalog import MODELS_PREFIX, Catalog, ModelCard
from hashlake.store import ObjectExists


def card(version: str, description: str = "") -> ModelCard:
    return ModelCard(version=version, arch="lsh_effnetlite0_64", method="lsh", backbone="effnetlite0", bits=64,
                     input_size=64, description=description)


def test_create_is_conditional_and_a_retry_of_its_own_bytes_succeeds(settings, store):
    bucket = settings.index_bucket
    etag = store.create(bucket, "models/x/weights.pt", b"first")
    with pytest.raises(ObjectExists, match="models/x/weights.pt already exists"):
        store.create(bucket, "models/x/weights.pt", b"second")
    assert store.create(bucket, "models/x/weights.pt", b"first") == etag  # e.g. a transport retry of the PUT
    assert store.get(bucket, "models/x/weights.pt")[0] == b"first"


def test_of_concurrent_publishers_of_one_version_exactly_one_writes(settings, store):
    catalog = Catalog(store, settings)
    publishers = 6
    start = threading.Barrier(publishers)
    won, refused = [], []

    def publish(i: int) -> None:
        weights = {"w": torch.full((300_000,), float(i))}  # ~1.2 MB: the PUTs overlap
        start.wait()
        try:
            catalog.publish(card("race-1", f"publisher {i}"), weights)
            won.append(i)
        except FileExistsError as exc:
            refused.append(str(exc))

    for _ in range(3):  # three rounds, three versions
        won.clear(), refused.clear()
        threads = [threading.Thread(target=publish, args=(i,)) for i in range(publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        [winner] = won
        assert len(refused) == publishers - 1 and all("'race-1'" in r for r in refused)
        # Card and weights are the same publisher's: nobody overwrote the winner's weights.
        assert catalog.card("race-1").description == f"publisher {winner}"
        assert torch.equal(catalog.weights("race-1")["w"], torch.full((300_000,), float(winner)))
        for key in ("card.json", "weights.pt"):
            store.delete(settings.index_bucket, f"{MODELS_PREFIX}race-1/{key}")


def test_a_half_published_version_is_refused_naming_what_is_left(settings, store):
    catalog = Catalog(store, settings)
    store.put(settings.index_bucket, f"{MODELS_PREFIX}half/weights.pt", b"left by a publisher that died")
    with pytest.raises(FileExistsError, match="weights.pt exists without a card.json"):
        catalog.publish(card("half"), {"w": torch.zeros(3)})
    assert catalog.versions() == []


def test_a_card_with_fields_this_version_does_not_know_loads_with_a_warning(settings, store, caplog):
    newer = {**asdict(card("newer-1", "from a newer publisher")), "calibration": {"scale": 2}, "license": "cc-by"}
    store.put(settings.index_bucket, f"{MODELS_PREFIX}newer-1/card.json", json.dumps(newer).encode())
    with caplog.at_level(logging.WARNING, logger="hashlake.catalog"):
        loaded = Catalog(store, settings).card("newer-1")
    assert loaded == card("newer-1", "from a newer publisher").__class__(
        **{k: v for k, v in newer.items() if k not in ("calibration", "license")})
    assert "'newer-1' has fields this hashlake does not know, ignored: calibration, license" in caplog.text

    older = {k: v for k, v in asdict(card("broken-1")).items() if k != "bits"}
    with pytest.raises(ValueError, match=r"model card of version 'broken-1' lacks the field\(s\) bits"):
        ModelCard.from_json(json.dumps(older))
