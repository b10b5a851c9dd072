"""Submitting retraining runs: one Ray job per scheduled slot, however often beat fires, and resuming."""
from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from hashlake.store import ObjectStore

from scheduler.submit import SubmitError, client, resume, run_id_for, slot_of, submit_nightly
from scheduler.submit import cron_schedule as slot_schedule
from scheduler.retrain.state import RunLog, RunState


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_the_slot_is_the_scheduled_minute_not_the_firing_time():
    nightly = "0 2 * * *"
    assert slot_of(nightly, at("2026-12-02T02:00:00")) == at("2026-12-02T02:00:00")
    # two beats firing seconds apart, or a worker taking the task hours late: the same night's run
    assert {run_id_for("head", slot_of(nightly, at(t))) for t in
            ("2026-12-02T02:00:01", "2026-12-02T02:00:59", "2026-12-02T13:30:00", "2026-12-03T01:59:59")} \
        == {"retrain-nightly-head-20261202t0200z"}
    assert slot_of(nightly, at("2026-12-03T02:00:00")) == at("2026-12-03T02:00:00")  # the next night: a new run
    weekly = "30 3 * * 0"  # Sundays 03:30
    assert slot_of(weekly, at("2026-12-09T12:00:00")) == at("2026-12-06T03:30:00")
    with pytest.raises(ValueError, match="5 fields"):
        slot_of("0 2 * *", at("2026-12-02T02:00:00"))


@pytest.mark.services
def test_a_double_beat_fire_starts_one_job(settings, ray_head):
    settings = settings.model_copy(update={"ray_address": f"http://127.0.0.1:{ray_head.port}"})
    fired = at("2026-12-02T02:00:00")
    ids: list[str] = []

    def beat(offset_s: int) -> None:  # two beat processes, a few seconds apart, at once
        ids.append(submit_nightly(settings, fired.replace(second=offset_s)))

    threads = [threading.Thread(target=beat, args=(s,)) for s in (1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids.append(submit_nightly(settings, fired.replace(second=30)))  # and once more, later
    assert len(set(ids)) == 1
    jobs = [job for job in client(settings).list_jobs() if job.submission_id == ids[0]]
    assert len(jobs) == 1 and jobs[0].entrypoint.endswith(f"--run-id {ids[0]} --mode head")


@pytest.mark.services
def test_resume_submits_a_new_attempt_of_an_unfinished_run_only(settings, ray_head):
    settings = settings.model_copy(update={"ray_address": f"http://127.0.0.1:{ray_head.port}"})
    ObjectStore(settings).ensure_bucket(settings.index_bucket)
    runs = RunLog(settings)
    with pytest.raises(SubmitError, match="no retraining run"):
        resume(settings, "retrain-manual-head-nothing")
    runs.save(RunState(run_id="retrain-manual-head-done", mode="head", outcome="succeeded"))
    with pytest.raises(SubmitError, match="already ended succeeded"):
        resume(settings, "retrain-manual-head-done")
    runs.save(RunState(run_id="retrain-manual-head-killed", mode="head", outcome="running"))
    first = resume(settings, "retrain-manual-head-killed")
    second = resume(settings, "retrain-manual-head-killed")
    assert (first, second) == ("retrain-manual-head-killed.retry1", "retrain-manual-head-killed.retry2")
    entrypoints = {job.submission_id: job.entrypoint for job in client(settings).list_jobs()}
    assert entrypoints[first].endswith("--run-id retrain-manual-head-killed --mode head")


def test_an_unreachable_ray_cluster_is_a_clear_error(settings):
    settings = settings.model_copy(update={"ray_address": "http://127.0.0.1:9"})
    with pytest.raises(SubmitError, match="no Ray Jobs API at http://127.0.0.1:9"):
        submit_nightly(settings, at("2026-12-02T02:00:00"))


def test_the_beat_entry_fires_nightly_on_a_queue_no_encode_backlog_delays():
    from workers.celery_app import QUEUE, SCHEDULER_QUEUE, app
    from scheduler.tasks import NIGHTLY_TASK

    entry = app.conf.beat_schedule["nightly-retrain"]
    assert entry["task"] == NIGHTLY_TASK and str(entry["schedule"]) == str(slot_schedule("0 2 * * *"))
    assert app.amqp.router.route({}, NIGHTLY_TASK)["queue"].name == SCHEDULER_QUEUE
    assert {q.name for q in app.conf.task_queues} == {QUEUE, SCHEDULER_QUEUE}  # a worker without -Q takes both
    assert NIGHTLY_TASK in app.tasks
