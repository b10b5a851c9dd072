"""Train step of fine-tune mode: a whole new model (backbone and head) trained on the lake's images, with Ray Train.

One ``TorchTrainer`` worker (on a GPU where the cluster has one) runs ``hashing_models.trainer.fit``
twice, as ``train_two_stage`` does: first a head on the stored features of the active version's
backbone (``train.head_config``: seconds, and it gives the end-to-end stage a head that already
separates the labels), then the whole model end to end on the images (``finetune_config``: backbone at
a tenth of the head's learning rate, random flips), the best epoch of each stage picked on the
validation split. The images of the train and validation splits are read from the images bucket
and decoded by the encode workers' own stages (``workers.encode.read``, ``hashing_models.decode``),
held resized to the input size; an image that can no longer be read or decoded is left out.

The worker reports progress per epoch into the run record and, at the end, one checkpoint: the
model's weights and the figures, under the run's folder of the index bucket
(``s3://<index_bucket>/jobs/<run>/train/``), as head mode does.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hashing_models.trainer import TrainConfig
from hashlake.config import Settings
from scheduler.retrain.data import LabelledImages
from scheduler.retrain.train import FIGURES_FILE, head_config, run_trainer, settings_payload

MODEL_FILE = "model.pt"


def finetune_config(settings: Settings, active_card, data: LabelledImages) -> TrainConfig:
    """The end-to-end stage's trainer config: the head stage's (method, backbone, bits, input size,
    classes) in ``finetune`` mode with the fine-tune settings."""
    head = head_config(settings, active_card, data)
    return replace(head, mode="finetune", epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                   batch_size=int(min(settings.finetune_batch_size, max(2, np.sum(data.split == "train")))),
                   eval_every=max(1, settings.finetune_epochs // 4), warmup_epochs=1.0)


def read_images(settings: Settings, refs: list[tuple[str, str, str]], input_config) -> dict[int, object]:
    """{position in refs: RGB image resized to the input size} of the objects that can be read and decoded
    as they were when listed (same etag); the others are left out. Reads on the process's I/O pool."""
    from hashing_models.decode import UndecodableImage, decode_image
    from hashing_models.preprocess import resize_image
    from hashlake.store import ObjectStore
    from workers.encode.read import io_pool, read_object
    from workers.encode.rejects import ImageRejected
    from workers.messages import ObjectRef

    store = ObjectStore(settings)

    def load(ref: tuple[str, str, str]):
        try:
            fetched = read_object(store, ObjectRef(*ref), settings.max_object_bytes)
            if fetched.info.etag != ref[2]:
                return None  # overwritten since the snapshot: its labels may have changed with it
            image = decode_image(fetched.body, settings.max_image_pixels, name=f"s3://{ref[0]}/{ref[1]}")
        except (ImageRejected, UndecodableImage):
            return None
        return resize_image(image, input_config)

    images = io_pool(settings.download_concurrency).map(load, refs)
    return {i: image for i, image in enumerate(images) if image is not None}


def _train_loop(config: dict) -> None:
    """Runs in the Ray Train worker: head on the features, then the whole model on the images; reports
    progress per epoch and one checkpoint."""
    import ray.train
    import torch

    from hashing_models.protocols import Split
    from hashing_models.trainer import DecodedImages, FeatureRows, build_model, fit
    from scheduler.retrain.state import RunLog

    settings = Settings(**config["settings"])
    head_cfg, cfg = TrainConfig(**config["head_config"]), TrainConfig(**config["finetune_config"])
    runs = RunLog(settings)
    total_epochs = head_cfg.epochs + cfg.epochs
    last_write = [0.0]

    def progress(offset: int):
        def on_epoch(epoch: int, evaluation: dict | None) -> None:
            if time.monotonic() - last_write[0] < 1.0 and offset + epoch < total_epochs:
                return  # the run record is an S3 object: at most one write a second
            state = runs.load(config["run_id"])
            if state is not None:
                state.progress = {"step": "train", "done": offset + epoch, "total": total_epochs}
                runs.save(state)
            last_write[0] = time.monotonic()
        return on_epoch

    device = "cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu"
    model = build_model(head_cfg)
    model.backbone.load_state_dict(config["backbone"])
    split: Split = config["split"]
    # 1) the head on the stored features of the active backbone (FeatureRows: no image read)
    model.freeze_backbone(True)
    first = fit(head_cfg, model, FeatureRows(config["features"]), config["labels"], split, device=device,
                data=config["data"], on_epoch=progress(0))
    # 2) the whole model on the images of the fit and validation splits, read from the bucket
    wanted = np.concatenate([split.train, split.val])
    images = read_images(settings, [config["refs"][int(i)] for i in wanted], first.model.input_config)
    decoded = {int(wanted[p]): image for p, image in images.items()}
    kept = replace(split, train=np.asarray([i for i in split.train if int(i) in decoded], np.int64),
                   val=np.asarray([i for i in split.val if int(i) in decoded], np.int64))
    model = first.model
    model.freeze_backbone(False)
    second = fit(cfg, model, DecodedImages(model, decoded, cfg.flip), config["labels"], kept, device=device,
                 data=config["data"], on_epoch=progress(head_cfg.epochs))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(second.model.state_dict(), Path(folder) / MODEL_FILE)
        figures = {"val_map": second.val_map, "best_epoch": second.best_epoch, "history": second.history,
                   "head_val_map": first.val_map, "images": len(decoded), "unreadable": len(wanted) - len(decoded)}
        (Path(folder) / FIGURES_FILE).write_text(json.dumps(figures))
        ray.train.report({"val_map": second.val_map}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_finetune(settings: Settings, run_id: str, active_model, head_cfg: TrainConfig, cfg: TrainConfig,
                   data: LabelledImages, data_text: str) -> tuple[dict, dict]:
    """Train ``cfg`` (after ``head_cfg``) on ``data`` with Ray Train → (the model's state dict, figures:
    val_map, best_epoch, history, head_val_map, images, unreadable)."""
    refs = list(zip(*(data.refs.column(name).to_pylist() for name in ("bucket", "key", "etag"))))
    return run_trainer(settings, run_id, "finetune", _train_loop, MODEL_FILE,
                       {"settings": settings_payload(settings), "head_config": asdict(head_cfg),
                        "finetune_config": asdict(cfg), "run_id": run_id,
                        "backbone": active_model.backbone.state_dict(), "features": data.features,
                        "labels": data.labels, "split": data.split_indices(), "refs": refs, "data": data_text})
