"""The nightly retraining job: one entry point, five resumable steps, run as a Ray job.

    data      the lake snapshot to train on, and what it holds (labelled images, labels, splits)
    train     head mode: a new head on the stored features of the train split (Ray Train; ``train.py``);
              fine-tune mode: a whole new model, backbone and head, on the train split's images read from
              the bucket (Ray Train, GPU workers where the cluster has them; ``finetune.py``); published
              to the catalog as the candidate version, not active
    evaluate  candidate vs active on the evaluation split (``gate.py``): promote, or end ``rejected``.
              The candidate's codes: head mode from the stored features through its head; fine-tune
              mode from the images through the whole candidate (``reencode_images.candidate_codes``:
              the stored features are the old backbone's), written to the lake as they are made
    reencode  the candidate's codes for every current image: head mode from its stored features (Ray
              Data; ``reencode.py``), fine-tune mode from its bytes (a Ray Data actor pool;
              ``reencode_images.py``)
    flip      ``scheduler.promote``: staged reconciler runs until every current object has a code
              under the candidate (the encode workers take what had no features, and what was uploaded
              meanwhile), then the active pointer moves, one PUT

Each finished step is written to the run record (``state.py``) before the next begins, and each step's
outputs are named by the run (candidate version, its checkpoint folder, its codes rows), so a job
killed anywhere leaves the old version serving (the pointer moves last), and the same run id run
again goes on from the first unfinished step.

Head mode keeps the active version's backbone and trains its hash head; fine-tune mode trains the
backbone too, so its candidate's codes (and features) come from the images.
"""
from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hashlake.catalog import Catalog, ModelCard, ModelNotFound
from hashlake.config import Settings
from hashlake.lake.connection import open_lake
from hashlake.store import ObjectStore
from scheduler.retrain.data import LabelledImages, current_snapshot, load_labelled
from scheduler.retrain.state import STEPS, RunLog, RunState

log = logging.getLogger("scheduler.retrain")

MODES = ("head", "finetune")


class RetrainError(RuntimeError):
    """The run cannot go on; the message says why (it is the run record's ``reason``)."""


@dataclass
class _Run:
    """What the steps of one run share while it runs (rebuilt from the run record on a rerun)."""

    settings: Settings
    state: RunState
    runs: RunLog
    catalog: Catalog
    con: object = None  # the lake connection (duckdb), opened once
    _data: LabelledImages | None = None
    _candidate_model: object = None
    _last_progress: float = field(default=0.0)

    @property
    def active(self) -> str:
        return self.state.previous

    def data(self) -> LabelledImages:
        if self._data is None:
            self._data = load_labelled(self.con, self.active, self.backbone, self.state.steps["data"]["snapshot"])
        return self._data

    @property
    def backbone(self) -> str:
        return self.state.steps["data"]["backbone"]

    def candidate_model(self):
        if self._candidate_model is None:
            from hashlake.model_versions import load_version

            self._candidate_model = load_version(self.catalog, self.state.candidate)
        return self._candidate_model

    def progress(self, step: str, done: int, total: int) -> None:
        self.state.progress = {"step": step, "done": done, "total": total}
        if time.monotonic() - self._last_progress >= 1.0 or done == total:
            self.runs.save(self.state)
            self._last_progress = time.monotonic()


