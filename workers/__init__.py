"""The encode workers' side: the Celery app and tasks, the encode pipeline and the event intake.

    celery_app.py  the Celery app: broker, serialization, delivery guarantees (imported by senders too)
    messages.py    what travels through the broker: batches of object references as JSON; task names
    tasks.py       the Celery tasks and worker-process hooks, thin wrappers around ``encode.runner``
    deliveries.py  the delivery ledger: per batch, deliveries that started and never finished
    metrics.py     the encode workers' Prometheus metrics, correct under the prefork pool

    encode/   the encode pipeline: read ▶ decode ▶ model ▶ pack ▶ write
    intake/   bucket events and the reconciler, batched into Celery tasks (``hashlake intake``)
"""
