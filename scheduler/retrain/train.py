"""Train step of head mode: a new hash head on the stored features, with Ray Train.

One ``TorchTrainer`` worker runs ``hashing_models.trainer.fit`` (the project's one training loop) on
the features rows of the training split, selecting its best epoch on the validation split. Head
training is small (a (N, D) matrix, minutes on a CPU), so one worker is enough; ``ScalingConfig`` asks
for a GPU only where the cluster has one. The worker reports each epoch's progress into the run record
and, at the end, one checkpoint: the head's weights and the run's figures, kept by Ray Train under the
run's folder of the index bucket (``s3://<index_bucket>/jobs/<run>/train/``).

The candidate is the active version's backbone (its weights, unchanged: the features were computed
by it) with the trained head, so a worker encoding an image with the candidate gives the code the
re-encode step computes from the image's stored features.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hashing_models.trainer import TrainConfig
from hashlake.config import Settings
from scheduler.retrain.data import LabelledImages

HEAD_FILE = "head.pt"
FIGURES_FILE = "figures.json"


def settings_payload(settings: Settings) -> dict:
    """Settings as plain values, secrets included, to rebuild them in a Ray worker process."""
    return {name: (value.get_secret_value() if hasattr(value, "get_secret_value") else
                   str(value) if isinstance(value, Path) else value)
            for name, value in settings if value is not None}


def storage(settings: Settings, run_id: str):
    """(storage path, pyarrow filesystem) of a run's Ray Train folder in the index bucket."""
    from pyarrow import fs

    s3 = fs.S3FileSystem(access_key=settings.s3_access_key.get_secret_value(),
                         secret_key=settings.s3_secret_key.get_secret_value(), region=settings.s3_region,
                         endpoint_override=settings.s3_netloc,
                         scheme="https" if settings.s3_secure else "http", allow_bucket_creation=False)
    return f"{settings.index_bucket}/jobs/{run_id}/train", s3


def _train_loop(config: dict) -> None:
    """Runs in the Ray Train worker: fit the head, report progress per epoch and one checkpoint."""
    import ray.train
    import torch

    from hashing_models.trainer import FeatureRows, build_model, fit
    from scheduler.retrain.state import RunLog

    settings = Settings(**config["settings"])
    cfg = TrainConfig(**config["train_config"])
    runs = RunLog(settings)
    last_write = [0.0]

    def on_epoch(epoch: int, evaluation: dict | None) -> None:
        if time.monotonic() - last_write[0] < 1.0 and epoch < cfg.epochs:
            return  # the run record is an S3 object: at most one write a second
        state = runs.load(config["run_id"])
        if state is not None:
            state.progress = {"step": "train", "done": epoch, "total": cfg.epochs}
            runs.save(state)
        last_write[0] = time.monotonic()

    model = build_model(cfg)
    model.freeze_backbone(True)
    device = "cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu"
    result = fit(cfg, model, FeatureRows(config["features"]), config["labels"], config["split"],
                 device=device, data=config["data"], on_epoch=on_epoch)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(result.model.head.state_dict(), Path(folder) / HEAD_FILE)
        figures = {"val_map": result.val_map, "best_epoch": result.best_epoch, "history": result.history}
        (Path(folder) / FIGURES_FILE).write_text(json.dumps(figures))
        ray.train.report({"val_map": result.val_map}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_head(settings: Settings, run_id: str, cfg: TrainConfig, data: LabelledImages, data_text: str
               ) -> tuple[dict, dict]:
    """Train ``cfg`` on ``data`` with Ray Train → (head state dict, figures: val_map, best_epoch, history)."""
    return run_trainer(settings, run_id, "head", _train_loop, HEAD_FILE,
                       {"settings": settings_payload(settings), "train_config": asdict(cfg), "run_id": run_id,
                        "features": data.features, "labels": data.labels, "split": data.split_indices(),
                        "data": data_text})


def run_trainer(settings: Settings, run_id: str, name: str, loop, weights_file: str, config: dict
                ) -> tuple[dict, dict]:
    """``loop(config)`` on one Ray Train worker (a GPU where the cluster has one; ``config["use_gpu"]``
    says which), its checkpoints in the run's folder (``storage``) under ``name`` → (the state dict its
    checkpoint holds in ``weights_file``, the figures in ``FIGURES_FILE``)."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    path, filesystem = storage(settings, run_id)
    trainer = TorchTrainer(loop, train_loop_config={**config, "use_gpu": use_gpu},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
                           run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem))
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{name} training failed in the Ray Train worker: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        weights = torch.load(Path(folder) / weights_file, map_location="cpu", weights_only=True)
        figures = json.loads((Path(folder) / FIGURES_FILE).read_text())
    return weights, figures


def head_config(settings: Settings, active_card, data: LabelledImages) -> TrainConfig:
    """The trainer config of a head-mode run: the settings' method on the active version's backbone,
    code length and input size, as many classes as the lake has labels."""
    return TrainConfig(method=settings.retrain_method, backbone=active_card.backbone, bits=active_card.bits,
                       pretrained="none", img_size=active_card.input_size, mode="frozen", protocol="lake",
                       epochs=settings.retrain_epochs, num_classes=max(len(data.label_names), 1),
                       eval_every=max(1, settings.retrain_epochs // 8),
                       batch_size=int(min(128, max(2, np.sum(data.split == "train")))))
