"""Uploading images to the images bucket, as any S3 client would, with labels as user metadata."""
from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from hashlake.image_sources import LabeledImage
from hashlake.store import ObjectStore


def upload_one(store: ObjectStore, bucket: str, image: LabeledImage) -> str:
    """PUT one image with ``x-amz-meta-labels`` (comma-separated); return its etag."""
    content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    metadata = {"labels": ",".join(image.labels)} if image.labels else None
    return store.put(bucket, image.name, image.body, content_type=content_type, metadata=metadata)


def upload_all(store: ObjectStore, bucket: str, images: Iterable[LabeledImage], threads: int = 8) -> dict[str, str]:
    """PUT every image (``threads`` at a time); return ``{key: etag}``."""
    images = list(images)
    with ThreadPoolExecutor(threads) as pool:
        etags = list(pool.map(lambda im: upload_one(store, bucket, im), images))
    return {im.name: etag for im, etag in zip(images, etags)}
