"""The beat side of nightly retraining: one Celery task, scheduled by ``Settings.retrain_cron``.

Beat (``celery -A workers.celery_app beat``) sends it at each scheduled minute to the ``hashlake`` queue;
whichever worker takes it submits the Ray job of that minute's slot (``scheduler.submit.submit_nightly``)
and returns at once, the job runs on the Ray cluster. The slot comes from the task's own schedule, not
the moment a worker runs it, so a beat that fires twice, or two beats, submit one job.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from workers.celery_app import app

log = logging.getLogger(__name__)

NIGHTLY_TASK = "hashlake.retrain_nightly"


@app.task(name=NIGHTLY_TASK, acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=30, max_retries=5)
def retrain_nightly(fired_at: str | None = None) -> str:
    """Submit the nightly run of the slot ``fired_at`` (ISO time; default now) falls in; returns its run id."""
    from hashlake.config import get_settings
    from scheduler.submit import submit_nightly

    now = datetime.fromisoformat(fired_at) if fired_at else datetime.now(timezone.utc)
    run_id = submit_nightly(get_settings(), now)
    log.info("nightly retraining: run %s submitted (or already there)", run_id)
    return run_id
