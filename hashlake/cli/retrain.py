"""Retraining's commands: ``hashlake retrain`` (submit a run to the Ray cluster) and ``hashlake jobs``."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from hashlake.cli.errors import fail
from hashlake.cli.output import console
from hashlake.config import load_settings


def retrain(mode: Annotated[str, typer.Option(help="head: a new hash head on the stored features (minutes on a "
                                                     "CPU, no image read); finetune: backbone and head trained end "
                                                     "to end on the images, read from the bucket, then every image "
                                                     "re-encoded (GPU workers where the Ray cluster has them)")
                                     ] = "head",
            wait: Annotated[bool, typer.Option("--wait", help="follow the run with a progress bar until it ends")] = False,
            resume: Annotated[Optional[str], typer.Option(help="submit this failed or killed run again; it goes on "
                                                                "from its first unfinished step")] = None) -> None:
    """Submit a retraining run to the Ray cluster (HASHLAKE_RAY_ADDRESS) now, as the nightly schedule does."""
    from scheduler.submit import resume as resume_run, submit_retrain, wait_with_progress

    from scheduler.retrain.job import MODES

    if mode not in MODES:
        fail(f"unknown retraining mode {mode!r}: use head (a new hash head on the stored features) or finetune "
             f"(backbone and head on the images)")
    settings = load_settings()
    submission = resume_run(settings, resume) if resume else submit_retrain(settings, mode)
    run_id = resume or submission
    console.print(f"run {run_id}: submitted as Ray job {submission} to {settings.ray_address}", markup=False)
    if not wait:
        return
    state = wait_with_progress(settings, submission, console, run_id=run_id)
    _print_run(state)
    if state.outcome == "failed":
        raise typer.Exit(1)


def _print_run(state) -> None:
    console.print(f"run {state.run_id}: {state.outcome}" + (f" — {state.reason}" if state.reason else ""),
                  markup=False)
    for name, value in state.figures.items():
        if not isinstance(value, (list, dict)):
            console.print(f"  {name} = {value}", markup=False)


def jobs(limit: Annotated[int, typer.Option(help="show the newest N runs")] = 20) -> None:
    """Retraining runs, newest first: outcome, candidate, duration and the gate's figures."""
    from datetime import datetime, timezone

    from scheduler.retrain.state import RunLog

    table = Table(Column("run", no_wrap=True), "mode", "outcome", "candidate", "started (UTC)", Column("s", justify="right"),
                  Column("mAP active → candidate", justify="right"), "reason")
    for state in RunLog(load_settings()).runs()[:limit]:
        figures = state.figures
        gate = (f"{figures['evaluate.active_map']:.4f} → {figures['evaluate.candidate_map']:.4f}"
                if "evaluate.candidate_map" in figures else "")
        started = datetime.fromtimestamp(state.started_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
        table.add_row(state.run_id, state.mode, state.outcome, state.candidate or "", started,
                      f"{state.updated_at - state.started_at:.0f}", gate, state.reason or "")
    console.print(table)

