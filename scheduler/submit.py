"""Submitting retraining runs to the Ray cluster, once per scheduled slot, and following them.

The run id is also the Ray job's submission id, and Ray refuses a second job under an id it knows: so
the nightly beat task, fired twice or by two beat processes, starts one job, since both derive the
id from the cron slot they serve (``slot_of``: the scheduled minute, not the firing time). A manual
``hashlake retrain`` names its minute of submission (``manual`` runs), and resuming a run that failed
or was killed submits ``<run>.retry<k>`` running the same run id, which continues from the run's
record (``scheduler.retrain.state``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from hashlake.config import Settings
from scheduler.retrain.state import RunLog, RunState

ENTRYPOINT = "python -m scheduler.retrain --run-id {run_id} --mode {mode}"
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}  # Ray's terminal job statuses


class SubmitError(RuntimeError):
    """The Ray cluster refused or could not be reached; the message says which and where."""


def client(settings: Settings):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(settings.ray_address)
    except (ConnectionError, RuntimeError) as exc:
        raise SubmitError(f"no Ray Jobs API at {settings.ray_address} (HASHLAKE_RAY_ADDRESS): {exc}") from exc


def cron_schedule(cron: str):
    """A 5-field cron string (minute hour day-of-month month day-of-week, as crontab(5) orders them) →
    Celery's ``crontab`` (whose positional order differs: keywords here)."""
    from celery.schedules import crontab

    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"retrain cron {cron!r}: need 5 fields (minute hour day-of-month month day-of-week)")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def slot_of(cron: str, now: datetime) -> datetime:
    """The latest minute at or before ``now`` (UTC) that the 5-field ``cron`` schedules; looks back up to
    31 days (a schedule firing less often than monthly is refused)."""
    schedule = cron_schedule(cron)
    moment = now.astimezone(timezone.utc).replace(second=0, microsecond=0)
    for _ in range(31 * 24 * 60):
        if (moment.minute in schedule.minute and moment.hour in schedule.hour
                and moment.day in schedule.day_of_month and moment.month in schedule.month_of_year
                and moment.isoweekday() % 7 in schedule.day_of_week):
            return moment
        moment -= timedelta(minutes=1)
    raise ValueError(f"retrain cron {cron!r} schedules nothing in the last 31 days")


def run_id_for(mode: str, slot: datetime, kind: str = "nightly") -> str:
    return f"retrain-{kind}-{mode}-{slot.strftime('%Y%m%dt%H%Mz')}"


def _runtime_env() -> dict:
    """What the job's driver needs beyond the head's own environment: the caller's settings file."""
    env = {name: os.environ[name] for name in ("HASHLAKE_CONFIG",) if name in os.environ}
    return {"env_vars": env} if env else {}


def submit(settings: Settings, run_id: str, mode: str = "head", *, submission_id: str | None = None) -> str:
    """Submit the job of ``run_id`` unless Ray already has one under ``submission_id`` (default the run id)."""
    jobs = client(settings)
    submission_id = submission_id or run_id
    try:
        jobs.get_job_info(submission_id)
        return submission_id  # submitted before (a second beat, a repeated call): nothing to do
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise SubmitError(f"Ray Jobs API at {settings.ray_address}: {exc}") from exc
    try:
        jobs.submit_job(entrypoint=ENTRYPOINT.format(run_id=run_id, mode=mode), submission_id=submission_id,
                        runtime_env=_runtime_env(), metadata={"run_id": run_id, "mode": mode})
    except RuntimeError as exc:
        if "already exists" in str(exc):
            return submission_id  # lost the race to another submitter of the same slot: one job all the same
        raise SubmitError(f"Ray Jobs API at {settings.ray_address} refused the job: {exc}") from exc
    return submission_id


def submit_nightly(settings: Settings, now: datetime | None = None) -> str:
    """The beat task's work: the run of the cron slot ``now`` falls in."""
    slot = slot_of(settings.retrain_cron, now or datetime.now(timezone.utc))
    return submit(settings, run_id_for(settings.retrain_mode, slot), settings.retrain_mode)


def submit_retrain(settings: Settings, mode: str = "head") -> str:
    """A manual run, named by its minute (two submissions within one minute are one run)."""
    return submit(settings, run_id_for(mode, datetime.now(timezone.utc), kind="manual"), mode)


def resume(settings: Settings, run_id: str) -> str:
    """Submit run ``run_id`` again (after a failure or a kill): the job continues from its record."""
    state = RunLog(settings).load(run_id)
    if state is None:
        raise SubmitError(f"no retraining run {run_id!r} is recorded (see `hashlake jobs`)")
    if state.outcome in ("succeeded", "rejected"):
        raise SubmitError(f"run {run_id} already ended {state.outcome}; nothing to resume")
    jobs = client(settings)
    known = {job.submission_id for job in jobs.list_jobs()}
    attempt = 1
    while f"{run_id}.retry{attempt}" in known:
        attempt += 1
    return submit(settings, run_id, state.mode, submission_id=f"{run_id}.retry{attempt}")


def wait(settings: Settings, submission_id: str, run_id: str | None = None, *,
         on_progress: Callable[[RunState | None], None] = lambda state: None, poll_s: float = 1.0,
         timeout_s: float | None = None) -> tuple[str, RunState | None]:
    """Poll the Ray job and the run record until the job ends → (Ray's final status, the run record)."""
    jobs, runs = client(settings), RunLog(settings)
    run_id = run_id or submission_id
    started = time.monotonic()
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        state = runs.load(run_id)
        on_progress(state)
        if status in FINISHED:
            if state is None or state.outcome == "running":  # died before or while writing its record
                logs = jobs.get_job_logs(submission_id)[-2000:]
                raise SubmitError(f"Ray job {submission_id} ended {status} without finishing run {run_id}; "
                                  f"the end of its log:\n{logs}")
            return status, state
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise SubmitError(f"run {run_id} still running after {timeout_s:.0f} s (Ray job {submission_id})")
        time.sleep(poll_s)


def wait_with_progress(settings: Settings, submission_id: str, console, run_id: str | None = None) -> RunState:
    """``wait`` with a rich progress bar: the step under way and its done/total."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("submitted", total=None)

        def show(state: RunState | None) -> None:
            if state is None:
                return
            step = state.progress.get("step") or next((s for s in ("data", "train", "evaluate", "reencode", "flip")
                                                       if s not in state.steps), "done")
            progress.update(task, description=f"{state.run_id[-14:]} {step}", completed=state.progress.get("done", 0),
                            total=state.progress.get("total"))

        _, state = wait(settings, submission_id, run_id, on_progress=show)
    return state
