"""The intake process end to end: webhook over HTTP, Redis list, reconciler, batcher, metrics; SIGKILL and restart."""
from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from conftest import WEBHOOK_TOKEN
from hashlake.local.services import free_port, port_open, spawn, wait_until
from workers.intake import run_intake
from workers.intake.events import minio_record, webhook_body
from workers.intake.pending import IntakeKeys
from workers.intake.sender import task_queue_names

EVENTS = Path(__file__).resolve().parents[2] / "shared" / "events"
INTAKE_DB = 12  # a Redis db of this test's own
RUN = "from hashlake.config import Settings; from workers.intake import run_intake; run_intake(Settings())"


def env_for(settings) -> dict[str, str]:
    env = {}
    for name, value in settings:
        if value is None:
            continue
        env[f"HASHLAKE_{name.upper()}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return env


def start_intake(settings, log: Path):
    svc = spawn("intake", [sys.executable, "-c", RUN], log, env=env_for(settings), port=settings.webhook_port)
    wait_until(lambda: port_open(settings.webhook_port), 30, "the intake webhook", svc.proc, log)
    return svc


def post(settings, body: bytes) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{settings.webhook_port}/minio/events", data=body,
                                 headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def sent_keys(client: redis.Redis, queue: str) -> list[tuple[str, list[str]]]:
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        (batch,), _, _ = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], sorted(o["key"] for o in batch["objects"])))
    return out


def test_intake_process_survives_sigkill_and_exports_metrics(settings, store, tmp_path):
    put, element = EVENTS / "webhook-put.json", EVENTS / "redis-access-put.json"
    if not put.exists():
        pytest.skip(f"MinIO event samples not found in {EVENTS}")
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{INTAKE_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store.put(settings.images_bucket, "from-listing.jpg", b"x")  # only the reconciler announces this one
    base = settings.model_copy(update={
        "redis_url": url, "webhook_port": free_port(), "metrics_port": free_port(), "model_version": "v1",
        "reconcile_interval_s": 0.5, "batch_size": 100, "batch_window_ms": 600_000})
    keys, (queue,) = IntakeKeys.for_settings(base), task_queue_names(base)
    log = tmp_path / "intake.log"

    first = start_intake(base, log)
    try:
        # The samples name bucket "images"; this test's bucket has a name of its own.
        in_bucket = f'"name":"{base.images_bucket}"'.encode()
        assert post(base, put.read_bytes().replace(b'"name":"images"', in_bucket)) == 200
        client.rpush(keys.events, element.read_bytes().replace(b'"name":"images"', in_bucket))
        # The batcher holds all three in its open batch (a 10-minute window) ... and is killed.
        wait_until(lambda: client.llen(keys.pending_processing) == 3, 20, "3 claimed entries", first.proc, log)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert client.llen(queue) == 0 and client.llen(keys.pending_processing) == 3

        restarted = base.model_copy(update={"batch_window_ms": 200})
        second = start_intake(restarted, log)
        wait_until(lambda: client.llen(queue) >= 1, 20, "a batch in the Celery queue", second.proc, log)
        ((task, objects),) = sent_keys(client, queue)
        assert task == "hashlake.encode_batch" and objects == ["cats/tabby 01.jpg", "from-listing.jpg"]
        # The claimed entries go once the broker confirmed the task: just after it appears in the queue.
        wait_until(lambda: client.llen(keys.pending) == client.llen(keys.pending_processing) == 0, 10,
                   "the sent batch's entries removed", second.proc, log)

        with urllib.request.urlopen(f"http://127.0.0.1:{base.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'hashlake_intake_batches_sent_total{kind="encode"} 1.0' in text
        assert 'hashlake_intake_reconcile_missing_total' in text and "hashlake_intake_redis_up 1.0" in text
        assert f'hashlake_broker_queue_depth{{queue="{queue}"}} 1.0' in text

        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(20) == 0
    finally:
        first.stop()
        if "second" in locals():
            second.stop()
        client.close()


def test_intake_refuses_a_webhook_port_in_use(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = settings.model_copy(update={"webhook_port": taken.getsockname()[1]})
        with pytest.raises(OSError, match="HASHLAKE_WEBHOOK_HOST/PORT"):
            run_intake(busy, metrics_port=0)


def test_webhook_answers_kept_alive_connections_without_delayed_ack_stalls(settings):
    """MinIO posts its events over kept-alive connections. With Nagle on at the intake, each answer
    (head and body written apart) waited for the client's delayed ACK: >= 40 ms a POST."""
    own = settings.model_copy(update={"webhook_port": free_port(), "reconcile_interval_s": 3600})
    stop = threading.Event()
    intake = threading.Thread(target=run_intake, args=(own,), kwargs={"stop": stop, "metrics_port": 0})
    intake.start()
    try:
        wait_until(lambda: port_open(own.webhook_port), 30, "the intake webhook")
        conn = http.client.HTTPConnection("127.0.0.1", own.webhook_port, timeout=10)
        headers = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
        started = time.perf_counter()
        for i in range(20):
            body = webhook_body([minio_record("s3:ObjectCreated:Put", own.images_bucket, f"k{i}.jpg",
                                              etag=f"{i:032x}", size=1)])
            conn.request("POST", "/minio/events", body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
        elapsed = time.perf_counter() - started
        conn.close()
        assert elapsed < 0.4, f"20 POSTs on one connection took {elapsed:.2f} s"
    finally:
        stop.set()
        intake.join(30)