def run(settings: Settings, run_id: str, mode: str = "head") -> RunState:
    """Run (or resume) retraining run ``run_id``; returns its final record. A finished run (succeeded or
    rejected) is returned as it is."""
    if mode not in MODES:
        raise RetrainError(f"unknown retraining mode {mode!r}; use one of {MODES}")
    from scheduler import metrics

    runs = RunLog(settings)
    state = runs.load(run_id) or RunState(run_id=run_id, mode=mode)
    if state.outcome in ("succeeded", "rejected"):
        return state
    state.outcome, state.reason = "running", None
    runs.save(state)
    catalog = Catalog(ObjectStore(settings), settings)
    job = _Run(settings, state, runs, catalog)
    step = "data"
    try:
        import ray

        ray.init(ignore_reinit_error=True, log_to_driver=False)
        job.con = open_lake(settings)
        for step in STEPS:
            if state.done(step):
                continue
            started = time.monotonic()
            figures = STEP_FUNCTIONS[step](job)
            state.steps[step] = {**figures, "seconds": round(time.monotonic() - started, 3)}
            metrics.observe_step(step, state.steps[step]["seconds"])
            state.progress = {}
            runs.save(state)
            log.info("run %s: step %s done: %s", run_id, step, state.steps[step])
            if step == "evaluate" and not figures["promote"]:
                state.outcome, state.reason = "rejected", figures["reason"]
                break
        else:
            state.outcome = "succeeded"
    except Exception as exc:  # the record says what failed where; a rerun of the run id continues
        state.outcome, state.reason = "failed", f"step {step}: {type(exc).__name__}: {exc}"
        log.exception("run %s failed in step %s", run_id, step)
    finally:
        if job.con is not None:
            job.con.close()
    runs.save(state)
    metrics.record_run(settings, state)
    return state


# ------------------------------------------------------------------------------------------- steps

def _data(job: _Run) -> dict:
    from hashlake.model_versions import backbone_id, load_version

    try:
        job.state.previous = job.state.previous or job.catalog.active()
    except ModelNotFound:
        raise RetrainError("no model version is active: run `hashlake model init` first") from None
    active_model = load_version(job.catalog, job.state.previous)
    backbone = backbone_id(active_model)
    at = current_snapshot(job.con)
    data = load_labelled(job.con, job.state.previous, backbone, at)
    counts = data.counts()
    if counts["train_images"] < job.settings.retrain_min_images:
        raise RetrainError(f"the lake has {counts['train_images']} labelled images with features in the train split "
                           f"(of {counts['images']} labelled; {counts['without_features']} without features); a "
                           f"retraining needs {job.settings.retrain_min_images} (Settings.retrain_min_images): "
                           f"upload images with x-amz-meta-labels")
    job._data = data
    return {"snapshot": at, "backbone": backbone, "active": job.state.previous, **counts,
            "label_names": data.label_names}


def _train(job: _Run) -> dict:
    from hashing_models.registry import create_model
    from hashlake.model_versions import load_version
    from scheduler.retrain.finetune import finetune_config, train_finetune
    from scheduler.retrain.train import head_config, train_head

    active_card = job.catalog.card(job.active)
    data = job.data()
    finetune = job.state.mode == "finetune"
    head_cfg = head_config(job.settings, active_card, data)
    cfg = finetune_config(job.settings, active_card, data) if finetune else head_cfg
    version = f"{cfg.arch}-{cfg.img_size}px-{job.state.run_id}".lower()
    if version not in job.catalog.versions():  # a rerun after a kill between publish and record reuses it
        data_text = (f"lake snapshot {data.snapshot}: {data.counts()['train_images']} train / "
                     f"{data.counts()['validation_images']} validation images of {job.settings.images_bucket}, "
                     f"labels {', '.join(data.label_names)}")
        model = create_model(cfg.arch, pretrained=False, img_size=cfg.img_size, num_classes=cfg.num_classes,
                             head=cfg.head)
        active_model = load_version(job.catalog, job.active)
        if finetune:
            weights, figures = train_finetune(job.settings, job.state.run_id, active_model, head_cfg, cfg, data,
                                              data_text)
            model.load_state_dict(weights)
            description = (f"{cfg.method} model fine-tuned end to end (backbone and head) on the lake's labelled "
                           f"images, from the backbone of {job.active}")
            training = {**asdict(cfg), "head_stage": asdict(head_cfg)}
            extra = {"head_stage_val_map": figures["head_val_map"], "images_read": figures["images"],
                     "images_unreadable": figures["unreadable"]}
        else:
            head, figures = train_head(job.settings, job.state.run_id, cfg, data, data_text)
            model.backbone.load_state_dict(active_model.backbone.state_dict())
            model.head.load_state_dict(head)
            description = f"{cfg.method} head trained on the lake's labels over the backbone of {job.active}"
            training, extra = asdict(cfg), {}
        card = ModelCard(version=version, arch=cfg.arch, method=cfg.method, backbone=active_card.backbone,
                         bits=cfg.bits, input_size=cfg.img_size, description=description,
                         training=training, data=data_text,
                         metrics={"val_map_tie_expected": figures["val_map"], "best_epoch": figures["best_epoch"],
                                  "history": figures["history"], "lake_snapshot": data.snapshot,
                                  "run_id": job.state.run_id, "commit": _commit(), **extra})
        job.catalog.publish(card, model.eval().state_dict())
        job._candidate_model = model.eval()
    else:
        figures = {"val_map": job.catalog.card(version).metrics.get("val_map_tie_expected"), "best_epoch": None}
    job.state.candidate = version
    return {"candidate": version, "method": cfg.method, "epochs": cfg.epochs, "val_map": figures["val_map"],
            "best_epoch": figures["best_epoch"]}


