"""Which split an image belongs to: a hash of its key, so the splits never change as the bucket grows.

The nightly retraining (``scheduler.retrain``) and ``hashlake report`` share it:

    train       the images a model is fit on, and the database of every evaluation
    validation  model selection during training (the trainer keeps its best epoch here)
    evaluation  the gate's queries: a candidate is compared with the active version on these only

An image's split is a function of ``bucket/key`` alone (the first 8 bytes of its SHA-256, mod 100), so
re-uploading, relabelling or adding other images never moves it, and every process agrees without
coordination. The shares are 80 / 10 / 10 per cent.
"""
from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "evaluation")
_BOUNDS = (80, 90)  # percent: [0, 80) train, [80, 90) validation, [90, 100) evaluation


def split_of(bucket: str, key: str) -> str:
    bucket_point = int.from_bytes(hashlib.sha256(f"{bucket}/{key}".encode()).digest()[:8], "big") % 100
    if bucket_point < _BOUNDS[0]:
        return "train"
    return "validation" if bucket_point < _BOUNDS[1] else "evaluation"


def split_sql(bucket: str = "bucket", key: str = "key") -> str:
    """The same rule as a DuckDB SQL expression over two columns (``split_of`` is its definition; a test
    holds them equal)."""
    point = (f"(('0x' || left(sha256({bucket} || '/' || {key}), 16))::UBIGINT % 100)")
    return (f"CASE WHEN {point} < {_BOUNDS[0]} THEN 'train' "
            f"WHEN {point} < {_BOUNDS[1]} THEN 'validation' ELSE 'evaluation' END")
