"""The nightly retraining job end to end on a real lake, S3 server and Ray cluster.

The lake is filled by the encode runner itself (read ▶ decode ▶ forward ▶ one commit of codes and
features per batch, without Celery around it), under an untrained LSH version at 64 px; the images
are CIFAR-10 sample images with their labels as user metadata. Then ``scheduler.retrain.job.run``
trains a head on the stored features, gates it, re-encodes and flips, exactly as the Ray job does; in
fine-tune mode it trains the backbone too, on the images read from the bucket, and re-encodes from them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hashlake.catalog import Catalog
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.model_versions import init_model
from hashlake.sql import connect
from hashlake.store import ObjectStore
from hashlake.upload import upload_all
from scheduler.retrain import job as retrain_job
from scheduler.retrain.reencode import TEST_BLOCK_DELAY_ENV
from scheduler.retrain.state import RunLog
from tests.conftest import cli_env
from workers.encode.active_model import ModelHandle
from workers.encode.runner import encode_batch
from workers.messages import Batch, ObjectRef

pytestmark = pytest.mark.services
IMAGES = list(iter_images(SAMPLE, limit=300))  # 30 per class
PX = 64  # the active version's input size: small, so that encoding 300 images takes seconds


@pytest.fixture(scope="module")
def ray_address():
    import ray

    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield info.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def indexed(settings, torch_one_thread):
    """Settings of a lake holding the 300 images under an active untrained version, with features."""
    settings = settings.model_copy(update={"retrain_epochs": 20, "reencode_block_rows": 100})
    store = ObjectStore(settings)
    for bucket in (settings.images_bucket, settings.index_bucket):
        store.ensure_bucket(bucket)
    etags = upload_all(store, settings.images_bucket, IMAGES)
    card = init_model(settings, img_size=PX, store=store, center_limit=100)
    handle = ModelHandle(settings, store)
    refs = [ObjectRef(settings.images_bucket, image.name, etags[image.name]) for image in IMAGES]
    for start in range(0, len(refs), 100):
        encode_batch(Batch("encode", tuple(refs[start:start + 100])), settings, handle, store=store)
    return settings, card.version


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    from hashlake.local.services import free_port, start_pushgateway

    svc = start_pushgateway(free_port(), tmp_path_factory.mktemp("pushgateway") / "pushgateway.log")
    yield f"127.0.0.1:{svc.port}"
    svc.stop()


def pushed(address: str) -> dict[tuple[str, frozenset], float]:
    """(series name, its labels but job and instance) → value, of what the Pushgateway holds."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(sample.name, frozenset((k, v) for k, v in sample.labels.items() if k not in ("job", "instance"))):
            sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.labels.get("job") == "hashlake-retrain"}


def served(settings) -> tuple[set[str], int]:
    """(model versions the ``codes`` view serves, its row count), as a user's query sees them."""
    con = connect(settings)
    try:
        return ({row[0] for row in con.execute("SELECT DISTINCT model FROM codes").fetchall()},
                con.execute("SELECT count(*) FROM codes").fetchone()[0])
    finally:
        con.close()


