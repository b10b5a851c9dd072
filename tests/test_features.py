"""Features at ingest, against real moto S3, the real lake (PostgreSQL catalog) and the real lsh_effnetlite0_64
model at 64 px: a batch the runner encodes leaves one float16 row of pooled backbone features per image, equal
to the model's own ``forward_features``; the head applied to a stored row gives the worker's code (what a
head-only retraining relies on); committing twice, or encoding again under another version on the same
backbone, adds no row; ``keep_features=False`` writes none; ``backbone_id`` names the backbone's weights."""
from __future__ import annotations

import copy
import io
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from hashing_models import create_model
from hashing_models.codes import pack_signs
from hashing_models.preprocess import prepare_images
from hashlake.lake.connection import open_lake
from hashlake.lake.features import decode_features, encode_features, features_of_current_codes, read_features
from hashlake.lake.writer import LakeWriter
from hashlake.model_versions import backbone_id, init_model
from workers.encode.active_model import ModelHandle
from workers.encode.runner import encode_batch
from workers.messages import Batch, ObjectRef

from conftest import lake_rows

IMG_SIZE = 64  # px, as in test_encode_runner


@pytest.fixture
def model_card(settings, store):
    return init_model(settings, "lsh_effnetlite0_64", img_size=IMG_SIZE, store=store)


def upload(store, bucket, jpegs) -> list[ObjectRef]:
    return [ObjectRef(bucket, f"cifar/{i}.jpg", store.put(bucket, f"cifar/{i}.jpg", body), len(body),
                      "2026-11-22T10:00:00Z") for i, body in enumerate(jpegs)]


