"""The trainer: one loop that trains any hashing method, on cached frozen-backbone features or end to end.

Two modes share ``train``'s loop; only where a batch's inputs come from differs:

- ``frozen``: backbone features of the training images are computed once and cached on disk
  (``features.py``); the loop trains the head alone on (N, D) feature rows (or, for "mga", cached
  stage-map grids). Cheap: minutes on a CPU for 5,000 images.
- ``finetune``: images are decoded once, resized per batch, randomly flipped, and the whole model is
  trained (backbone at ``lr * backbone_lr_scale``).

Model selection: every ``eval_every`` epochs the validation images (``Split.val``) are encoded as
queries against the fit images (``Split.train``) as database; the weights with the best tie-expected
mAP@ALL are kept. The query set is never looked at. Two-stage training (e.g. "mga": frozen, then
fine-tune) is two calls, the second with ``init=`` the first's model (``train_two_stage``).

Determinism: the seed fixes the head's initialisation, batch order, feature dropout and flips; the
same config, data and thread count give the same weights and metrics.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .codes import pack_signs
from .parquet_dataset import decode_jpeg, read_index, read_jpegs
from .evaluate import evaluate_retrieval
from .features import POOLED, extract_features, feature_stores, file_sha256, stages_kind
from .heads import CenteredInput
from .losses import create_loss
from .methods import METHODS
from .hash_model import Features, HashModel
from .preprocess import prepare_images
from .protocols import Split, load_split
from .registry import create_model

log = logging.getLogger("hashing_models.trainer")

MODES = ("frozen", "finetune")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
ENCODE_SLICE = 4096  # images per slice when encoding a database: bounds the decoded images / features held
STAGE_GRID = 4  # cells per side of cached stage maps for "mga" (HashModel.cacheable_features' default)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; saved, resolved, inside every checkpoint."""

    method: str  # hashing method, the first part of a model name: csq, dsh, dpsh, hashnet, dhn, dpn, ...
    backbone: str = "effnetlite0"  # backbone name of the registry (second part of a model name)
    # head family (heads.HEAD_FAMILIES): "linear" or "mlp" (two layers, dropout 0.5); None resolves to "mlp"
    # where the method has it (on frozen features it beat the linear head for every method, benchmarks/README.md)
    head: str | None = None
    bits: int = 64  # code length K; the registry has 16, 32, 48, 64 for trained methods
    pretrained: str = "imagenet"  # backbone weights: "imagenet" (library or bundled package), "none", or a file path
    img_size: int = 224  # input side in pixels; CIFAR's 32 px images are upsampled (features improve up to ~224)
    mode: str = "frozen"  # "frozen": head on cached features; "finetune": the whole model end to end
    protocol: str = "cifar10"  # evaluation protocol of protocols.py (fixes train / val / query / database)
    split_seed: int = 0  # seed of the protocol's draws (protocols.DEFAULT_SEED)
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9, nesterov)
    lr: float = 1e-3  # peak learning rate of the head, per step
    backbone_lr_scale: float = 0.1  # finetune: backbone lr = lr × this (pretrained weights need small steps)
    weight_decay: float = 1e-4  # decoupled (AdamW) or L2 (SGD) weight decay
    schedule: str = "cosine"  # "cosine": decay to min_lr_ratio × lr by the last epoch; "constant"
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs (fractions allowed)
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    epochs: int = 50  # passes over the fit images
    batch_size: int = 128  # images per step; pairwise losses see B·(B−1) pairs, triplets B³
    feature_dropout: float = 0.0  # frozen: dropout on cached features per step (regularises a head fit on 4,500 rows)
    flip: bool = True  # finetune: random horizontal flips (CIFAR classes are mirror-invariant)
    eval_every: int = 5  # epochs between validation evaluations (and after the last epoch)
    loss_options: dict = field(default_factory=dict)  # keyword arguments of the method's loss (e.g. {"lam": 1e-3})
    num_classes: int = 10  # label count of the dataset (classifier-aided heads and class centres)
    seed: int = 0  # seeds head initialisation, batch order, dropout and flips

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(METHODS)}")
        if not METHODS[self.method].trainable:
            raise ValueError(f"method {self.method!r} has nothing to train; build it with create_model")
        for name, value, allowed in (("mode", self.mode, MODES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} {value!r} unknown; use one of {allowed}")
        if self.epochs < 1 or self.batch_size < 2 or self.eval_every < 1:
            raise ValueError(f"need epochs ≥ 1, batch_size ≥ 2, eval_every ≥ 1; got {self.epochs}, "
                             f"{self.batch_size}, {self.eval_every}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must lie in [0, 1), got {self.feature_dropout}")
        families = METHODS[self.method].head_families
        if self.head is None:  # frozen dataclass: resolve once, so checkpoints record the family trained
            object.__setattr__(self, "head", "mlp" if "mlp" in families else families[0])
        elif self.head not in families:
            raise ValueError(f"TrainConfig.head {self.head!r}: method {self.method!r} has the head families {families}")

    @property
    def arch(self) -> str:
        """Registry name of the model this config trains, e.g. csq_effnetlite0_64."""
        return f"{self.method}_{self.backbone}_{self.bits}"

    @property
    def pretrained_weights(self) -> bool | str:
        return {"imagenet": True, "none": False}.get(self.pretrained, self.pretrained)


@dataclass
class TrainResult:
    """A finished run: the selected model and how it got there."""

    model: HashModel  # weights of the best validation evaluation, eval mode
    config: TrainConfig
    split: Split
    val_map: float  # tie-expected mAP@ALL, Split.val vs Split.train, of the selected weights
    best_epoch: int  # epochs completed when the selected weights were evaluated
    history: list[dict] = field(default_factory=list)  # per evaluation: epoch, loss, val_map, seconds
    data: str = ""  # the dataset file and its sha256, for the model card

    def metrics(self) -> dict:
        return {"val_map": self.val_map, "best_epoch": self.best_epoch, "history": self.history}

    def card(self, version: str | None = None, test_metrics: dict | None = None) -> dict:
        """Model card fields (hashlake.catalog.ModelCard) for this run."""
        cfg = self.config
        return {"version": version or f"{cfg.arch}.{cfg.protocol}.{cfg.mode}.s{cfg.seed}",
                "arch": cfg.arch, "method": cfg.method, "backbone": cfg.backbone, "bits": cfg.bits,
                "input_size": cfg.img_size, "description": METHODS[cfg.method].description,
                "training": asdict(cfg), "data": self.data,
                "metrics": {"val_map_tie_expected": self.val_map, **(test_metrics or {})},
                "created_at": datetime.now(timezone.utc).isoformat()}

    def save(self, path: str | Path, test_metrics: dict | None = None) -> Path:
        metrics = {**self.metrics(), **(test_metrics or {})}
        return save_checkpoint(path, self.model, arch=self.config.arch, config=asdict(self.config),
                               metrics=metrics, card=self.card(test_metrics=test_metrics))


# ---------------------------------------------------------------------------------------------- inputs

class CachedFeatures:
    """Frozen mode's inputs: cached backbone features of some images, as tensors indexed by position."""

    def __init__(self, model: HashModel, parquet_path: Path, indices: np.ndarray, cache_dir: str | Path | None,
                 dropout: float = 0.0):
        kind = stages_kind(STAGE_GRID) if model.multi_stage else POOLED
        rows = torch.from_numpy(extract_features(model.backbone, parquet_path, indices, (kind,), cache_dir)[kind])
        if model.multi_stage:  # flat grids (N, Σ C·g·g) → three maps (N, C_s, g, g), the head's input
            shapes = feature_stores(model.backbone, parquet_path, (kind,), cache_dir)[kind].meta.stage_shapes
            sizes = [int(np.prod(s)) for s in shapes]
            self.parts = [part.reshape(len(rows), *s) for part, s in zip(rows.split(sizes, dim=1), shapes)]
        else:
            self.parts = [rows]  # (N, D)
        self.multi_stage = model.multi_stage
        self.position = {int(i): p for p, i in enumerate(indices)}
        self.dropout = dropout  # training batches only

    def batch(self, indices: np.ndarray, generator: torch.Generator | None = None) -> Features:
        """Feature rows of images ``indices``; with a generator (training), feature dropout drawn from it."""
        pos = torch.as_tensor([self.position[int(i)] for i in indices])
        parts = [part[pos] for part in self.parts]
        if generator is not None and self.dropout > 0:
            parts = [p * (torch.rand(p.shape, generator=generator) >= self.dropout) / (1 - self.dropout)
                     for p in parts]
        return tuple(parts) if self.multi_stage else parts[0]

    def forward(self, model: HashModel, inputs: Features):
        return model.forward_head(inputs)

    def mean_feature(self, indices: np.ndarray) -> torch.Tensor:
        """Mean pooled feature (D,) of images ``indices`` (pooled-feature models only)."""
        return self.parts[0][torch.as_tensor([self.position[int(i)] for i in indices])].double().mean(0)


class DecodedImages:
    """Finetune mode's inputs: decoded images (kept small, as stored), resized and normalised per batch."""

    def __init__(self, model: HashModel, images: dict, flip: bool = False):
        self.images = dict(images)  # {index: PIL image}, decoded from a Parquet file or read from a bucket
        self.input_config = model.input_config
        self.flip = flip  # training batches only

    @classmethod
    def from_parquet(cls, model: HashModel, parquet_path: Path, indices: np.ndarray, flip: bool = False
                     ) -> "DecodedImages":
        return cls(model, {int(i): decode_jpeg(j) for i, j in zip(indices, read_jpegs(parquet_path, indices))}, flip)

    def batch(self, indices: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, S, S); with a generator (training), random horizontal flips drawn from it."""
        images = prepare_images([self.images[int(i)] for i in indices], self.input_config)
        if generator is not None and self.flip:
            mirrored = torch.rand(len(indices), generator=generator) < 0.5
            images[mirrored] = images[mirrored].flip(-1)
        return images

    def forward(self, model: HashModel, inputs: torch.Tensor):
        return model(inputs)


class FeatureRows:
    """Frozen mode's inputs held in memory: pooled backbone features (N, D), e.g. as the lake's ``features``
    table keeps them for every encoded image; indices are row positions."""

    def __init__(self, rows: np.ndarray, dropout: float = 0.0):
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.float32))  # (N, D)
        self.dropout = dropout  # training batches only

    def batch(self, indices: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        rows = self.rows[torch.as_tensor(indices)]
        if generator is not None and self.dropout > 0:
            rows = rows * (torch.rand(rows.shape, generator=generator) >= self.dropout) / (1 - self.dropout)
        return rows

    def forward(self, model: HashModel, inputs: torch.Tensor):
        return model.forward_head(inputs)

    def mean_feature(self, indices: np.ndarray) -> torch.Tensor:
        """Mean feature (D,) of rows ``indices``."""
        return self.rows[torch.as_tensor(indices)].double().mean(0)


# ------------------------------------------------------------------------------------------------ loop

def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` epochs: 1) linear warm-up 2) cosine decay to the floor, or constant."""
    if progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    ratio = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - cfg.warmup_epochs) / span)))  # 1 → 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * ratio)


