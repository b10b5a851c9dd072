"""Feature cache: a frozen backbone's features of a dataset file, computed once, stored on disk, filled on demand.

Layout (one folder per backbone weights and input size, one array per dataset file and kind)::

    <cache_dir>/<backbone>-<weights sha256[:12]>-<px>px/<parquet sha256[:16]>.<kind>.npy   (N, D) features
    <cache_dir>/<backbone>-<weights sha256[:12]>-<px>px/<parquet sha256[:16]>.<kind>.done.npy  (N,) bool
    <cache_dir>/<backbone>-<weights sha256[:12]>-<px>px/<parquet sha256[:16]>.<kind>.json  what the array holds

Kinds: ``pooled`` — the backbone's pooled vectors (N, D) float32; ``stages<g>`` — the last three stage
maps average-pooled to at most g×g cells (``HashModel.cacheable_features``), flattened and concatenated
(N, Σ C_s·H_s·W_s) float16 (2.7 GB for CIFAR-10 at g=4, 224 px, in float32 it would be 5.5 GB).

Rows are image indices of the dataset file (``parquet_dataset.read_index``). Only requested rows are computed;
a row is marked done only after its features are flushed to disk, so a killed extraction resumes where
it stopped. A lock file serialises chunk writes; two processes extracting the same rows at once
both compute them (same values) rather than wait for each other.

Command line (pre-compute in the background, resumable)::

    nice -n 10 python -m hashing_models.features ../shared/datasets/cifar10.parquet \
        --backbone effnetlite0 --px 224 --kinds pooled,stages4 --protocol cifar10 --log-file feats.log
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .backbones import Backbone, create_backbone
from .parquet_dataset import decode_jpeg, read_index, read_jpegs
from .heads import pool_stage_maps
from .preprocess import prepare_images

log = logging.getLogger("hashing_models.features")

POOLED = "pooled"
CACHE_ENV = "HASHLAKE_FEATURE_CACHE"  # overrides the default cache folder
CHUNK_ROWS = 1024  # rows computed between two flushes: ~30 s at 224 px on 2 cores, the work a kill can lose


def default_cache_dir() -> Path:
    """$HASHLAKE_FEATURE_CACHE, else $XDG_CACHE_HOME/hashlake/features, else ~/.cache/hashlake/features."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hashlake" / "features"


_FILE_SHA: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256: hash each file once per process


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (CIFAR-10's 55 MB parquet: ~0.2 s; memoised by path, size and mtime)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_SHA:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _FILE_SHA[key] = digest.hexdigest()
    return _FILE_SHA[key]


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, values): which weights made the features."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def stages_kind(grid: int) -> str:
    return f"stages{grid}"


def grid_of(kind: str) -> int:
    if not kind.startswith("stages") or not kind[6:].isdigit():
        raise ValueError(f"feature kind {kind!r} unknown; use {POOLED!r} or 'stages<grid>' (e.g. 'stages4')")
    return int(kind[6:])


@dataclass(frozen=True)
class FeatureMeta:
    """What one cached feature array holds (stored beside it as JSON)."""

    backbone: str  # backbone name, e.g. "effnetlite0"
    weights_sha256: str  # sha256 of the backbone's state dict
    px: int  # input side the images were resized to, pixels
    parquet_sha256: str  # sha256 of the dataset file the rows index
    kind: str  # "pooled" or "stages<grid>"
    rows: int  # N, images in the dataset file
    dim: int  # D, values per row
    dtype: str  # numpy dtype of the array
    stage_shapes: list[list[int]] | None = None  # for stages kinds: [C_s, H_s, W_s] per stage, in row order


