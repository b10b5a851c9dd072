"""Head-mode retraining at scale: the Ray Data re-encode from stored features, and the Ray Train head fit.

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

    .venv/bin/python benchmarks/reencode.py --images 1000000
    .venv/bin/python benchmarks/reencode.py --images 100000 --skip-retrain     # a quick look

Fine-tune mode (images through GPU actors) is not built, so ``reencode_vs_bare_forward_ratio`` of the
issue has nothing to measure yet. The RESULT lines come last.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--skip-retrain", action="store_true")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    with private_lake("hashlake-reencode-bench-") as (settings, store):
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
    print(f"RESULT head_reencode_rows_per_s {figures['rows_per_s']:.0f}")
    print(f"RESULT head_forward_rows_per_s {bare:.0f}")
    print(f"RESULT head_reencode_vs_bare_head_ratio {figures['rows_per_s'] / bare:.3f}")
    print(f"RESULT head_reencode_images {figures['rows']}")
    if retrain_s is not None:
        print(f"RESULT retrain_head_s {retrain_s:.1f}")
        print(f"RESULT retrain_head_map {retrain_map:.4f}")


if __name__ == "__main__":
    main()
