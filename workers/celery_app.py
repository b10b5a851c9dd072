"""The Celery app: broker, serialization and delivery guarantees of the encode and tombstone tasks.

Imports no torch and no task code: the intake imports ``app`` to send tasks by name
(``app.send_task(ENCODE_TASK, args=[batch.to_json()])``); only a worker imports ``workers.tasks``.

Run a worker node (one per GPU: pin it with HASHLAKE_DEVICE=cuda:N; on CPU one per machine, or
several with HASHLAKE_TORCH_THREADS splitting the cores). The model lives in the single pool child:

    PROMETHEUS_MULTIPROC_DIR=<a folder of this node's own> HASHLAKE_WORKER_METRICS_PORT=<port> \\
        celery -A workers.celery_app worker --pool prefork --concurrency 1 --hostname worker0@%h

The node empties PROMETHEUS_MULTIPROC_DIR at start and serves /metrics on the port
(default Settings.metrics_port + 1). Other settings come from HASHLAKE_* / HASHLAKE_CONFIG.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from hashlake.config import Settings, get_settings

QUEUE = "hashlake"  # a queue of our own, so that other apps on the same Redis do not take our tasks
# The nightly submission's queue: a worker started without -Q consumes both, and the task waits only
# behind the batch a worker has in hand, never behind an encode backlog.
SCHEDULER_QUEUE = "hashlake-scheduler"

# A publish to a dead broker must fail fast: the intake answers 503 and MinIO retries the event.
# Connection refused fails at once; an unreachable host costs connect timeout × attempts ≈ 3 s.
PUBLISH_CONNECT_TIMEOUT_S = 1.0
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5}


def make_app(settings: Settings) -> Celery:
    from scheduler.submit import cron_schedule  # imports no Ray: the client is imported where a job is submitted

    app = Celery("hashlake", broker=settings.redis_url, include=["workers.tasks", "scheduler.tasks"])
    app.conf.update(
        # JSON only: a message is data, never code (pickle would run whatever a broker writer sends).
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # outputs are shards; nobody waits on results
        task_default_queue=QUEUE,
        task_queues=(Queue(QUEUE), Queue(SCHEDULER_QUEUE)),
        task_routes={"hashlake.retrain_nightly": {"queue": SCHEDULER_QUEUE}},
        # At-least-once: ack after the task finished; a pool child that dies mid-batch gets its
        # message requeued at once (reject_on_worker_lost). A retried batch adds nothing the lake holds.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one batch in hand per process: nothing waits behind a slow batch
        # A stuck batch is killed well before the visibility timeout would hand it to a second worker
        # (4,096 images at 224 px on 2 CPU cores ≈ 130 s).
        task_time_limit=600,
        # Redis: a message delivered to a node that then died (SIGKILL of the main process) stays
        # "unacked" until visibility_timeout has passed; then any worker's restore sweep (at its start,
        # and every ~100 s) requeues it. It must exceed the longest task *and* the longest retry
        # countdown (ETA tasks wait unacked in the worker), or the batch runs twice (harmless, wasteful).
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": PUBLISH_CONNECT_TIMEOUT_S,
            **PUBLISH_RETRY_POLICY,  # kombu's retry of the producer connection itself
        },
        broker_connection_timeout=PUBLISH_CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,  # a worker waits for Redis instead of exiting
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        # On a lost broker connection the running batch finishes and its shard becomes queryable;
        # if its ack is lost with the channel, Redis redelivers it after the visibility timeout and
        # the rerun overwrites the same shard. (True would kill the batch only to redo it later.)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # The pool child loads the model in worker_process_init (torch import + weights: seconds),
        # longer than Celery's default 4 s wait for a new child.
        worker_proc_alive_timeout=120.0,
        # Nightly retraining (scheduler/tasks.py): beat sends one task per scheduled minute, in UTC.
        timezone="UTC",
        beat_schedule={"nightly-retrain": {"task": "hashlake.retrain_nightly",
                                           "schedule": cron_schedule(settings.retrain_cron)}},
    )
    return app


app = make_app(get_settings())
