"""Retrieval quality on CIFAR-10: mAP@ALL of every deep hashing method and of LSH / ITQ, at 16–64 bits.

Two tracks, one trainer (hashing_models.trainer):

- ``frozen`` (CPU): EfficientNet-Lite0 ImageNet features at 224 px, computed once and cached; each
  method trains its hash head on the protocol's 4,500 fit images, is selected on the 500 validation
  images, and is evaluated once: 1,000 queries against the 54,000-image database (protocol cifar10).
- ``finetune`` (GPU, or a long CPU run at low resolution): the whole network end to end, protocols
  cifar10 and cifar10-2. ``--smoke`` shrinks it to a few hundred images and one epoch per method —
  a check that the track runs, not a measurement.

Prints a table (tie-expected mAP, the headline, since cifar10.parquet is stored by class; the
stable-tie mAP beside it in the JSON), writes PR curves (PNG) and all numbers (JSON) under
benchmarks/out/, and ends with ``RESULT map_<track>_<protocol>_<method>_<bits> <value>`` lines.

    python benchmarks/map_cifar10.py ../shared/datasets/cifar10.parquet --track frozen
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hashing_models.baselines import make_baseline
from hashing_models.parquet_dataset import read_index
from hashing_models.evaluate import RetrievalMetrics, evaluate_retrieval
from hashing_models.features import POOLED, ensure_features, extract_features, stages_kind
from hashing_models.protocols import Split, load_split
from hashing_models.trainer import STAGE_GRID, TrainConfig, build_model, encode_images, train

OUT = Path(__file__).resolve().parent / "out"
BITS = (16, 32, 48, 64)
DEEP_METHODS = ("dsh", "dpsh", "hashnet", "dhn", "csq", "dpn", "orthohash", "greedyhash", "bihalf", "dnnh", "mga")
BASELINES = ("lsh", "itq")

# Frozen track: per-method head settings, chosen on the validation split only (Split.val queries vs
# Split.train database, 224 px features; grid: lr 1e-4…1e-2, 30–100 epochs, feature dropout 0 / 0.3,
# batch 64 / 128, a few loss options). Every other TrainConfig field is its default (AdamW, cosine,
# batch 128, no dropout: dropout 0.3 lowered CSQ and HashNet by ~0.02).
FROZEN_HPARAMS: dict[str, dict] = {
    "dsh": dict(lr=3e-3, epochs=100),
    "dpsh": dict(lr=3e-3, epochs=100),
    "hashnet": dict(lr=1e-3, epochs=60),
    "dhn": dict(lr=3e-3, epochs=100),
    "csq": dict(lr=1e-3, epochs=60),
    "dpn": dict(lr=1e-3, epochs=60),
    "orthohash": dict(lr=1e-3, epochs=30),  # peaks by epoch 30 of 60, then slowly over-fits
    "greedyhash": dict(lr=1e-3, epochs=60),
    "bihalf": dict(lr=1e-3, epochs=60),
    "dnnh": dict(lr=1e-2, epochs=60, batch_size=64),  # B³ triplets: batch 64 is 8× cheaper per step
    "mga": dict(lr=3e-3, epochs=100),
}

# Fine-tune track: end-to-end settings (backbone at lr × 0.1); GPU defaults, --epochs / --px shrink them.
FINETUNE_HPARAMS = dict(lr=1e-3, epochs=30, batch_size=64, warmup_epochs=1.0, eval_every=5)


def fit_baseline(name: str, bits: int, train_features: np.ndarray, train_labels: np.ndarray):
    return make_baseline(name, bits, seed=0).fit(train_features, train_labels)


def evaluate(query_codes, db_codes, labels: np.ndarray, split: Split) -> RetrievalMetrics:
    return evaluate_retrieval(query_codes, labels[split.query], db_codes, labels[split.database], topk=(100, 1000))


def frozen_cells(parquet: Path, split: Split, labels: np.ndarray, methods, bits_list, args, log) -> list[dict]:
    """Train every (method, bits) on cached features, then evaluate; fit the baselines on the same features.

    Training needs only the fit and validation images' features, so every head is trained before the
    first query / database feature is read: on a cold cache the 55,000 evaluation images can still be
    extracting (``python -m hashing_models.features``) while the heads train.
    """
    trained = []
    for method in [m for m in methods if m not in BASELINES]:
        for bits in bits_list:
            cfg = TrainConfig(method=method, bits=bits, img_size=args.px, protocol=split.protocol,
                              **(FROZEN_HPARAMS[method] | ({"epochs": args.epochs} if args.epochs else {})))
            started = time.monotonic()
            result = train(cfg, parquet, split=split, cache_dir=args.cache_dir)
            trained.append((result, round(time.monotonic() - started, 1)))
            print(f"trained {cfg.arch}: val mAP {result.val_map:.4f} (epoch {result.best_epoch}) "
                  f"in {trained[-1][1]} s", flush=True)

    cells = []
    backbone = build_model(TrainConfig(method="csq", img_size=args.px)).backbone
    kinds = (POOLED, stages_kind(STAGE_GRID)) if "mga" in methods else (POOLED,)
    ensure_features(backbone, parquet, np.concatenate([split.query, split.database]), kinds, args.cache_dir)
    feats = {part: extract_features(backbone, parquet, getattr(split, part), cache_dir=args.cache_dir)["pooled"]
             for part in ("train_all", "query", "database")}  # (N_part, 1280) each
    for name in [m for m in methods if m in BASELINES]:
        for bits in bits_list:
            model = fit_baseline(name, bits, feats["train_all"], labels[split.train_all])
            metrics = evaluate(model.encode(feats["query"]), model.encode(feats["database"]), labels, split)
            cells.append(cell("frozen", split.protocol, name, bits, metrics, {}))
            log(cells[-1])
    for result, seconds in trained:
        cfg = result.config
        query = encode_images(result.model, parquet, split.query, from_cache=True, cache_dir=args.cache_dir)
        database = encode_images(result.model, parquet, split.database, from_cache=True, cache_dir=args.cache_dir)
        metrics = evaluate(query, database, labels, split)
        extra = {"val_map": result.val_map, "best_epoch": result.best_epoch, "train_seconds": seconds,
                 "config": asdict(cfg)}
        if args.save_checkpoints:
            extra["checkpoint"] = str(result.save(OUT / "checkpoints" / f"{cfg.arch}.frozen.pt",
                                                  {"map_query_tie_expected": metrics.map_tie_expected}))
        cells.append(cell("frozen", split.protocol, cfg.method, cfg.bits, metrics, extra))
        log(cells[-1])
    return cells


def finetune_cells(parquet: Path, split: Split, labels: np.ndarray, methods, bits_list, args, log) -> list[dict]:
    """Train every (method, bits) end to end; baselines on the pretrained backbone's features at the same px."""
    cells = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hparams = FINETUNE_HPARAMS | ({"epochs": args.epochs} if args.epochs else {})
    if args.smoke:
        hparams |= {"epochs": 1, "eval_every": 1, "batch_size": 32}
    for name in [m for m in methods if m in BASELINES]:
        backbone = build_model(TrainConfig(method="csq", img_size=args.px)).backbone
        feats = {part: extract_features(backbone, parquet, getattr(split, part), cache_dir=args.cache_dir)["pooled"]
                 for part in ("train_all", "query", "database")}
        for bits in bits_list:
            model = fit_baseline(name, bits, feats["train_all"], labels[split.train_all])
            metrics = evaluate(model.encode(feats["query"]), model.encode(feats["database"]), labels, split)
            cells.append(cell("finetune", split.protocol, name, bits, metrics, {}))
            log(cells[-1])
    for method in [m for m in methods if m not in BASELINES]:
        for bits in bits_list:
            cfg = TrainConfig(method=method, bits=bits, img_size=args.px, mode="finetune", protocol=split.protocol,
                              **hparams)
            started = time.monotonic()
            result = train(cfg, parquet, split=split, device=device)
            query = encode_images(result.model, parquet, split.query, from_cache=False)
            database = encode_images(result.model, parquet, split.database, from_cache=False)
            metrics = evaluate(query, database, labels, split)
            extra = {"val_map": result.val_map, "best_epoch": result.best_epoch, "device": device,
                     "train_seconds": round(time.monotonic() - started, 1), "config": asdict(cfg)}
            if args.save_checkpoints:
                extra["checkpoint"] = str(result.save(OUT / "checkpoints" / f"{cfg.arch}.{split.protocol}.finetune.pt",
                                                      {"map_query_tie_expected": metrics.map_tie_expected}))
            cells.append(cell("finetune", split.protocol, method, bits, metrics, extra))
            log(cells[-1])
    return cells