def _optimizer(cfg: TrainConfig, model: HashModel) -> torch.optim.Optimizer:
    groups = [{"params": list(model.head.parameters()), "lr_scale": 1.0}]
    if cfg.mode == "finetune":
        groups.append({"params": list(model.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def _to(inputs: Features, device: str | torch.device) -> Features:
    return tuple(x.to(device) for x in inputs) if isinstance(inputs, tuple) else inputs.to(device)


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels, dtype=torch.long), num_classes).float()  # (B, C)


def build_model(cfg: TrainConfig) -> HashModel:
    """The untrained model of ``cfg``: pretrained backbone, head initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return create_model(cfg.arch, cfg.pretrained_weights, img_size=cfg.img_size, num_classes=cfg.num_classes,
                        head=cfg.head)


def train(cfg: TrainConfig, parquet_path: str | Path, *, split: Split | None = None, init: HashModel | None = None,
          cache_dir: str | Path | None = None, device: str | torch.device = "cpu") -> TrainResult:
    """Train ``cfg.arch`` on ``split.train`` (default: the protocol's split of ``parquet_path``), select on val.

    init: a model to continue from (stage 2 of two-stage training); it must be ``cfg.arch``.
    cache_dir: feature cache folder for frozen mode (default ``features.default_cache_dir()``).
    device: where the model trains ("cpu", "cuda"); features are extracted on the CPU model first.
    """
    parquet_path = Path(parquet_path)
    labels = read_index(parquet_path).labels.astype(np.int64)  # (N,) class ids
    split = split or load_split(cfg.protocol, parquet_path, seed=cfg.split_seed)
    if init is not None and f"{init.method}_{init.backbone_name}_{init.bits}" != cfg.arch:
        raise ValueError(f"init model is {init.method}_{init.backbone_name}_{init.bits}, config trains {cfg.arch}")
    model = copy.deepcopy(init) if init is not None else build_model(cfg)
    model.freeze_backbone(cfg.mode == "frozen")
    fit_and_val = np.concatenate([split.train, split.val])
    source = (CachedFeatures(model, parquet_path, fit_and_val, cache_dir, cfg.feature_dropout)
              if cfg.mode == "frozen" else DecodedImages.from_parquet(model, parquet_path, fit_and_val, cfg.flip))
    data = f"{parquet_path.name} sha256:{file_sha256(parquet_path)[:16]} protocol {cfg.protocol} seed {cfg.split_seed}"
    return fit(cfg, model, source, _one_hot(labels, cfg.num_classes).numpy(), split, device=device, data=data)


def fit(cfg: TrainConfig, model: HashModel, source, labels: np.ndarray, split: Split, *,
        device: str | torch.device = "cpu", data: str = "",
        on_epoch: Callable[[int, dict | None], None] | None = None) -> TrainResult:
    """The training loop itself, over any source of inputs (``CachedFeatures``, ``DecodedImages``,
    ``FeatureRows``): ``cfg.epochs`` passes over ``split.train``, model selection on ``split.val``.

    labels: (N, C) multi-hot float/0-1 targets indexed like the source (one-hot for single-label data;
    a pairwise loss counts two images similar when they share a label). on_epoch(epoch, evaluation or
    None) is called after every epoch (progress reporting)."""
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.float32)  # (N, C)
    if isinstance(model.head, CenteredInput) and hasattr(source, "mean_feature"):
        # a head on stored features starts centred on the fit images' mean (heads.CenteredInput says why);
        # fine-tuning keeps the centre it starts with (its stage-1 head's, or zeros)
        model.head.fit_center(source.mean_feature(split.train))
    eval_labels = targets.numpy().astype(np.int8)
    model.to(device)
    loss_fn = create_loss(cfg.method, bits=cfg.bits, num_classes=cfg.num_classes, **cfg.loss_options).to(device)
    optimizer = _optimizer(cfg, model)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(len(split.train) / cfg.batch_size)  # the last batch may be smaller, never below 2
    best = {"val_map": -1.0, "epoch": 0, "state": None}
    history: list[dict] = []
    start = time.monotonic()

    for epoch in range(cfg.epochs):
        model.train()
        order = split.train[torch.randperm(len(split.train), generator=generator).numpy()]
        total = 0.0
        for step in range(steps):
            batch = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            if len(batch) < 2:
                continue  # one image has no pairs; batch-statistics losses (BiHalf) need two
            # 1) learning rate of this step, per parameter group
            progress = epoch + step / steps
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, progress) * group["lr_scale"]
            # 2) forward, loss, step
            outputs = source.forward(model, _to(source.batch(batch, generator), device))
            loss = loss_fn(outputs, targets[torch.as_tensor(batch)].to(device), progress=progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        # 3) model selection on the validation split
        evaluation = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            val_map = validation_map(model, source, split, eval_labels)
            evaluation = {"epoch": epoch + 1, "loss": total / steps, "val_map": val_map,
                          "seconds": round(time.monotonic() - start, 1)}
            history.append(evaluation)
            log.info("%s epoch %d loss %.4f val mAP %.4f", cfg.arch, epoch + 1, total / steps, val_map)
            if val_map > best["val_map"]:
                best = {"val_map": val_map, "epoch": epoch + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if on_epoch is not None:
            on_epoch(epoch + 1, evaluation)

    model.load_state_dict(best["state"])
    model.to("cpu").eval()  # results live on the CPU: checkpoints, encoding, comparisons
    return TrainResult(model=model, config=cfg, split=split, val_map=best["val_map"], best_epoch=best["epoch"],
                       history=history, data=data)


def train_two_stage(frozen: TrainConfig, finetune: TrainConfig, parquet_path: str | Path, *,
                    split: Split | None = None, cache_dir: str | Path | None = None
                    ) -> tuple[TrainResult, TrainResult]:
    """Stage 1: head on the frozen backbone; stage 2: the whole model, starting from stage 1's weights."""
    if (frozen.mode, finetune.mode) != ("frozen", "finetune") or frozen.arch != finetune.arch:
        raise ValueError(f"two-stage training needs a frozen then a finetune config of one arch; got "
                         f"{frozen.mode} {frozen.arch}, {finetune.mode} {finetune.arch}")
    first = train(frozen, parquet_path, split=split, cache_dir=cache_dir)
    second = train(finetune, parquet_path, split=first.split, init=first.model)
    return first, second


# ------------------------------------------------------------------------------------------- encoding

def _encode_source(model: HashModel, source: CachedFeatures | DecodedImages, indices: np.ndarray,
                   batch_size: int = 256) -> np.ndarray:
    """Packed codes (R, bits/8) of images ``indices`` from ``source``, eval mode, no gradients."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for b in range(0, len(indices), batch_size):
            chunk = indices[b: b + batch_size]
            out.append(pack_signs(source.forward(model, _to(source.batch(chunk), device)).h))
    model.train(was_training)
    return np.concatenate(out)


def validation_map(model: HashModel, source, split: Split, labels: np.ndarray) -> float:
    """Tie-expected mAP@ALL of Split.val codes (queries) against Split.train codes (database)."""
    val_codes = _encode_source(model, source, split.val)
    train_codes = _encode_source(model, source, split.train)
    return evaluate_retrieval(val_codes, labels[split.val], train_codes, labels[split.train], topk=()).map_tie_expected


def encode_images(model: HashModel, parquet_path: str | Path, indices: Sequence[int] | np.ndarray, *,
                  from_cache: bool, cache_dir: str | Path | None = None, batch_size: int = 256) -> np.ndarray:
    """Packed codes (R, bits/8) of images ``indices`` of a dataset file.

    from_cache=True reads the frozen backbone's cached features (computing missing ones) and applies the
    head — for models trained in frozen mode, the same codes as ``model.encode`` on the images, except
    "mga", whose head then sees 4×4 grids of the stage maps instead of full maps. Otherwise images are
    decoded and encoded end to end.
    """
    indices = np.asarray(indices, dtype=np.int64)
    codes = []
    # Slices bound memory: 4,096 rows of mga's cached grids at 224 px are 375 MB in float32.
    for b in range(0, len(indices), ENCODE_SLICE):
        part = indices[b: b + ENCODE_SLICE]
        source = (CachedFeatures(model, Path(parquet_path), part, cache_dir) if from_cache
                  else DecodedImages.from_parquet(model, Path(parquet_path), part))
        codes.append(_encode_source(model, source, part, batch_size))
    return np.concatenate(codes)

