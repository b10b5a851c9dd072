"""Encode stages tested alone: decode (hashing_models.decode: orientation, modes, bad input), read (the
store's refusals), write."""
from __future__ import annotations

import io
import struct
import zlib
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from hashlake.catalog import ModelCard
from hashlake.lake.schema import CODES_SCHEMA, FAILURES_SCHEMA, epoch_ns
from hashing_models.decode import UndecodableImage, decode_image
from workers.encode.read import io_pool, read_object, start_io_threads
from workers.encode.rejects import (EMPTY, MISSING, NOT_AN_IMAGE, TOO_LARGE, TOO_MANY_PIXELS, TRUNCATED, UNREADABLE,
                                    Failure, ImageRejected)
from workers.encode.runner import unique_refs
from workers.encode.write import codes_table, deletes_table, failures_table, labels_of
from workers.messages import Batch, ObjectRef

from conftest import jpeg_bytes

LIMIT = 40_000_000  # Settings.max_image_pixels default


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A tiny 1×1 PNG whose IHDR claims width×height: decoding it would need width×height pixels."""
    body = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = body.index(b"IHDR")
    body[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    body[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(body[ihdr : ihdr + 17])))
    return bytes(body)


# -- decode ------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied():
    # 40×20, left half red, right half blue; orientation 6 = "rotate 90° clockwise to display"
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encoded(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("P", "GIF"), ("LA", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG")])
def test_any_mode_becomes_rgb(mode, fmt):
    if mode == "I;16":
        image = Image.fromarray(np.full((16, 24), 40000, dtype=np.uint16))
    else:
        image = Image.new("RGB", (24, 16), (10, 120, 240)).convert(mode)
    decoded = decode_image(encoded(image, fmt), LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (24, 16)
    if mode == "I;16":
        assert abs(decoded.getpixel((0, 0))[0] - 40000 * 255 / 65535) <= 1  # scaled, not clipped to 255


def test_palette_with_transparency_becomes_rgb():
    image = Image.new("P", (8, 8), 3)
    image.info["transparency"] = 3
    assert decode_image(encoded(image, "PNG", transparency=3), LIMIT).mode == "RGB"


@pytest.mark.parametrize("width,height", [(10_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_refused_from_the_header(width, height):
    # Between our limit and Pillow's (10k²), and above Pillow's own error threshold (100k²). The pixel
    # data is one byte: loading would fail as truncated, so too_many_pixels shows nothing was decoded.
    with pytest.raises(UndecodableImage) as info:
        decode_image(png_with_size(width, height), LIMIT, name="bomb.png")
    assert info.value.reason == TOO_MANY_PIXELS and "bomb.png" in str(info.value)


def test_pixel_limit_is_the_setting():
    body = jpeg_bytes(size=(100, 100))
    assert decode_image(body, 10_000).size == (100, 100)
    with pytest.raises(UndecodableImage, match="over the limit of 9999"):
        decode_image(body, 9_999)


def test_truncated_jpeg_refused():
    body = encoded(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    with pytest.raises(UndecodableImage) as info:
        decode_image(body[: len(body) // 2], LIMIT)
    assert info.value.reason == TRUNCATED


def test_zero_bytes_and_not_an_image_refused():
    with pytest.raises(UndecodableImage) as info:
        decode_image(b"", LIMIT)
    assert info.value.reason == EMPTY
    with pytest.raises(UndecodableImage) as info:
        decode_image(b"%PDF-1.4 not an image at all" * 10, LIMIT)
    assert info.value.reason == NOT_AN_IMAGE


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="unknown rejection reason"):
        ImageRejected("bad_vibes", "x")


# -- read ----------------------------------------------------------------------------------------
def test_read_object_and_its_refusals(store, settings):
    bucket = settings.images_bucket
    etag = store.put(bucket, "cat.jpg", jpeg_bytes(), metadata={"labels": "cat, animal,"})
    store.put(bucket, "empty.jpg", b"")
    store.put(bucket, "big.jpg", b"x" * 2048)
    # An archived object: the store answers InvalidObjectState, neither missing nor unavailable.
    store.client.put_object(bucket, "cold.jpg", io.BytesIO(b"abc"), 3, metadata={"x-amz-storage-class": "GLACIER"})
    fetched = read_object(store, ObjectRef(bucket, "cat.jpg"), 1024 * 1024)
    assert fetched.info.etag == etag and labels_of(fetched) == ["cat", "animal"]
    for key, reason in [("empty.jpg", EMPTY), ("nope.jpg", MISSING), ("big.jpg", TOO_LARGE),
                        ("cold.jpg", UNREADABLE)]:
        with pytest.raises(ImageRejected) as info:
            read_object(store, ObjectRef(bucket, key), 1024)
        assert info.value.reason == reason, key


def test_io_pool_is_reused():
    assert io_pool(4) is io_pool(4)


def test_io_threads_are_all_started_up_front():
    import os
    import threading

    def io_threads() -> int:
        return sum(t.name.startswith(f"hashlake-io-{os.getpid()}") for t in threading.enumerate())

    before = io_threads()  # threads of io_pool(4) the test above may have started
    start_io_threads(5)
    start_io_threads(5)  # the second call finds them all and starts none
    assert io_threads() == before + 5


def test_unique_refs_keeps_one_per_key():
    refs = (ObjectRef("b", "a.jpg", "e1"), ObjectRef("b", "c.jpg", "e2"), ObjectRef("b", "a.jpg", "e3"))
    assert [r.etag for r in unique_refs(refs)] == ["e1", "e2"]


# -- write ---------------------------------------------------------------------------------------
def card(bits: int = 64) -> ModelCard:
    return ModelCard(version="test-v1", arch=f"lsh_effnetlite0_{bits}", method="lsh", backbone="effnetlite0",
                     bits=bits, input_size=64, description="test")


def test_batch_rows_carry_the_lake_schema_and_the_version_order(store, settings):
    bucket = settings.images_bucket
    store.put(bucket, "k.jpg", jpeg_bytes(), metadata={"labels": "ship"})
    ordered = ObjectRef(bucket, "k.jpg", mtime_ns=1_795_341_600_250_000_123)  # an event's sequencer
    fetched = [read_object(store, ordered, 10**6), read_object(store, ObjectRef(bucket, "k.jpg"), 10**6)]
    now = datetime.now(timezone.utc)
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, dtype=np.uint8)
    table = codes_table(fetched, codes, card(), "batch1", now)
    assert table.schema.equals(CODES_SCHEMA)
    first, second = table.to_pylist()
    assert first["code"] == codes[0].tobytes() and first["labels"] == ["ship"] and first["model"] == "test-v1"
    assert first["etag"] == fetched[0].info.etag and first["size"] == fetched[0].info.size
    assert first["mtime_ns"] == ordered.mtime_ns and first["batch_id"] == "batch1"
    # no order from an event: the store's Last-Modified (whole seconds)
    assert second["mtime_ns"] == epoch_ns(fetched[1].info.last_modified) and second["mtime_ns"] % 10**9 == 0
    with pytest.raises(ValueError, match="code has 128 bits"):
        codes_table(fetched, np.zeros((2, 16), np.uint8), card(), "batch1", now)


def test_failure_and_delete_rows(store, settings):
    now = datetime.now(timezone.utc)
    failure = Failure(ObjectRef("images", "x.txt", "e1", mtime_ns=5), "e1", NOT_AN_IMAGE, "not an image")
    table = failures_table([failure], "test-v1", "b1", now)
    assert table.schema.equals(FAILURES_SCHEMA)
    assert (table.to_pylist()[0]["reason"], table.to_pylist()[0]["mtime_ns"]) == (NOT_AN_IMAGE, 5)

    batch = Batch("delete", (ObjectRef("images", "gone.jpg", event_time="2026-11-22T10:00:00.250Z"),
                             ObjectRef("images", "also.jpg"),
                             ObjectRef("images", "one.jpg", mtime_ns=9, version_id="v7")))
    rows = deletes_table(batch, now).to_pylist()
    assert rows[0]["deleted_at"] == datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=timezone.utc)
    assert rows[0]["mtime_ns"] == 1_795_341_600_250_000_000
    assert rows[1]["deleted_at"] == now and rows[1]["mtime_ns"] == epoch_ns(now)
    assert (rows[2]["mtime_ns"], rows[2]["version_id"]) == (9, "v7")
