"""Retraining at scale: the head-mode re-encode from stored features (Ray Data), the Ray Train head fit, and
the fine-tune re-encode of uploaded images through a Ray Data actor pool.

Starts its own PostgreSQL and moto_server (the lake as the product keeps it: catalog in PostgreSQL,
Parquet files in the index bucket), then:

  1. re-encode: N images' codes and pooled features (D = 1280, float16, as the encode workers commit
     them, here written in bulk) under an active version; ``scheduler.retrain.reencode.reencode_head``
     writes every image's code under a candidate head (the one a retraining trains by default: HashNet's
     MLP head), read from the features table, through Ray Data, committed block by block. Beside it, the
     bare head forward over the same features in memory (the reference: what the re-encode would cost
     with no lake and no Ray). -> rows/s, ratio
  2. retrain: the cifar10 protocol's 5,000 training images (4,500 fit + 500 validation) at 128 px,
     their backbone features computed once (cached by ``hashing_models.features``), a head trained by
     ``scheduler.retrain.train.train_head`` (Ray Train, the job's own step) with the job's settings;
     its tie-expected mAP@ALL on the protocol's query set against its database. -> s, mAP
  3. fine-tune re-encode (``--finetune-images N``): N CIFAR-10 JPEGs uploaded to the images bucket as
     they are, their codes rows under an active version, and
     ``scheduler.retrain.reencode_images.reencode_images`` writing every image's code and features under a
     candidate of the same architecture (a new backbone's cost is its architecture's), from the bytes,
     through the Ray Data actor pool (read ▶ decode ▶ prepare ▶ forward, committed block by block).
     Beside it, the bare forward of the same model over the same images, decoded and prepared in memory
     beforehand, in the same batch size and thread count (the reference). -> img/s, ratio

    .venv/bin/python benchmarks/reencode.py --images 1000000
    .venv/bin/python benchmarks/reencode.py --images 100000 --skip-retrain     # a quick look
    .venv/bin/python benchmarks/reencode.py --images 0 --skip-retrain --finetune-images 5000   # fine-tune part only

The RESULT lines come last.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashlake.config import Settings  # noqa: E402
from hashlake.lake.connection import open_lake  # noqa: E402
from hashlake.lake.features import encode_features  # noqa: E402
from hashlake.lake.schema import CODES_SCHEMA, FEATURES_SCHEMA, LAKE  # noqa: E402
from private_lake import private_lake  # noqa: E402  (benchmarks/, this script's folder)

ACTIVE, CANDIDATE, BACKBONE = "bench-active", "bench-candidate", "effnetlite0-128px-bench"
DIM, BITS, CHUNK = 1280, 64, 50_000
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10.parquet"


def fill(settings: Settings, n: int) -> float:
    """N images' codes (under ACTIVE) and features rows, in bulk inserts of CHUNK rows → seconds."""
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    con = open_lake(settings)
    try:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            keys = [f"img/{i:08d}.jpg" for i in range(start, start + m)]
            etags = [f"{i:032x}" for i in range(start, start + m)]
            ident = {"bucket": ["images"] * m, "key": keys, "etag": etags, "version_id": [None] * m,
                     "mtime_ns": list(range(start, start + m))}
            codes = pa.table({**ident, "size": [1000] * m, "last_modified": [NOW] * m,
                              "code": [bytes(c) for c in rng.integers(0, 256, (m, BITS // 8), dtype=np.uint8)],
                              "model": [ACTIVE] * m, "encoded_at": [NOW] * m, "labels": [["x"]] * m,
                              "batch_id": ["bench"] * m}, schema=CODES_SCHEMA)
            features = pa.table({**ident, "backbone": [BACKBONE] * m,
                                 "feature": encode_features(rng.standard_normal((m, DIM), dtype=np.float32)),
                                 "encoded_at": [NOW] * m, "batch_id": ["bench"] * m}, schema=FEATURES_SCHEMA)
            con.register("_codes", codes)
            con.register("_features", features)
            con.execute("BEGIN")
            con.execute(f"INSERT INTO {LAKE}.codes SELECT * FROM _codes")
            con.execute(f"INSERT INTO {LAKE}.features SELECT * FROM _features")
            con.execute("COMMIT")
            con.unregister("_codes")
            con.unregister("_features")
    finally:
        con.close()
    return time.perf_counter() - started


def candidate_head(settings: Settings):
    """The head a head-mode retraining trains by default: the settings' method with its head family as the
    trainer resolves it (an MLP, 1280 → 512 → 64, for HashNet), on the benchmark's backbone and bits."""
    from hashing_models.registry import create_model
    from hashing_models.trainer import TrainConfig

    cfg = TrainConfig(method=settings.retrain_method, bits=BITS, pretrained="none", img_size=128)
    return create_model(cfg.arch, pretrained=False, img_size=128, head=cfg.head).head.eval(), cfg


def bare_head_rows_per_s(head, n: int) -> tuple[float, int]:
    """The reference: the same head over N float16 feature rows held in memory, decoded and forwarded in the
    re-encode's slices (``HEAD_SLICE_ROWS``), with the torch threads of the actor that runs the re-encode's
    head (Ray gives it 1 CPU, hence OMP_NUM_THREADS=1). → (rows/s, torch threads)."""
    import torch

    from hashing_models.codes import pack_signs
    from scheduler.retrain.reencode import HEAD_SLICE_ROWS

    threads = torch.get_num_threads()
    torch.set_num_threads(encoder_threads())
    rows = np.random.default_rng(1).standard_normal((min(n, CHUNK), DIM), dtype=np.float32).astype(np.float16)
    started = time.perf_counter()
    done = 0
    with torch.inference_mode():
        while done < n:
            for start in range(0, min(CHUNK, n - done), HEAD_SLICE_ROWS):
                block = torch.from_numpy(rows[start:min(start + HEAD_SLICE_ROWS, n - done)].astype(np.float32))
                pack_signs(head(block).h)
                done += len(block)
    seconds = time.perf_counter() - started
    used = torch.get_num_threads()
    torch.set_num_threads(threads)
    return n / seconds, used


def encoder_threads() -> int:
    """torch's threads inside a 1-CPU Ray actor, as the re-encode's ``HeadEncoder`` runs."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def reencode(settings: Settings, head) -> dict:
    from scheduler.retrain.reencode import reencode_head

    con = open_lake(settings)
    try:
        return reencode_head(settings, con, active=ACTIVE, candidate=CANDIDATE, backbone=BACKBONE, head=head,
                             run_id="bench", progress=lambda done, total: None)
    finally:
        con.close()


def retrain(settings: Settings) -> tuple[float, float]:
    """(seconds of the train step, tie-expected mAP@ALL on the protocol's query set vs its database)."""
    import torch

    from hashing_models.codes import pack_signs
    from hashing_models.parquet_dataset import read_index
    from hashing_models.evaluate import evaluate_retrieval
    from hashing_models.features import POOLED, extract_features
    from hashing_models.protocols import load_split
    from hashing_models.registry import create_model
    from scheduler.retrain.data import LabelledImages
    from scheduler.retrain.train import head_config, train_head

    split = load_split("cifar10", CIFAR10)
    backbone = create_model("lsh_effnetlite0_64", pretrained=True, img_size=128).backbone
    fit_val = np.concatenate([split.train, split.val])
    every = np.unique(np.concatenate([fit_val, split.query, split.database]))
    features = extract_features(backbone, CIFAR10, every, (POOLED,))[POOLED]
    row = {int(i): p for p, i in enumerate(every)}
    labels = read_index(CIFAR10).labels.astype(np.int64)
    one_hot = np.eye(10, dtype=np.int8)
    take = np.asarray([row[int(i)] for i in fit_val])
    names = np.array(["train"] * len(split.train) + ["validation"] * len(split.val), dtype=object)
    data = LabelledImages(snapshot=0, refs=pa.table({"key": [str(i) for i in fit_val]}),
                          features=features[take].astype(np.float16).astype(np.float32),
                          labels=one_hot[labels[fit_val]], label_names=[str(c) for c in range(10)], split=names,
                          active_codes=np.zeros((len(fit_val), BITS // 8), np.uint8), without_features=0)

    class Card:  # the active version's card as head_config reads it
        backbone, bits, input_size = "effnetlite0", BITS, 128

    cfg = head_config(settings, Card, data)
    started = time.perf_counter()
    head_state, figures = train_head(settings, "bench-retrain", cfg, data, "cifar10 protocol, 128 px")
    seconds = time.perf_counter() - started
    model = create_model(cfg.arch, pretrained=False, img_size=128, num_classes=10, head=cfg.head)
    model.head.load_state_dict(head_state)
    model.eval()

    def codes(indices):
        rows = torch.from_numpy(features[[row[int(i)] for i in indices]])
        with torch.inference_mode():
            return pack_signs(model.forward_head(rows).h)

    result = evaluate_retrieval(codes(split.query), labels[split.query], codes(split.database),
                                labels[split.database], topk=())
    print(f"retrain: {cfg.method} head, {cfg.epochs} epochs, {seconds:.1f} s in Ray Train, best epoch "
          f"{figures['best_epoch']}, val mAP {figures['val_map']:.4f}")
    return seconds, result.map_tie_expected


FINETUNE_PX = 128  # the default input size of `hashlake model init` (hashlake.model_versions.DEFAULT_IMG_SIZE)


def finetune_lake(settings: Settings, store, n: int, dataset: Path) -> tuple[str, str]:
    """Upload N CIFAR-10 JPEGs; an active version with a codes row per image (the rows the re-encode
    reads: codes are random, they are not read) and a candidate version → (active, candidate)."""
    from hashlake.catalog import Catalog
    from hashlake.image_sources import iter_images
    from hashlake.model_versions import init_model
    from hashlake.upload import upload_all

    images = list(iter_images(dataset, limit=n))
    etags = upload_all(store, settings.images_bucket, images)
    active = init_model(settings, img_size=FINETUNE_PX, store=store, center_limit=0).version
    candidate = init_model(settings, img_size=FINETUNE_PX, activate=False, store=store, center_limit=0).version
    Catalog(store, settings).activate(active)
    rng = np.random.default_rng(2)
    rows = pa.table({"bucket": [settings.images_bucket] * n, "key": [im.name for im in images],
                     "etag": [etags[im.name] for im in images], "version_id": [None] * n,
                     "size": [len(im.body) for im in images], "last_modified": [NOW] * n,
                     "mtime_ns": list(range(n)),
                     "code": [bytes(c) for c in rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)],
                     "model": [active] * n, "encoded_at": [NOW] * n, "labels": [list(im.labels) for im in images],
                     "batch_id": ["bench"] * n}, schema=CODES_SCHEMA)
    con = open_lake(settings)
    try:
        con.register("_codes", rows)
        con.execute(f"INSERT INTO {LAKE}.codes SELECT * FROM _codes")
        con.unregister("_codes")
    finally:
        con.close()
    return active, candidate


def bare_forward_images_per_s(settings: Settings, store, candidate: str, n: int, dataset: Path) -> float:
    """The reference: the candidate's forward (and sign/pack) over the N images decoded and prepared in
    memory beforehand (not timed), in the re-encode's forward chunks (``runner.largest_forward``: 16 images
    on a CPU), on this process's threads."""
    import torch

    from hashing_models.decode import decode_image
    from hashing_models.preprocess import prepare_images
    from hashlake.catalog import Catalog
    from hashlake.image_sources import iter_images
    from hashlake.model_versions import load_version
    from workers.encode.active_model import pack
    from workers.encode.runner import largest_forward

    model = load_version(Catalog(store, settings), candidate)
    images = [decode_image(im.body, settings.max_image_pixels) for im in iter_images(dataset, limit=n)]
    block = largest_forward(torch.device("cpu"))  # this reference runs on the CPU
    pixels = [prepare_images(images[b: b + block], model.input_config) for b in range(0, n, block)]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in pixels:
            pack(model(batch).h)
    return n / (time.perf_counter() - started)


def finetune_reencode(settings: Settings, store, n: int, dataset: Path) -> tuple[dict, float]:
    """(the re-encode step's figures, the bare forward's img/s) over N uploaded images."""
    import torch

    from scheduler.retrain.reencode_images import reencode_images

    import ray

    active, candidate = finetune_lake(settings, store, n, dataset)
    torch.set_num_threads(max(1, int(ray.cluster_resources().get("CPU", 1))))  # the actor's thread count
    # the reference before and after the re-encode, their mean taken: the cores are shared, and their
    # load drifts over minutes
    before = bare_forward_images_per_s(settings, store, candidate, n, dataset)
    con = open_lake(settings)
    try:
        figures = reencode_images(settings, con, active=active, candidate=candidate, backbone="unused",
                                  run_id="bench-finetune", progress=lambda done, total: None)
    finally:
        con.close()
    after = bare_forward_images_per_s(settings, store, candidate, n, dataset)
    bare = (before + after) / 2
    print(f"fine-tune re-encode: {figures}; bare forward {before:,.1f} img/s before, {after:,.1f} after, "
          f"at {FINETUNE_PX} px")
    return figures, bare


def print_finetune_results(figures: dict, bare: float) -> None:
    print(f"RESULT finetune_reencode_images_per_s {figures['rows_per_s']:.1f}")
    print(f"RESULT finetune_bare_forward_images_per_s {bare:.1f}")
    print(f"RESULT reencode_vs_bare_forward_ratio {figures['rows_per_s'] / bare:.3f}")
    print(f"RESULT finetune_reencode_images {figures['rows']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--skip-retrain", action="store_true")
    parser.add_argument("--finetune-images", type=int, default=0,
                        help="also the fine-tune re-encode over this many uploaded CIFAR-10 images (0: not run)")
    parser.add_argument("--finetune-dataset", type=Path, default=CIFAR10,
                        help="the images the fine-tune part uploads (a CIFAR-style Parquet file)")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    figures = finetune = None
    with private_lake("hashlake-reencode-bench-") as (settings, store):
        if args.images:
            fill_s = fill(settings, args.images)
            print(f"fill: {args.images} codes + features rows in {fill_s:.1f} s")
            head, cfg = candidate_head(settings)
            bare, threads = bare_head_rows_per_s(head, args.images)
            figures = reencode(settings, head)
            print(f"re-encode ({cfg.method}, {cfg.head} head): {figures}; bare head forward {bare:,.0f} rows/s "
                  f"({threads} torch thread{'s' if threads > 1 else ''})")
        retrain_s = retrain_map = None
        if not args.skip_retrain:
            retrain_s, retrain_map = retrain(settings)
        if args.finetune_images:
            finetune = finetune_reencode(settings, store, args.finetune_images, args.finetune_dataset)
    if figures is not None:
        print(f"RESULT head_reencode_rows_per_s {figures['rows_per_s']:.0f}")
        print(f"RESULT head_forward_rows_per_s {bare:.0f}")
        print(f"RESULT head_reencode_vs_bare_head_ratio {figures['rows_per_s'] / bare:.3f}")
        print(f"RESULT head_reencode_images {figures['rows']}")
    if finetune is not None:
        print_finetune_results(*finetune)
    if retrain_s is not None:
        print(f"RESULT retrain_head_s {retrain_s:.1f}")
        print(f"RESULT retrain_head_map {retrain_map:.4f}")


if __name__ == "__main__":
    main()