class FeatureStore:
    """One cached (N, D) feature array with its done-mask; see the module doc for the layout."""

    def __init__(self, folder: Path, meta: FeatureMeta) -> None:
        self.folder, self.meta = folder, meta
        stem = f"{meta.parquet_sha256[:16]}.{meta.kind}"
        self.array_path = folder / f"{stem}.npy"
        self.done_path = folder / f"{stem}.done.npy"
        self.meta_path = folder / f"{stem}.json"
        self.lock_path = folder / f"{stem}.lock"

    def open(self) -> None:
        """Create the array (sparse on disk), mask and sidecar if absent; check a present one matches."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.meta_path.exists():
            stored = json.loads(self.meta_path.read_text())
            if stored != asdict(self.meta):
                raise ValueError(
                    f"feature cache {self.meta_path} holds {stored}, expected {asdict(self.meta)}; "
                    "delete that folder's files for this kind to recompute"
                )
        if not self.array_path.exists():
            np.lib.format.open_memmap(self.array_path, mode="w+", dtype=self.meta.dtype,
                                      shape=(self.meta.rows, self.meta.dim)).flush()
            self._write_done(np.zeros(self.meta.rows, dtype=bool))
            _write_atomic(self.meta_path, json.dumps(asdict(self.meta), indent=1).encode())

    def done(self) -> np.ndarray:
        """(N,) bool: rows whose features are on disk."""
        done = np.load(self.done_path)
        if done.shape != (self.meta.rows,):
            raise ValueError(f"{self.done_path} has shape {done.shape}, expected ({self.meta.rows},): delete it")
        return done

    def _write_done(self, done: np.ndarray) -> None:
        tmp = self.done_path.with_suffix(".tmp.npy")
        np.save(tmp, done)
        os.replace(tmp, self.done_path)  # atomic: the mask is always a whole file

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (R, D) at ``rows`` (R,), flush, then mark them done.

        Under the lock: the mask update is a read-modify-write, and two processes extracting at
        once must not drop each other's rows. Readers need no lock (the mask is replaced whole).
        """
        with self.locked():
            array = np.load(self.array_path, mmap_mode="r+")
            array[rows] = values.astype(self.meta.dtype, copy=False)
            array.flush()
            del array
            done = self.done()
            done[rows] = True
            self._write_done(done)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Features (R, D) of ``rows`` as float32; every row must be done."""
        missing = rows[~self.done()[rows]]
        if missing.size:
            raise ValueError(f"{self.array_path}: {missing.size} requested rows are not computed yet "
                             f"(first: {missing[:5].tolist()}); run extract_features on them first")
        array = np.load(self.array_path, mmap_mode="r")
        return np.asarray(array[rows], dtype=np.float32)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock around one chunk's write (held for milliseconds, not for an extraction)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _backbone_outputs(backbone: Backbone, images: torch.Tensor, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """One forward pass → each kind's rows (B, D_kind); pooled = spatial mean of the last stage map."""
    out = {}
    if any(kind != POOLED for kind in kinds):
        stages = backbone.forward_stages(images)
        for kind in kinds:
            if kind == POOLED:
                out[kind] = stages[2].mean(dim=(2, 3)).numpy()  # (B, C_3): what backbone(images) returns
            else:
                grids = pool_stage_maps(stages, grid_of(kind))
                out[kind] = torch.cat([g.flatten(1) for g in grids], dim=1).numpy()  # (B, Σ C·h·w)
    else:
        out[POOLED] = backbone(images).numpy()  # (B, D)
    return out


def _meta_for(backbone: Backbone, parquet_path: Path, rows: int, kind: str, weights: str) -> FeatureMeta:
    size = backbone.input_config.size
    if kind == POOLED:
        return FeatureMeta(backbone.name, weights, size, file_sha256(parquet_path), kind, rows,
                           backbone.num_features, "float32")
    grid = grid_of(kind)
    with torch.inference_mode():  # shapes from one dummy image: cheap, and right for any backbone
        was_training = backbone.training
        backbone.eval()
        stages = backbone.forward_stages(torch.zeros(1, 3, size, size))
        backbone.train(was_training)
    shapes = [list(g.shape[1:]) for g in pool_stage_maps(stages, grid)]
    dim = int(sum(np.prod(s) for s in shapes))
    return FeatureMeta(backbone.name, weights, size, file_sha256(parquet_path), kind, rows, dim, "float16", shapes)


def feature_stores(backbone: Backbone, parquet_path: str | Path, kinds: Sequence[str] = (POOLED,),
                   cache_dir: str | Path | None = None) -> dict[str, FeatureStore]:
    """The cache arrays of ``kinds`` for this backbone (its current weights and input size) and dataset file."""
    parquet_path = Path(parquet_path)
    rows = len(read_index(parquet_path))
    weights = weights_sha256(backbone)
    size = backbone.input_config.size
    folder = Path(cache_dir or default_cache_dir()) / f"{backbone.name}-{weights[:12]}-{size}px"
    stores = {kind: FeatureStore(folder, _meta_for(backbone, parquet_path, rows, kind, weights)) for kind in kinds}
    for store in stores.values():
        store.open()
    return stores