def test_retrain_gates_reencodes_and_flips_while_queries_see_one_version(indexed, ray_address, pushgateway):
    settings, untrained = indexed
    settings = settings.model_copy(update={"pushgateway_url": pushgateway})
    catalog = Catalog(ObjectStore(settings), settings)
    seen: list[tuple[set[str], int]] = []
    stop = threading.Event()

    def probe() -> None:  # a user querying all along: never a mix of versions, never a partial index
        while not stop.is_set():
            seen.append(served(settings))
            time.sleep(0.2)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        state = retrain_job.run(settings, "retrain-head-t1")
    finally:
        stop.set()
        prober.join()
    assert state.outcome == "succeeded", state.reason
    assert list(state.steps) == ["data", "train", "evaluate", "reencode", "flip"]
    data, evaluate, reencode = state.steps["data"], state.steps["evaluate"], state.steps["reencode"]
    assert data["images"] == len(IMAGES) and data["labels"] == 10 and data["without_features"] == 0
    assert evaluate["candidate_map"] > evaluate["active_map"] + 0.05  # learning from the labels pays
    assert reencode["rows"] == len(IMAGES) and reencode["without_features"] == 0
    assert catalog.active() == state.candidate and catalog.previous() == untrained
    card = catalog.card(state.candidate)
    assert card.metrics["lake_snapshot"] == data["snapshot"] and card.training["method"] == settings.retrain_method
    assert served(settings) == ({state.candidate}, len(IMAGES))
    assert seen and all(s in (({untrained}, len(IMAGES)), ({state.candidate}, len(IMAGES))) for s in seen)

    # the job pushed its figures: the run counts from the run records, the gate's mAP by version
    metrics = pushed(pushgateway)
    assert metrics[("hashlake_retrain_runs_total", frozenset({("outcome", "succeeded")}))] == 1
    assert metrics[("hashlake_retrain_runs_total", frozenset({("outcome", "failed")}))] == 0
    candidate_map = ("hashlake_model_map", frozenset({("version", state.candidate), ("split", "evaluation")}))
    assert metrics[candidate_map] == pytest.approx(evaluate["candidate_map"])
    assert metrics[("hashlake_retrain_step_seconds", frozenset({("step", "reencode")}))] > 0

    # the report of the new version over the lake agrees with the gate's figure for it
    from hashlake.report_lake import version_report

    report = version_report(settings, state.candidate)
    assert report.metrics.map_tie_expected == pytest.approx(evaluate["candidate_map"], abs=0.02)

    # a finished run is not run again; the record lists it
    again = retrain_job.run(settings, "retrain-head-t1")
    assert (again.outcome, again.steps) == (state.outcome, state.steps)
    assert [r.run_id for r in RunLog(settings).runs()] == ["retrain-head-t1"]

    # rollback: the previous version answers again, at once
    from hashlake.model_lifecycle import rollback

    rollback(settings)
    assert served(settings) == ({untrained}, len(IMAGES))


def test_a_worse_candidate_is_rejected_and_the_active_version_stays(indexed, ray_address, monkeypatch):
    settings, untrained = indexed
    from scheduler.retrain import train

    real = train.head_config

    def untrainable(*args, **kwargs):  # a head that cannot learn: lr 0 keeps its random initialisation
        from dataclasses import replace
        return replace(real(*args, **kwargs), lr=0.0, epochs=1, eval_every=1)

    good = retrain_job.run(settings, "retrain-head-good")
    assert good.outcome == "succeeded", good.reason
    monkeypatch.setattr(train, "head_config", untrainable)
    worse = retrain_job.run(settings.model_copy(update={"retrain_method": "dsh"}), "retrain-head-worse-2")
    assert worse.outcome == "rejected" and "rejected: candidate mAP@ALL" in worse.reason
    assert "reencode" not in worse.steps and "flip" not in worse.steps
    catalog = Catalog(ObjectStore(settings), settings)
    assert catalog.active() == good.candidate and worse.candidate in catalog.versions()
    assert served(settings) == ({good.candidate}, len(IMAGES))