def test_blobs_round_trip():
    values = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    blobs = encode_features(values)
    assert blobs.type == pa.binary() and [len(b) for b in blobs.to_pylist()] == [14] * 5
    assert blobs.to_pylist()[1] == values[1].astype("<f2").tobytes()
    np.testing.assert_array_equal(decode_features(blobs), values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(decode_features(blobs.slice(2)), decode_features(blobs.to_pylist()[2:]))
    assert decode_features(pa.chunked_array([blobs[:2], blobs[2:]])).shape == (5, 7)


def test_backbone_id_names_the_backbone_weights(torch_one_thread):
    model = create_model("lsh_effnetlite0_64", pretrained=False, img_size=IMG_SIZE)
    ident = backbone_id(model)
    assert ident.startswith("effnetlite0-64px-") and len(ident.rsplit("-", 1)[1]) == 12
    head_retrained = copy.deepcopy(model)
    with torch.no_grad():
        head_retrained.head.center.add_(1.0)  # another head on the same backbone
    assert backbone_id(head_retrained) == ident
    fine_tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(fine_tuned.backbone.parameters()).add_(1e-3)
    assert backbone_id(fine_tuned) != ident
    assert backbone_id(model, 128) == ident.replace("-64px-", "-128px-")


def test_a_batch_keeps_each_images_features_and_the_head_gives_back_its_code(settings, store, model_card, cifar_jpegs,
                                                                             torch_one_thread):
    jpegs = [body for _, _, body in cifar_jpegs[:24]]
    refs = upload(store, settings.images_bucket, jpegs)
    batch = Batch("encode", tuple(refs))
    handle = ModelHandle(settings, store)
    assert encode_batch(batch, settings, handle, store=store).encoded == 24
    loaded = handle.current()
    model = loaded.model

    codes = {r["key"]: r for r in lake_rows(settings, "codes")}
    rows = {r["key"]: r for r in lake_rows(settings, "features")}
    assert sorted(rows) == sorted(codes) == sorted(r.key for r in refs)
    keys = [r.key for r in refs]
    for key in keys:
        row, code = rows[key], codes[key]
        assert row["backbone"] == loaded.backbone_id == backbone_id(model)
        assert (row["etag"], row["mtime_ns"], row["version_id"], row["batch_id"]) == (
            code["etag"], code["mtime_ns"], code["version_id"], batch.batch_id)
    stored = decode_features([rows[k]["feature"] for k in keys])
    assert stored.shape == (24, model.backbone.num_features)

    # the model's own features on the same decoded images: equal to float16 rounding
    images = [Image.open(io.BytesIO(body)).convert("RGB") for body in jpegs]
    with torch.inference_mode():
        expected = model.forward_features(prepare_images(images, model.input_config)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)  # float16: 11 significant bits

    # What retraining relies on: the head on a stored row re-encodes the image as the worker did. float16
    # rounding moves each feature by ≤ 2^-11 relative, which flips a bit only where h is within that of 0:
    # nearly never, so nearly every bit, and most codes, match; not bit-exactness.
    with torch.inference_mode():
        recoded = pack_signs(model.forward_head(torch.from_numpy(stored)).h)
    written = np.stack([np.frombuffer(codes[k]["code"], np.uint8) for k in keys])
    bits_equal = (np.unpackbits(recoded, axis=1) == np.unpackbits(written, axis=1)).mean()
    assert bits_equal >= 0.99, bits_equal
    assert (recoded == written).all(axis=1).mean() >= 0.75

    # the read helpers: aligned rows with a found mask, and the current codes joined to their features
    con = open_lake(settings)
    try:
        wanted = pa.table({"bucket": [settings.images_bucket] * 3, "key": [keys[5], "nope.jpg", keys[0]],
                           "etag": [refs[5].etag, "e", refs[0].etag]})
        values, found = read_features(con, loaded.backbone_id, wanted)
        assert found.tolist() == [True, False, True] and values.dtype == np.float32
        np.testing.assert_array_equal(values[[0, 2]], stored[[5, 0]])
        assert not values[1].any()
        assert read_features(con, "other-backbone", wanted)[1].tolist() == [False] * 3
        joined = features_of_current_codes(con, loaded.version, loaded.backbone_id)
        assert joined.num_rows == 24 and joined["feature"].null_count == 0
        order = np.argsort(joined["key"].to_pylist())
        by_key = np.argsort(keys)
        np.testing.assert_array_equal(decode_features(joined["feature"])[order], stored[by_key])
        assert features_of_current_codes(con, loaded.version, "other-backbone")["feature"].null_count == 24
    finally:
        con.close()


def test_one_row_per_image_version_and_backbone(settings, store, model_card, cifar_jpegs, torch_one_thread):
    refs = upload(store, settings.images_bucket, [body for _, _, body in cifar_jpegs[:4]])
    handle = ModelHandle(settings, store)
    encode_batch(Batch("encode", tuple(refs)), settings, handle, store=store)
    first = lake_rows(settings, "features")
    assert len(first) == 4

    # the same batch committed twice (its first delivery committed after the second's ``known``)
    table = pa.Table.from_pylist(first)
    writer = LakeWriter(settings)
    writer.commit(None, None, table)
    writer.commit(None, None, table)
    writer.close()
    assert len(lake_rows(settings, "features")) == 4

    # another model version on the same pretrained backbone: its codes are written, its features are not again
    second = init_model(settings, "lsh_effnetlite0_64", img_size=IMG_SIZE, store=store, activate=False)
    result = encode_batch(Batch("encode", tuple(refs), model_version=second.version), settings, handle, store=store)
    assert result.encoded == 4
    assert handle.current(second.version).backbone_id == handle.current().backbone_id
    assert len(lake_rows(settings, "codes")) == 8
    assert sorted(r["batch_id"] for r in lake_rows(settings, "features")) == sorted(r["batch_id"] for r in first)


def test_keep_features_off_writes_none(settings, store, model_card, cifar_jpegs, torch_one_thread):
    off = settings.model_copy(update={"keep_features": False})
    refs = upload(store, off.images_bucket, [body for _, _, body in cifar_jpegs[:3]])
    assert encode_batch(Batch("encode", tuple(refs)), off, ModelHandle(off, store), store=store).encoded == 3
    assert len(lake_rows(off, "codes")) == 3
    assert lake_rows(off, "features") == []


def test_features_rows_commit_with_the_codes(settings, store):
    """All or nothing: when the features' INSERT fails, the batch's codes are not committed either."""
    import duckdb

    from hashlake.lake.schema import CODES_SCHEMA, FEATURES_SCHEMA

    now = datetime(2026, 11, 1, tzinfo=timezone.utc)
    codes = pa.Table.from_pylist([{"bucket": "b", "key": "k", "etag": "e", "version_id": None, "size": 1,
                                   "last_modified": now, "mtime_ns": 1, "code": b"\0" * 8, "model": "v",
                                   "encoded_at": now, "labels": [], "batch_id": "x"}], schema=CODES_SCHEMA)
    features = pa.Table.from_pylist([{"bucket": "b", "key": "k", "etag": "e", "version_id": None, "mtime_ns": 1,
                                      "backbone": "bb", "feature": b"\0\0", "encoded_at": now, "batch_id": "x"}],
                                    schema=FEATURES_SCHEMA)

    class FailingFeatures:  # the writer's connection, whose INSERT into the features table fails
        def __init__(self, con):
            self.con = con

        def execute(self, query, *args):
            if "INTO lake.features" in query:
                raise duckdb.ConstraintException("injected: the features insert failed")
            return self.con.execute(query, *args)

        def __getattr__(self, name):
            return getattr(self.con, name)

    writer = LakeWriter(settings)
    writer._con = FailingFeatures(open_lake(settings))
    with pytest.raises(duckdb.ConstraintException, match="injected"):
        writer.commit(codes, None, features)
    writer.close()
    assert lake_rows(settings, "codes") == [] and lake_rows(settings, "features") == []
    writer = LakeWriter(settings)
    writer.commit(codes, None, features)  # the same rows, committed this time
    writer.close()
    assert len(lake_rows(settings, "codes")) == len(lake_rows(settings, "features")) == 1