def _evaluate(job: _Run) -> dict:
    import numpy as np
    import torch

    from hashing_models.codes import pack_signs
    from scheduler.retrain.gate import evaluate

    data = job.data()
    unencoded = 0
    if job.state.mode == "finetune":  # the stored features are the old backbone's: encode the images
        from scheduler.retrain.reencode_images import candidate_codes

        data = data.take(np.flatnonzero(data.split != "validation"))  # the gate's queries and database only

        got = candidate_codes(job.settings, job.con, active=job.active, candidate=job.state.candidate,
                              backbone=job.backbone, refs=data.refs, run_id=job.state.run_id,
                              progress=lambda done, total: job.progress("evaluate", done, total))
        rows = np.flatnonzero([code is not None for code in got])
        unencoded = len(got) - len(rows)  # unreadable now, or overwritten since the snapshot
        data = data.take(rows)
        codes = np.frombuffer(b"".join(got[r] for r in rows), np.uint8).reshape(len(rows), -1)
    else:
        model = job.candidate_model()
        with torch.inference_mode():
            codes = pack_signs(model.forward_head(torch.from_numpy(data.features)).h)
    result = evaluate(data, codes, job.settings.retrain_tolerance)
    return {**result.figures(), "reason": result.reason, "unencoded": unencoded}


def _reencode(job: _Run) -> dict:
    from scheduler.retrain.reencode import reencode_head

    if job.state.mode == "finetune":
        from scheduler.retrain.reencode_images import reencode_images

        return reencode_images(job.settings, job.con, active=job.active, candidate=job.state.candidate,
                               backbone=job.backbone, run_id=job.state.run_id,
                               progress=lambda done, total: job.progress("reencode", done, total))
    return reencode_head(job.settings, job.con, active=job.active, candidate=job.state.candidate,
                         backbone=job.backbone, head=job.candidate_model().head, run_id=job.state.run_id,
                         progress=lambda done, total: job.progress("reencode", done, total))


def _flip(job: _Run) -> dict:
    from scheduler.promote import promote

    def progress(summary) -> None:
        job.progress("flip", summary.indexed, summary.listed)

    # the candidate was evaluated against job.active: if someone promoted another version meanwhile,
    # the run fails here rather than override it
    result = promote(job.settings, job.state.candidate, progress=progress, poll_s=2.0, expected_active=job.active)
    return {"previous": result.previous, "listed": result.listed, "indexed": result.indexed, "failed": result.failed,
            "reconciler_runs": result.runs}


STEP_FUNCTIONS = {"data": _data, "train": _train, "evaluate": _evaluate, "reencode": _reencode, "flip": _flip}


def _commit() -> str:
    """The source commit the job runs, for the card (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