def cell(track: str, protocol: str, method: str, bits: int, metrics: RetrievalMetrics, extra: dict) -> dict:
    curve = metrics.pr_curve
    return {"track": track, "protocol": protocol, "method": method, "bits": bits,
            "map_tie_expected": metrics.map_tie_expected, "map": metrics.map,
            "map@1000_tie_expected": metrics.map_at_tie_expected.get(1000),
            "precision_radius2": metrics.precision_radius,
            # precision is undefined (NaN → null) at radii where no query's Hamming ball holds an item
            "pr_curve": {"recall": curve.recall.tolist(),
                         "precision": [None if np.isnan(p) else float(p) for p in curve.precision]},
            **extra}


def smoke_split(split: Split, per_class: int, labels: np.ndarray) -> Split:
    """A drastically reduced split for a smoke run: the first images of each class of every set."""
    def take(indices: np.ndarray, n: int) -> np.ndarray:
        return np.sort(np.concatenate([indices[labels[indices] == c][:n] for c in np.unique(labels)]))
    return Split(split.protocol, split.seed, query=take(split.query, per_class // 2),
                 train=take(split.train, per_class), val=take(split.val, max(1, per_class // 4)),
                 database=take(split.database, per_class * 2))


def plot_pr(cells: list[dict], path: Path) -> None:
    """Precision vs recall over Hamming radius 0..K, one panel per code length, one line per method."""
    from hashlake.extras import require

    matplotlib = require("matplotlib", "benchmarks/map_cifar10.py's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = sorted({c["bits"] for c in cells})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    color = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(bits_list), figsize=(4.5 * len(bits_list), 4.2), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for c in sorted((c for c in cells if c["bits"] == bits), key=lambda c: -c["map_tie_expected"]):
            style = "--" if c["method"] in BASELINES else "-"
            points = [(r, p) for r, p in zip(c["pr_curve"]["recall"], c["pr_curve"]["precision"]) if p is not None]
            ax.plot(*zip(*points), style, color=color[c["method"]],
                    label=f"{c['method']} {c['map_tie_expected']:.3f}")
        ax.set(title=f"{cells[0]['track']} {cells[0]['px']} px / {cells[0]['protocol']} / {bits} bits", xlabel="recall",
               ylabel="precision", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, title="method, mAP", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(cells: list[dict], bits_list) -> None:
    """One table per (track, px, protocol): a row per method, a column per code length."""
    for (track, px, protocol) in sorted({(c["track"], c["px"], c["protocol"]) for c in cells}):
        rows = [c for c in cells if (c["track"], c["px"], c["protocol"]) == (track, px, protocol)]
        print(f"\nmAP@ALL (tie-expected) — track {track}, {px} px, protocol {protocol}")
        print(f"{'method':<12}" + "".join(f"{b:>9}" for b in bits_list))
        for method in dict.fromkeys(c["method"] for c in rows):
            values = {c["bits"]: c["map_tie_expected"] for c in rows if c["method"] == method}
            print(f"{method:<12}" + "".join(f"{values[b]:>9.4f}" if b in values else f"{'':>9}" for b in bits_list))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parquet", nargs="?", default="../shared/datasets/cifar10.parquet")
    parser.add_argument("--track", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--protocols", default=None, help="comma-separated; default cifar10 (frozen), "
                                                          "cifar10,cifar10-2 (finetune)")
    parser.add_argument("--methods", default=",".join(BASELINES + DEEP_METHODS))
    parser.add_argument("--bits", default=",".join(map(str, BITS)))
    parser.add_argument("--px", default=None, help="input side(s), comma-separated, e.g. 128,224 (one table "
                                                   "each); default 224 (frozen, or finetune on a GPU), 64 for "
                                                   "finetune on a CPU")
    parser.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    parser.add_argument("--smoke", action="store_true", help="finetune: 20 fit images per class, 1 epoch (a run check)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/hashlake/features)")
    parser.add_argument("--save-checkpoints", action="store_true", help="write checkpoints under benchmarks/out/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    parquet = Path(args.parquet)
    if args.px is None:
        args.px = "224" if args.track == "frozen" or torch.cuda.is_available() else "64"
    px_list = [int(px) for px in str(args.px).split(",")]
    protocols = (args.protocols or ("cifar10" if args.track == "frozen" else "cifar10,cifar10-2")).split(",")
    methods = args.methods.split(",")
    unknown = set(methods) - set(BASELINES + DEEP_METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {BASELINES + DEEP_METHODS}")
    bits_list = [int(b) for b in args.bits.split(",")]
    labels = read_index(parquet).labels.astype(np.int64)

    def log(c: dict) -> None:
        print(f"{c['track']} {c['px']} px {c['protocol']} {c['method']:<10} {c['bits']:>2} bits: mAP "
              f"{c['map_tie_expected']:.4f} (stable ties {c['map']:.4f}) val {c.get('val_map', float('nan')):.4f}",
              flush=True)

    cells: list[dict] = []
    for px in px_list:
        args.px = px  # what the track functions read
        started, px_cells = time.monotonic(), []
        for protocol in protocols:
            split = load_split(protocol, parquet)
            if args.smoke:
                split = smoke_split(split, 20, labels)
            run = frozen_cells if args.track == "frozen" else finetune_cells
            px_cells += [c | {"px": px} for c in run(parquet, split, labels, methods, bits_list, args,
                                                     lambda c: log(c | {"px": px}))]
        tag = f"{args.track}{'-smoke' if args.smoke else ''}-{px}px"
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"map_cifar10_{tag}.json").write_text(json.dumps(
            {"args": vars(args), "seconds": round(time.monotonic() - started), "cells": px_cells}, indent=1))
        for protocol in protocols:
            path = OUT / f"pr_{tag}_{protocol}.png"
            plot_pr([c for c in px_cells if c["protocol"] == protocol], path)
            print(f"PR curves: {path}")
        print(f"all numbers: {OUT / f'map_cifar10_{tag}.json'}")
        cells += px_cells
    print_table(cells, bits_list)
    track = f"{args.track}-smoke" if args.smoke else args.track  # smoke numbers must not pass for results
    for c in cells:
        print(f"RESULT map_{track}_{c['px']}px_{c['protocol']}_{c['method']}_{c['bits']} {c['map_tie_expected']:.4f}")


if __name__ == "__main__":
    main()