def kill_during_reencode(job: subprocess.Popen, runs, run_id: str) -> None:
    """SIGKILL the job's process group once its record shows a committed re-encode block."""
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = runs.load(run_id)
            if state and state.progress.get("step") == "reencode" and state.progress.get("done", 0) > 0:
                break
            assert job.poll() is None, "the job ended before its re-encode step"
            time.sleep(0.2)
        else:
            raise AssertionError("the job never reached its re-encode step")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_a_job_killed_during_reencode_leaves_the_old_version_and_a_rerun_completes(indexed, ray_address):
    settings, untrained = indexed
    env = {**os.environ, **cli_env(settings), "RAY_ADDRESS": ray_address,
           "HASHLAKE_REENCODE_BLOCK_ROWS": "50", TEST_BLOCK_DELAY_ENV: "1.5"}
    runs = RunLog(settings)
    job = subprocess.Popen([sys.executable, "-m", "scheduler.retrain", "--run-id", "retrain-head-kill"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_during_reencode(job, runs, "retrain-head-kill")
    catalog = Catalog(ObjectStore(settings), settings)
    assert catalog.active() == untrained
    assert served(settings) == ({untrained}, len(IMAGES))
    killed = runs.load("retrain-head-kill")
    assert killed.outcome == "running" and "reencode" not in killed.steps and "train" in killed.steps

    resumed = retrain_job.run(settings, "retrain-head-kill")
    assert resumed.outcome == "succeeded", resumed.reason
    assert resumed.steps["train"] == killed.steps["train"]  # not trained again
    assert 0 < resumed.steps["reencode"]["rows"] < len(IMAGES)  # only what the killed attempt had not written
    assert served(settings) == ({resumed.candidate}, len(IMAGES))
    con = connect(settings)
    try:  # no image twice under the candidate in the lake itself
        rows = con.execute("SELECT count(*), count(DISTINCT (bucket, key, etag)) FROM lake.codes WHERE model = ?",
                           [resumed.candidate]).fetchone()
    finally:
        con.close()
    assert rows == (len(IMAGES), len(IMAGES))


def test_hashlake_retrain_wait_runs_the_job_on_the_ray_head(indexed, ray_head, tmp_path):
    """What a user runs: `hashlake retrain --wait` submits to the Ray head, follows the run, and the new
    version serves; `hashlake jobs` lists it."""
    from hashlake.local.stack import write_config

    settings, untrained = indexed
    config = tmp_path / "settings.toml"
    values = {name[len("HASHLAKE_"):].lower(): value for name, value in cli_env(settings).items()}
    write_config(config, {**values, "retrain_epochs": 10, "ray_address": f"http://127.0.0.1:{ray_head.port}"})
    env = {**os.environ, "HASHLAKE_CONFIG": str(config), "COLUMNS": "250"}
    hashlake = [sys.executable, "-m", "hashlake.cli"]
    out = subprocess.run([*hashlake, "retrain", "--wait"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.split()[1].rstrip(":")
    assert f"run {run_id}: succeeded" in out.stdout and "evaluate.candidate_map" in out.stdout
    state = RunLog(settings).load(run_id)
    assert Catalog(ObjectStore(settings), settings).active() == state.candidate != untrained
    assert served(settings) == ({state.candidate}, len(IMAGES))
    listed = subprocess.run([*hashlake, "jobs"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and run_id[:20] in listed.stdout and "succeeded" in listed.stdout


def test_too_few_labelled_images_fail_the_run_with_what_to_do(settings, ray_address):
    store = ObjectStore(settings)
    for bucket in (settings.images_bucket, settings.index_bucket):
        store.ensure_bucket(bucket)
    version = init_model(settings, img_size=PX, store=store, center_limit=0).version
    state = retrain_job.run(settings, "retrain-head-empty")
    assert state.outcome == "failed" and "step data" in state.reason and "retrain_min_images" in state.reason
    assert Catalog(store, settings).active() == version and "train" not in state.steps


def test_a_finetune_run_killed_during_reencode_leaves_the_old_version_and_a_rerun_flips_to_a_new_backbone(
        indexed, ray_address):
    """Fine-tune mode end to end: backbone and head trained on the images read from the bucket (1 epoch,
    after the head stage), the gate scoring codes made from the images, the re-encode through the actor
    pool killed after its first block, then resumed: the flip serves codes of the new backbone."""
    import numpy as np
    import torch

    from hashing_models.codes import pack_signs
    from hashlake.lake.features import decode_features
    from hashlake.model_versions import backbone_id, load_version

    settings, untrained = indexed
    # one epoch over 250 images at 64 px is a run of the pipeline, not of learning (the gate's decision is
    # the head-mode tests' subject): the gate lets any candidate through. Blocks of 10 images: the ~30
    # validation images the re-encode step has left after the evaluate step's are several blocks
    tiny = {"HASHLAKE_RETRAIN_EPOCHS": "10", "HASHLAKE_FINETUNE_EPOCHS": "1", "HASHLAKE_FINETUNE_BATCH_SIZE": "16",
            "HASHLAKE_FINETUNE_BLOCK_IMAGES": "10", "HASHLAKE_FINETUNE_LR": "1e-4", "HASHLAKE_RETRAIN_TOLERANCE": "1.0"}
    env = {**os.environ, **cli_env(settings), **tiny, "RAY_ADDRESS": ray_address, TEST_BLOCK_DELAY_ENV: "1.5"}
    runs = RunLog(settings)
    run_id = "retrain-finetune-kill"
    job = subprocess.Popen([sys.executable, "-m", "scheduler.retrain", "--run-id", run_id, "--mode", "finetune"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_during_reencode(job, runs, run_id)
    catalog = Catalog(ObjectStore(settings), settings)
    assert catalog.active() == untrained
    assert served(settings) == ({untrained}, len(IMAGES))
    killed = runs.load(run_id)
    assert killed.mode == "finetune" and killed.outcome == "running" and "reencode" not in killed.steps
    assert killed.steps["evaluate"]["promote"] and killed.steps["evaluate"]["unencoded"] == 0

    resumed = retrain_job.run(settings.model_copy(update={"retrain_epochs": 10, "finetune_epochs": 1,
                                                          "finetune_batch_size": 16, "finetune_block_images": 10,
                                                          "finetune_lr": 1e-4, "retrain_tolerance": 1.0}),
                              run_id)
    assert resumed.outcome == "succeeded", resumed.reason
    assert resumed.steps["train"] == killed.steps["train"]  # not trained again
    evaluated = killed.steps["evaluate"]["queries"] + killed.steps["evaluate"]["database"]
    # the gate's images were coded by the evaluate step; the re-encode did the rest, minus the killed block
    assert 0 < resumed.steps["reencode"]["rows"] < len(IMAGES) - evaluated
    assert resumed.steps["reencode"]["left_to_flip"] == 0
    assert catalog.active() == resumed.candidate and served(settings) == ({resumed.candidate}, len(IMAGES))
    card = catalog.card(resumed.candidate)
    assert card.training["mode"] == "finetune" and card.metrics["lake_snapshot"] == resumed.steps["data"]["snapshot"]
    assert card.metrics["images_read"] > 0 and card.metrics["images_unreadable"] == 0

    # a new backbone: its features were written with its codes, and its codes are not what the same head
    # would give on the old backbone's stored features (a head-only re-encode)
    model, active = load_version(catalog, resumed.candidate), load_version(catalog, untrained)
    new_backbone, old_backbone = backbone_id(model), backbone_id(active)
    assert new_backbone != old_backbone
    con = connect(settings)
    try:
        rows = con.execute("""
            SELECT c.code, n.feature AS new_feature, o.feature AS old_feature FROM lake.codes AS c
            JOIN lake.features AS n ON n.key = c.key AND n.etag = c.etag AND n.backbone = ?
            JOIN lake.features AS o ON o.key = c.key AND o.etag = c.etag AND o.backbone = ?
            WHERE c.model = ? ORDER BY c.key""", [new_backbone, old_backbone, resumed.candidate]).to_arrow_table()
        assert con.execute("SELECT count(*), count(DISTINCT (bucket, key, etag)) FROM lake.codes WHERE model = ?",
                           [resumed.candidate]).fetchone() == (len(IMAGES), len(IMAGES))
        for image in IMAGES[::60]:  # a query image is encoded by the new version: it finds its stored copy
            query = con.execute("SELECT hash_image(?::BLOB)", [image.body]).fetchone()[0]
            assert query == con.execute("SELECT code FROM codes WHERE key = ?", [image.name]).fetchone()[0]
    finally:
        con.close()
    assert rows.num_rows == len(IMAGES)
    codes = np.frombuffer(b"".join(rows["code"].to_pylist()), np.uint8).reshape(len(IMAGES), -1)
    with torch.inference_mode():
        from_new = pack_signs(model.forward_head(torch.from_numpy(decode_features(rows["new_feature"]))).h)
        from_old = pack_signs(model.forward_head(torch.from_numpy(decode_features(rows["old_feature"]))).h)
    differing = np.unpackbits(codes ^ from_old, axis=1).sum(1)
    assert np.mean(differing > 0) > 0.5  # most images' codes moved with the backbone
    assert np.mean(np.unpackbits(codes ^ from_new, axis=1).sum(1)) < 1  # the stored features are the codes'
