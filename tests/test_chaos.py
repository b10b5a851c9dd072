"""benchmarks/chaos.py: a small run of the chaos benchmark (a private stack under every fault it
injects) ends with nothing lost, duplicated, stale or wrongly failed; and its comparison counts each
kind of wrong index it is meant to see."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import jpeg_bytes
from hashlake.model_versions import init_model
from workers.encode.active_model import ModelHandle
from workers.encode.runner import encode_batch
from workers.messages import Batch, ObjectRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.chaos import ChaosConfig, compare, run_chaos  # noqa: E402

pytestmark = pytest.mark.services


def test_a_small_chaos_run_loses_nothing(tmp_path):
    config = ChaosConfig(uploads=60, overwrite_fraction=0.05, delete_fraction=0.05, stall_s=2.0, outage_s=1.0,
                         settle_s=120.0, reconcile_interval_s=2.0, visibility_s=10.0)
    result = run_chaos(config, tmp_path / "stack", log=lambda *_: None)
    assert (result.lost, result.duplicates, result.stale, result.wrong_failures) == (0, 0, 0, 0), result.examples
    # 60 good + 8 unusual + 5 bad objects, 3 of the good ones deleted; every bad one failed for its reason.
    assert (result.listed, result.indexed, result.failed) == (70, 65, 5)
    done = "\n".join(result.faults)
    for fault in ("SIGKILL of the worker's pool children", "redis-server restarted", "intake restarted",
                  "S3 server stopped (SIGSTOP)"):
        assert fault in done


def test_the_comparison_counts_lost_stale_and_wrong_failures(settings, store):
    init_model(settings, "lsh_effnetlite0_64", img_size=32, store=store)
    bucket = settings.images_bucket
    refs = [ObjectRef(bucket, key, store.put(bucket, key, jpeg_bytes((i * 60, 20, 90))))
            for i, key in enumerate(["a.jpg", "b.jpg", "c.jpg"])]
    handle = ModelHandle(settings, store)
    encode_batch(Batch("encode", tuple(refs[:2])), settings, handle, store=store)  # c.jpg: never encoded
    clean = compare(settings, {})
    assert (clean.lost, clean.duplicates, clean.stale, clean.wrong_failures) == (1, 0, 0, 0)
    assert clean.examples == {"lost": ["c.jpg"]}
    store.put(bucket, "b.jpg", jpeg_bytes((1, 2, 3)))  # overwritten, its new version not encoded yet
    store.put(bucket, "bad.jpg", b"")
    encode_batch(Batch("encode", (ObjectRef(bucket, "bad.jpg", ""),)), settings, handle, store=store)
    found = compare(settings, {"bad.jpg": "not_an_image"})  # the run expected another reason
    assert (found.lost, found.stale, found.wrong_failures) == (2, 1, 1)
    assert found.examples["stale"] == ["b.jpg"] and found.examples["wrong_failures"] == ["bad.jpg"]
