"""encode_batch end to end in-process, against real moto S3, the real lake (PostgreSQL catalog) and the real
lsh_effnetlite0_64 model at 64 px: codes match the model's own encode, bad input becomes failure rows,
retried and duplicated batches add nothing (and read nothing), an object overwritten since its event is
left to its newer version, a missing model and a dead store are errors to retry, never failure rows; a
batch that kills its worker is split, and an object alone recorded."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from hashing_models.preprocess import prepare_images
from hashlake.catalog import Catalog, ModelNotFound
from hashlake.config import Settings
from hashlake.model_versions import init_model
from hashlake.local.services import free_port
from hashlake.store import ObjectStore, StoreUnavailable
from workers.encode.active_model import ModelHandle
from workers.deliveries import History
from workers.encode.runner import encode_batch, record_crashed, split_batch, tombstone_batch
from workers.messages import Batch, ObjectRef

from conftest import lake_rows

IMG_SIZE = 64  # px: the real model, small enough for a 2-core CI


@pytest.fixture
def model_card(settings, store):
    return init_model(settings, "lsh_effnetlite0_64", img_size=IMG_SIZE, store=store)


def upload(store, bucket, items) -> list[ObjectRef]:
    refs = []
    for key, body, labels in items:
        etag = store.put(bucket, key, body, metadata={"labels": labels} if labels else None)
        refs.append(ObjectRef(bucket, key, etag, len(body), "2026-11-22T10:00:00Z"))
    return refs


def test_codes_match_the_model_and_bad_input_is_recorded(settings, store, model_card, cifar_jpegs):
    good = [(f"cifar/{i}.jpg", body, f"{label},cifar") for i, (_, label, body) in enumerate(cifar_jpegs[:12])]
    png = io.BytesIO()
    Image.new("1", (8000, 6000)).save(png, "PNG")  # 48 Mpx in ~6 KB: over the 40 Mpx limit
    bad = [("bad/notes.txt", b"just some text, not an image", ""), ("bad/empty.jpg", b"", ""),
           ("bad/truncated.jpg", cifar_jpegs[0][2][:300], ""), ("bad/bomb.png", png.getvalue(), "")]
    refs = upload(store, settings.images_bucket, good + bad)
    vanished = ObjectRef(settings.images_bucket, "bad/vanished.jpg", "0" * 32)
    batch = Batch("encode", tuple(refs) + (vanished,))

    handle = ModelHandle(settings, store)
    result = encode_batch(batch, settings, handle, store=store)
    assert result.encoded == 12 and result.model_version == model_card.version
    assert result.failures_by_reason == {"not_an_image": 1, "empty": 1, "truncated": 1, "too_many_pixels": 1,
                                         "missing": 1}
    assert min(result.read_s, result.infer_s, result.write_s) > 0

    rows = {r["key"]: r for r in lake_rows(settings, "codes")}
    assert sorted(rows) == sorted(k for k, _, _ in good)
    assert rows["cifar/3.jpg"]["labels"] == [str(cifar_jpegs[3][1]), "cifar"]
    assert rows["cifar/3.jpg"]["etag"] == refs[3].etag
    assert {r["batch_id"] for r in rows.values()} == {batch.batch_id}

    # Reference: the model's own encode on the same decoded images (CIFAR JPEGs carry no EXIF).
    model = handle.current().model
    images = [Image.open(io.BytesIO(body)).convert("RGB") for _, body, _ in good]
    expected = model.encode(prepare_images(images, model.input_config))
    got = np.stack([np.frombuffer(rows[k]["code"], np.uint8) for k, _, _ in good])
    np.testing.assert_array_equal(got, expected)

    failures = lake_rows(settings, "failures")
    assert {f["key"]: f["reason"] for f in failures} == {
        "bad/notes.txt": "not_an_image", "bad/empty.jpg": "empty", "bad/truncated.jpg": "truncated",
        "bad/bomb.png": "too_many_pixels", "bad/vanished.jpg": "missing"}
    assert all(f["model"] == model_card.version and f["failed_at"] for f in failures)


def test_retried_and_duplicated_batches_leave_one_row_and_read_nothing(settings, store, model_card, cifar_jpegs):
    refs = upload(store, settings.images_bucket, [(f"k{i}.jpg", b, "") for i, (_, _, b) in enumerate(cifar_jpegs[:4])])
    handle = ModelHandle(settings, store)
    first = encode_batch(Batch("encode", tuple(refs)), settings, handle, store=store)
    assert (first.encoded, first.known) == (4, 0)
    again = encode_batch(Batch("encode", tuple(reversed(refs)) + (refs[0],)), settings, handle, store=store)
    assert (again.encoded, again.known, again.read_s) == (0, 4, 0.0)  # nothing read, nothing forwarded
    overlapping = encode_batch(Batch("encode", tuple(refs[2:])), settings, handle, store=store)  # another batch id
    assert (overlapping.encoded, overlapping.known) == (0, 2)
    rows = lake_rows(settings, "codes")
    assert sorted(r["key"] for r in rows) == [f"k{i}.jpg" for i in range(4)]


def test_an_upload_of_the_same_bytes_after_a_delete_is_a_new_version(settings, store, model_card, cifar_jpegs):
    [ref] = upload(store, settings.images_bucket, [("again.jpg", cifar_jpegs[0][2], "")])
    handle = ModelHandle(settings, store)
    first = ObjectRef(ref.bucket, ref.key, ref.etag, mtime_ns=1_000_000_000)
    assert encode_batch(Batch("encode", (first,)), settings, handle, store=store).encoded == 1
    tombstone_batch(Batch("delete", (ObjectRef(ref.bucket, ref.key, mtime_ns=1_500_000_000),)), settings)
    later = ObjectRef(ref.bucket, ref.key, ref.etag, mtime_ns=1_700_000_000)  # identical bytes: same etag
    result = encode_batch(Batch("encode", (later,)), settings, handle, store=store)
    assert (result.encoded, result.known) == (1, 0)
    assert sorted(r["mtime_ns"] for r in lake_rows(settings, "codes")) == [1_000_000_000, 1_700_000_000]


def test_missing_model_is_a_clear_error(settings, store, cifar_jpegs):
    refs = upload(store, settings.images_bucket, [("a.jpg", cifar_jpegs[0][2], "")])
    with pytest.raises(ModelNotFound, match="no active model.*hashlake model init"):
        encode_batch(Batch("encode", tuple(refs)), settings, ModelHandle(settings, store), store=store)
    assert lake_rows(settings, "codes") == []


def test_dead_store_is_transient_not_a_failure(settings, store, model_card, tmp_path):
    handle = ModelHandle(settings, store)
    dead = ObjectStore(Settings(s3_endpoint=f"http://127.0.0.1:{free_port()}", stack_dir=tmp_path),
                       timeout_s=0.5, retries=0)
    batch = Batch("encode", (ObjectRef(settings.images_bucket, "a.jpg", "e"),))
    with pytest.raises(StoreUnavailable):
        encode_batch(batch, settings, handle, store=dead)
    assert lake_rows(settings, "failures") == []


def test_handle_follows_the_active_pointer(settings, store, model_card):
    handle = ModelHandle(settings, store, check_interval_s=0.0)
    assert handle.current().version == model_card.version
    catalog = Catalog(store, settings)
    second = handle.current().card.__class__(**{**model_card.__dict__, "version": model_card.version + "-b"})
    catalog.publish(second, handle.current().model.state_dict())
    catalog.activate(second.version)
    assert handle.current().version == second.version
    pinned = ModelHandle(settings.model_copy(update={"model_version": model_card.version}), store)
    assert pinned.current().version == model_card.version


def test_a_batch_naming_a_version_is_encoded_with_it_beside_the_active_one(settings, store, model_card, cifar_jpegs):
    # Another input size: another model version, whose codes differ from the active one's.
    staged = init_model(settings, "lsh_effnetlite0_64", img_size=IMG_SIZE + 32, activate=False, store=store)
    good = [(f"k{i}.jpg", body, "") for i, (_, _, body) in enumerate(cifar_jpegs[:6])]
    refs = upload(store, settings.images_bucket, good)
    handle = ModelHandle(settings, store, check_interval_s=0.0)
    result = encode_batch(Batch("encode", tuple(refs), model_version=staged.version), settings, handle, store=store)
    assert result.model_version == staged.version
    loaded = handle.current(staged.version)
    images = [Image.open(io.BytesIO(body)).convert("RGB") for _, body, _ in good]
    expected = loaded.model.encode(prepare_images(images, loaded.model.input_config))
    rows = {r["key"]: r["code"] for r in lake_rows(settings, "codes", f"WHERE model = '{staged.version}'")}
    np.testing.assert_array_equal(np.stack([np.frombuffer(rows[k], np.uint8) for k, _, _ in good]), expected)
    # The followed version is still the active one; once the pointer moves, the staged model is reused.
    assert handle.current().version == model_card.version
    assert encode_batch(Batch("encode", tuple(refs)), settings, handle, store=store).model_version == model_card.version
    Catalog(store, settings).activate(staged.version)
    assert handle.current() is loaded


def test_batch_messages_carry_their_model_version():
    refs = (ObjectRef("images", "a.jpg", "e1"), ObjectRef("images", "b.jpg", "e2"))
    staged = Batch("encode", refs, model_version="v2")
    assert Batch.from_json(staged.to_json()) == staged
    halves = split_batch(staged, deaths=2)
    assert [h.model_version for h in halves] == ["v2", "v2"]
    assert Batch.from_json(Batch("encode", refs).to_json()).model_version is None
    assert staged.delivery_key == f"v2/{staged.batch_id}" and Batch("encode", refs).delivery_key == staged.batch_id
    with pytest.raises(ValueError, match="model_version 7 is not a version id"):
        Batch.from_json({**staged.to_json(), "model_version": 7})


def test_tombstone_batch(settings, store):
    batch = Batch("delete", (ObjectRef(settings.images_bucket, "gone.jpg", event_time="2026-11-22T10:00:00.250Z"),
                             ObjectRef(settings.images_bucket, "old.jpg", mtime_ns=7, version_id="v3")))
    assert tombstone_batch(batch, settings) == 2
    rows = {r["key"]: r for r in lake_rows(settings, "deletes")}
    assert rows["gone.jpg"]["mtime_ns"] == 1_795_341_600_250_000_000 and rows["gone.jpg"]["version_id"] is None
    assert (rows["old.jpg"]["mtime_ns"], rows["old.jpg"]["version_id"]) == (7, "v3")
    with pytest.raises(ValueError, match="deletes go to tombstone_batch"):
        encode_batch(batch, settings, ModelHandle(settings, store), store=store)


def test_init_model_publishes_an_honest_card_and_activates_it(settings, store, model_card):
    catalog = Catalog(store, settings)
    assert catalog.active() == model_card.version and catalog.card(model_card.version) == model_card
    assert (model_card.arch, model_card.bits, model_card.input_size) == ("lsh_effnetlite0_64", 64, IMG_SIZE)
    assert "pretrained" in model_card.description and "fixed random" in model_card.description


def test_an_object_overwritten_since_its_event_is_left_to_its_newer_version(settings, store, model_card, cifar_jpegs):
    # The events announced older versions; the store now serves others: those are encoded (or refused)
    # when their own events come, with their own order, so nothing is written for the announced ones.
    announced = "0" * 32
    current = {key: store.put(settings.images_bucket, key, body) for key, body in
               [("ok.jpg", cifar_jpegs[0][2]), ("bad/notes.txt", b"plain text"), ("bad/cut.jpg", cifar_jpegs[0][2][:300])]}
    refs = tuple(ObjectRef(settings.images_bucket, key, announced) for key in current)
    vanished = ObjectRef(settings.images_bucket, "bad/vanished.jpg", announced)
    handle = ModelHandle(settings, store)
    result = encode_batch(Batch("encode", refs + (vanished,)), settings, handle, store=store)
    assert (result.encoded, result.superseded, result.failures_by_reason) == (0, 3, {"missing": 1})
    assert [(f["key"], f["etag"]) for f in lake_rows(settings, "failures")] == [("bad/vanished.jpg", announced)]
    newer = tuple(ObjectRef(settings.images_bucket, key, etag) for key, etag in current.items())
    result = encode_batch(Batch("encode", newer), settings, handle, store=store)
    assert (result.encoded, result.failures_by_reason) == (1, {"not_an_image": 1, "truncated": 1})
    assert {f["key"]: f["etag"] for f in lake_rows(settings, "failures", "WHERE reason <> 'missing'")} == {
        k: e for k, e in current.items() if k != "ok.jpg"}


def test_an_object_missing_once_and_found_later_is_indexed(settings, store, model_card, cifar_jpegs):
    body = cifar_jpegs[1][2]
    late = ObjectRef(settings.images_bucket, "late.jpg", hashlib.md5(body).hexdigest())  # S3's etag of one PUT
    batch = Batch("encode", (late,) + tuple(upload(store, settings.images_bucket, [("a.jpg", cifar_jpegs[0][2], "")])))
    handle = ModelHandle(settings, store)
    first = encode_batch(batch, settings, handle, store=store)  # the event outran the object: missing
    assert first.failures_by_reason == {"missing": 1} and first.encoded == 1
    assert store.put(settings.images_bucket, "late.jpg", body) == late.etag
    # a missing object is not a known version: the redelivery reads it again
    again = encode_batch(batch, settings, handle, store=store)
    assert (again.encoded, again.failed, again.known) == (1, 0, 1)
    assert sorted(r["key"] for r in lake_rows(settings, "codes")) == ["a.jpg", "late.jpg"]


def test_split_batch_halves_the_distinct_objects_and_carries_the_deaths():
    refs = tuple(ObjectRef("images", f"k{i}.jpg", f"e{i}") for i in range(5))
    batch = Batch("encode", refs + (refs[0],), enqueued_at=123.0, crashes=3)
    left, right = split_batch(batch, deaths=2)
    assert [r.key for r in left.objects] == ["k0.jpg", "k1.jpg"]
    assert [r.key for r in right.objects] == ["k2.jpg", "k3.jpg", "k4.jpg"]
    assert (left.crashes, right.crashes, left.enqueued_at) == (5, 5, 123.0)
    assert Batch.from_json(left.to_json()) == left  # the deaths travel with the message
    with pytest.raises(ValueError, match="one object"):
        split_batch(Batch("encode", (refs[0], refs[0])), deaths=2)


def test_record_crashed_writes_one_row_per_object_naming_the_deaths(settings, store, model_card):
    ref = ObjectRef(settings.images_bucket, "posters/huge.png", "abc123")
    batch = Batch("encode", (ref,), crashes=4)
    history = History(2, "Worker exited prematurely: signal 9 (SIGKILL) Job: 7.", "")
    result = record_crashed(batch, history, settings, ModelHandle(settings, store))
    assert (result.encoded, result.failures_by_reason) == (0, {"crashed_worker": 1})
    [row] = lake_rows(settings, "failures")
    assert (row["key"], row["etag"], row["reason"], row["model"]) == ("posters/huge.png", "abc123", "crashed_worker",
                                                                      model_card.version)
    assert "killed the worker process 6 times (2 in a batch of its own, 4 in the larger batches" in row["detail"]
    assert "signal 9 (SIGKILL)" in row["detail"]


# -- one bad object never takes its batch down ------------------------------------------------------
def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def pillow_plugin_failures() -> dict[str, tuple[bytes, str]]:
    """Real files on which Pillow's plugins raise outside OSError/ValueError/SyntaxError (found by
    mutating valid files): key → (bytes, the exception type the failure row must name)."""
    gradient = Image.linear_gradient("L").resize((24, 20)).convert("RGB")
    dds = bytearray(_saved(gradient.convert("RGBA"), "DDS"))
    dds[80:84] = (0).to_bytes(4, "little")  # DDS_PIXELFORMAT.dwFlags: no RGB, no FourCC bit
    blp = bytearray(_saved(gradient.convert("P"), "BLP"))
    blp[4:8] = (0x00FF0001).to_bytes(4, "little")  # BLP2 compression field: not one Pillow implements
    files = {"odd/pixel-format.dds": (bytes(dds), "NotImplementedError"),
             "odd/compression.blp": (bytes(blp), "BLPFormatError")}
    from PIL import features

    if features.check("avif"):
        avif = bytearray(_saved(gradient, "AVIF"))
        avif[125] = 255  # inside the meta box: libavif finds no image item
        files["odd/item.avif"] = (bytes(avif), "RuntimeError")
    return files


def test_pillow_plugin_errors_are_failure_rows_and_the_rest_is_indexed(settings, store, model_card, cifar_jpegs):
    odd = pillow_plugin_failures()
    good = [(f"cifar/{i}.jpg", body, "") for i, (_, _, body) in enumerate(cifar_jpegs[:5])]
    refs = upload(store, settings.images_bucket, good + [(key, body, "") for key, (body, _) in odd.items()])
    result = encode_batch(Batch("encode", tuple(refs)), settings, ModelHandle(settings, store), store=store)
    assert result.encoded == 5 and result.failures_by_reason == {"corrupt": len(odd)}
    assert sorted(r["key"] for r in lake_rows(settings, "codes")) == sorted(k for k, _, _ in good)
    failures = {f["key"]: f for f in lake_rows(settings, "failures")}
    assert sorted(failures) == sorted(odd)
    for key, (body, exception) in odd.items():
        assert failures[key]["detail"].startswith(f"s3://{settings.images_bucket}/{key}: ")
        assert f"({exception}: " in failures[key]["detail"]
        assert failures[key]["etag"] == hashlib.md5(body).hexdigest()


@pytest.fixture
def faulty_card(settings, store):
    import faulty_model  # noqa: F401 — registers faulty_effnetlite0_64 (imported here, not at collection)

    return init_model(settings, "faulty_effnetlite0_64", img_size=IMG_SIZE, store=store)


def test_a_forward_that_raises_fails_the_batch_naming_it_and_writes_nothing(settings, store, faulty_card, cifar_jpegs):
    from workers.encode.runner import ForwardFailed

    flat = _saved(Image.new("RGB", (40, 30), (250, 250, 250)), "PNG")
    good = [(f"cifar/{i}.jpg", body, "") for i, (_, _, body) in enumerate(cifar_jpegs[:5])]
    refs = upload(store, settings.images_bucket, [("flat.png", flat, "")] + good)
    handle = ModelHandle(settings, store)
    batch = Batch("encode", tuple(refs))
    with pytest.raises(ForwardFailed, match=rf"over 6 images of batch {batch.batch_id} \(s3://.*/flat.png and 5 more\) "
                                            r"raised ValueError: faulty model: 1 flat image"):
        encode_batch(batch, settings, handle, store=store)
    assert lake_rows(settings, "codes") == lake_rows(settings, "failures") == []  # nothing: the batch comes again
    # Without the flat image the same model encodes (the codes of lsh_effnetlite0_64).
    assert encode_batch(Batch("encode", tuple(refs[1:])), settings, handle, store=store).encoded == 5


def test_record_crashed_names_the_error_of_a_batch_that_raised(settings, store, model_card):
    ref = ObjectRef(settings.images_bucket, "flat.png", "abc123")
    history = History(2, "", "ForwardFailed in pool process 7: the forward of model m over 1 images raised ValueError")
    record_crashed(Batch("encode", (ref,), crashes=2), history, settings, ModelHandle(settings, store))
    [row] = lake_rows(settings, "failures")
    assert row["reason"] == "crashed_worker"
    assert row["detail"].startswith("s3://") and "encoding it failed 4 times (2 in a batch of its own" in row["detail"]
    assert "last error: ForwardFailed in pool process 7" in row["detail"]


def test_an_error_preparing_images_fails_the_batch_and_is_never_recorded(settings, store, cifar_jpegs):
    """Not a refusal: a preprocessing that fails on every image must not turn the bucket into failure rows.
    The batch fails naming the object (workers.tasks splits it); alone, the object is not recorded either,
    since this process cannot encode its own self-check image."""
    import faulty_model  # noqa: F401 — registers faultyprep_effnetlite0_64

    from workers.encode.runner import LoadFailed

    init_model(settings, "faultyprep_effnetlite0_64", img_size=IMG_SIZE, store=store, center_limit=0)  # no centring: it prepares images
    refs = upload(store, settings.images_bucket, [(f"k{i}.jpg", body, "") for i, (_, _, body) in enumerate(cifar_jpegs[:3])])
    handle = ModelHandle(settings, store)
    with pytest.raises(LoadFailed, match=r"loading s3://.*/k\d.jpg for batch \w+ raised RuntimeError"):
        encode_batch(Batch("encode", tuple(refs)), settings, handle, store=store)
    with pytest.raises(RuntimeError):
        record_crashed(Batch("encode", tuple(refs[:1])), History(2, "", "LoadFailed ..."), settings, handle)
    assert lake_rows(settings, "codes") == lake_rows(settings, "failures") == []
