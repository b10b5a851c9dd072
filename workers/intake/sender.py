"""Publish batches as Celery tasks, by name, through the one Celery app (``workers.celery_app``), torch-free.

A publish is "safely queued" once Redis has answered the LPUSH of the message. A dead broker makes
``send`` raise (kombu's ``OperationalError`` after the app's short publish retry policy, ~1-3 s), and
the caller keeps its batch to send again: nothing is acknowledged before the publish returned.
"""
from __future__ import annotations

from celery import Celery

from hashlake.config import Settings
from workers.celery_app import make_app
from workers.messages import ENCODE_TASK, TOMBSTONE_TASK, Batch

TASK_FOR_KIND = {"encode": ENCODE_TASK, "delete": TOMBSTONE_TASK}


class BatchSender:
    """Owns one broker connection; use from one thread (the batcher's)."""

    def __init__(self, settings: Settings):
        # The app's factory bound to *these* settings (not the process-wide ones): same definition
        # (JSON, queue, publish retry policy), the broker this intake was pointed at.
        self.app = make_app(settings)
        self.connection = self.app.connection_for_write()

    def send(self, batch: Batch) -> None:
        """Publish one batch; raises the broker's error when it could not be queued."""
        self.app.send_task(TASK_FOR_KIND[batch.kind], args=[batch.to_json()], connection=self.connection,
                           ignore_result=True)

    def close(self) -> None:
        self.connection.release()


def task_queue_names(settings: Settings, app: Celery | None = None) -> list[str]:
    """The Celery queues (Redis lists of the same names) the encode and tombstone tasks are routed to."""
    router = (app or make_app(settings)).amqp.router
    return sorted({router.route({}, name)["queue"].name for name in TASK_FOR_KIND.values()})