def extract_features(backbone: Backbone, parquet_path: str | Path, indices: np.ndarray,
                     kinds: Sequence[str] = (POOLED,), cache_dir: str | Path | None = None,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """Features of images ``indices`` (R,) for each kind: (R, D_kind) float32, computed where not cached."""
    stores = ensure_features(backbone, parquet_path, indices, kinds, cache_dir, batch_size)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    return {kind: store.read_rows(indices) for kind, store in stores.items()}


def ensure_features(backbone: Backbone, parquet_path: str | Path, indices: np.ndarray,
                    kinds: Sequence[str] = (POOLED,), cache_dir: str | Path | None = None,
                    batch_size: int = 64) -> dict[str, FeatureStore]:
    """Compute the features of ``indices`` missing from the cache, without reading any back.

    Missing rows are computed in the order given (so a caller can ask for training images first),
    ``CHUNK_ROWS`` at a time, in eval mode without gradients, every kind from one forward pass;
    each chunk is flushed before the next.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    stores = feature_stores(backbone, parquet_path, kinds, cache_dir)
    missing_any = np.zeros(len(indices), dtype=bool)
    for store in stores.values():
        missing_any |= ~store.done()[indices]
    _, first_pos = np.unique(indices[missing_any], return_index=True)
    todo = indices[missing_any][np.sort(first_pos)]  # unique, in the caller's order
    if todo.size:
        _compute(backbone, Path(parquet_path), todo, stores, batch_size)
    return stores


def _compute(backbone: Backbone, parquet_path: Path, todo: np.ndarray, stores: dict[str, FeatureStore],
             batch_size: int) -> None:
    was_training = backbone.training
    # channels_last: measured 2× faster for EfficientNet-Lite0 on this CPU (depthwise convolutions);
    # outputs differ from the default layout by float rounding only (~1e-6 relative).
    backbone.eval().to(memory_format=torch.channels_last)
    start, done_rows = time.monotonic(), 0
    log.info("computing %d rows of %s for %s at %d px into %s", todo.size, list(stores), backbone.name,
             backbone.input_config.size, next(iter(stores.values())).folder)
    try:
        for chunk_start in range(0, todo.size, CHUNK_ROWS):
            chunk = todo[chunk_start: chunk_start + CHUNK_ROWS]
            parts: dict[str, list[np.ndarray]] = {kind: [] for kind in stores}
            jpegs = read_jpegs(parquet_path, chunk)
            for b in range(0, len(chunk), batch_size):
                images = prepare_images([decode_jpeg(j) for j in jpegs[b: b + batch_size]], backbone.input_config)
                images = images.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    for kind, values in _backbone_outputs(backbone, images, list(stores)).items():
                        parts[kind].append(values)
            for kind, store in stores.items():
                store.write_rows(chunk, np.concatenate(parts[kind]))
            done_rows += len(chunk)
            rate = done_rows / (time.monotonic() - start)
            log.info("%d/%d rows done, %.1f img/s, ~%.0f s left", done_rows, todo.size, rate,
                     (todo.size - done_rows) / rate)
    finally:
        backbone.train(was_training).to(memory_format=torch.contiguous_format)


def protocol_order(parquet_path: str | Path, protocol: str, seed: int = 0) -> np.ndarray:
    """Every image index, training images (train ∪ val) first, then queries, then the rest of the database."""
    from .protocols import load_split

    split = load_split(protocol, parquet_path, seed=seed)
    ordered = np.concatenate([split.train_all, split.query, split.database, np.arange(len(read_index(parquet_path)))])
    _, first = np.unique(ordered, return_index=True)
    return ordered[np.sort(first)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-compute a frozen backbone's cached features (resumable).")
    parser.add_argument("parquet", help="dataset file, e.g. ../shared/datasets/cifar10.parquet")
    parser.add_argument("--backbone", default="effnetlite0")
    parser.add_argument("--weights", default="imagenet",
                        help="'imagenet' (the library's/package's weights) or a path to a state dict")
    parser.add_argument("--px", type=int, default=224, help="input side, pixels")
    parser.add_argument("--kinds", default=POOLED, help="comma-separated: pooled, stages4, …")
    parser.add_argument("--protocol", default=None, help="compute this protocol's training images first")
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/hashlake/features")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--log-file", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, filename=args.log_file, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    backbone = create_backbone(args.backbone, True if args.weights == "imagenet" else args.weights, args.px)
    indices = (protocol_order(args.parquet, args.protocol) if args.protocol
               else np.arange(len(read_index(args.parquet))))
    ensure_features(backbone, args.parquet, indices, kinds=args.kinds.split(","), cache_dir=args.cache_dir)
    log.info("all %d rows cached", len(indices))


if __name__ == "__main__":
    main()
