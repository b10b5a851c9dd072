"""Real Celery workers (prefork, one child) against real redis-server, moto_server and the lake: batches are indexed,
bad input becomes failure rows, duplicates add no row, a missing model is retried until one
is active, metrics survive child exits, a SIGKILL mid-batch loses nothing, and a batch that keeps killing
its worker is split until the image that kills it is alone and recorded.

Redelivery after SIGKILL with the Redis transport (kombu 5.7, read in kombu/transport/redis.py):
a delivered message sits in the ``unacked`` hash until acked. Killing only the *pool child* makes
the main process see WorkerLostError; with acks_late + reject_on_worker_lost it requeues the
message at once. Killing the whole *node* leaves the message unacked: nothing happens when the
broker connection closes; it is requeued by ``restore_visible`` (run when a worker starts, then
every ~100 s) only once it is older than ``visibility_timeout``. The tests cover both.
"""
from __future__ import annotations

import os
import resource
import signal
import time
import urllib.request
from itertools import count
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from hashlake.model_versions import init_model
from hashlake.local.services import Service, find_executable, free_port, spawn, wait_until
from workers.celery_app import make_app
from workers.encode.runner import TEST_INFER_DELAY_ENV
from workers.messages import ENCODE_TASK, TOMBSTONE_TASK, Batch, ObjectRef

from conftest import cli_env, lake_rows

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 64
_redis_db = count(8)  # Redis databases 8..15: each worker test has its own queues


@pytest.fixture
def wsettings(settings, redis_service):
    """Settings with a Redis database of this test's own, emptied."""
    db = next(_redis_db) % 8 + 8
    url = f"redis://127.0.0.1:{redis_service.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


class Worker:
    """One `celery worker` node with its metrics exporter, started the way the stack starts it."""

    def __init__(self, settings, tmp_path: Path, name: str, *, env: dict | None = None, args=()):
        self.metrics_port = free_port()
        self.log = tmp_path / f"{name}.log"
        multiproc = tmp_path / f"metrics-{name}"
        multiproc.mkdir(parents=True, exist_ok=True)
        worker_env = {
            **cli_env(settings),
            "HASHLAKE_STACK_DIR": str(tmp_path / "stack"),
            "HASHLAKE_TORCH_THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "HASHLAKE_WORKER_METRICS_PORT": str(self.metrics_port),
            **(env or {}),
        }
        celery = find_executable("celery", "install the project")
        argv = [celery, "-A", "workers.celery_app", "worker", "--pool", "prefork", "--concurrency", "1",
                "--hostname", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                "--without-heartbeat", *args]
        self.service: Service = spawn(name, argv, self.log, env=worker_env, cwd=ROOT)
        try:
            wait_until(lambda: "ready." in self.text(), 90, f"celery worker {name}", self.service.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.service.pid:  # field 4 of /proc/pid/stat: ppid
                pids.append(int(stat.parent.name))
        return pids

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def kill_node(self) -> None:
        os.killpg(self.service.pid, signal.SIGKILL)  # main process and pool child, no cleanup
        self.service.proc.wait(10)

    def stop(self) -> None:
        self.service.stop(grace_s=15)
        if self.service.alive():
            os.killpg(self.service.pid, signal.SIGKILL)


def send(settings, task: str, batch: Batch, **options) -> None:
    app = make_app(settings)
    try:
        app.send_task(task, args=[batch.to_json()], **options)
    finally:
        app.close()


def upload_cifar(store, bucket, cifar_jpegs, start: int, n: int) -> list[ObjectRef]:
    refs = []
    for i in range(start, start + n):
        _, label, body = cifar_jpegs[i]
        etag = store.put(bucket, f"cifar/{i:04d}.jpg", body, metadata={"labels": str(label)})
        refs.append(ObjectRef(bucket, f"cifar/{i:04d}.jpg", etag, len(body), "2026-11-22T10:00:00Z"))
    return refs


def wait_for_rows(settings, table: str, count: int, worker: Worker, *, where: str = "", timeout_s=60.0) -> list[dict]:
    """Poll the lake until ``table`` holds at least ``count`` rows (``where`` filters); return them."""
    found: list[dict] = []

    def enough() -> bool:
        found[:] = lake_rows(settings, table, where)
        return len(found) >= count
    wait_until(enough, timeout_s, f"{count} rows in lake.{table} {where}", worker.service.proc, worker.log)
    return found


def test_worker_indexes_batches_records_failures_and_exports_metrics(wsettings, store, tmp_path, cifar_jpegs):
    s = wsettings
    good = upload_cifar(store, s.images_bucket, cifar_jpegs, 0, 8)
    store.put(s.images_bucket, "bad/notes.txt", b"not an image")
    store.put(s.images_bucket, "bad/empty.jpg", b"")
    bad = [ObjectRef(s.images_bucket, "bad/notes.txt"), ObjectRef(s.images_bucket, "bad/empty.jpg"),
           ObjectRef(s.images_bucket, "bad/vanished.jpg")]
    batch = Batch("encode", tuple(good + bad))

    # No model yet: the batch must wait (retried with backoff), not be lost or recorded as failed.
    worker = Worker(s, tmp_path, "w1", args=["--max-tasks-per-child", "1"])  # a fresh child per task
    try:
        wait_until(lambda: "has no model yet" in worker.text(), 30, "the pool child's start", worker.service.proc,
                   worker.log)
        send(s, ENCODE_TASK, batch)
        wait_until(lambda: "no active model" in worker.text() and "Retry in" in worker.text(), 30,
                   "a retry for the missing model", worker.service.proc, worker.log)
        assert lake_rows(s, "failures") == []
        card = init_model(s, "lsh_effnetlite0_64", img_size=IMG_SIZE, store=store)

        wait_for_rows(s, "codes", len(good), worker)
        send(s, ENCODE_TASK, Batch("encode", tuple(reversed(good + bad))))  # a duplicate: same batch id
        delete = Batch("delete", (ObjectRef(s.images_bucket, "cifar/0000.jpg", event_time="2026-11-22T11:00:00Z"),))
        send(s, TOMBSTONE_TASK, delete)
        [tomb] = wait_for_rows(s, "deletes", 1, worker)
        wait_until(lambda: "succeeded" in worker.text() and worker.text().count(f"'batch_id': '{batch.batch_id}'") >= 2,
                   30, "the duplicate batch", worker.service.proc, worker.log)

        codes = lake_rows(s, "codes")
        assert sorted(r["key"] for r in codes) == sorted(r.key for r in good)  # the duplicate added nothing
        assert all(r["labels"] == [str(cifar_jpegs[int(r["key"][6:10])][1])] for r in codes)
        assert {r["batch_id"] for r in codes} == {batch.batch_id}
        failures = lake_rows(s, "failures")
        # the duplicate's missing object is looked for again (missing settles nothing), the others are not
        assert sorted((f["key"], f["reason"]) for f in failures) == [
            ("bad/empty.jpg", "empty"), ("bad/notes.txt", "not_an_image"), ("bad/vanished.jpg", "missing"),
            ("bad/vanished.jpg", "missing")]
        assert (tomb["key"], tomb["deleted_at"].isoformat()) == ("cifar/0000.jpg", "2026-11-22T11:00:00+00:00")

        # Every task ran in its own pool child (max-tasks-per-child 1): the sums prove no exited
        # child's numbers were lost.
        m = worker.metrics()
        assert m[("hashlake_worker_images_encoded_total", (("model", card.version),))] == 8
        # the good ones; the bad refs name no etag, so they are read again (and their refusals not added twice)
        assert m[("hashlake_worker_images_skipped_total", (("reason", "known"),))] == 8
        assert m[("hashlake_worker_failures_total", (("reason", "missing"),))] == 2
        assert m[("hashlake_worker_tombstones_total", (("bucket", s.images_bucket),))] == 1
        for stage in ("read", "infer", "write"):
            assert m[("hashlake_worker_stage_seconds_count", (("stage", stage),))] == 2
        assert m[("hashlake_event_to_queryable_seconds_count", (("source", "enqueued"),))] == 1
        assert m[("hashlake_event_to_queryable_seconds_count", (("source", "event"),))] == 8
        assert m[("hashlake_worker_batches_total", (("kind", "encode"), ("outcome", "retry")))] >= 1
    finally:
        worker.stop()


@pytest.fixture
def model_card(wsettings, store):
    return init_model(wsettings, "lsh_effnetlite0_64", img_size=IMG_SIZE, store=store)


def wait_in_model_stage(worker: Worker, batch: Batch, times: int = 1) -> None:
    """Block until the worker logs the test hook for ``batch``: read done, model stage running, nothing written."""
    line = f"in the model stage of batch {batch.batch_id}"
    wait_until(lambda: worker.text().count(line) >= times, 60, "the batch to reach the model stage",
               worker.service.proc, worker.log)


def test_sigkill_of_the_pool_child_mid_batch_loses_nothing(wsettings, store, model_card, tmp_path, cifar_jpegs):
    s = wsettings
    batch = Batch("encode", tuple(upload_cifar(store, s.images_bucket, cifar_jpegs, 20, 6)))
    worker = Worker(s, tmp_path, "w2", env={TEST_INFER_DELAY_ENV: "2"})
    try:
        send(s, ENCODE_TASK, batch)
        wait_in_model_stage(worker, batch)
        [child] = worker.child_pids()
        os.kill(child, signal.SIGKILL)
        assert lake_rows(s, "codes") == []  # killed before the write stage
        # The main process sees the child die (WorkerLostError) and, with reject_on_worker_lost,
        # requeues the message at once; the new child gets it again.
        wait_in_model_stage(worker, batch, times=2)
        codes = wait_for_rows(s, "codes", len(batch.objects), worker)
        assert "WorkerLostError" in worker.text()
        assert sorted(r["key"] for r in codes) == sorted(o.key for o in batch.objects)
    finally:
        worker.stop()


def test_sigkill_of_the_whole_node_mid_batch_loses_nothing(wsettings, store, model_card, tmp_path, cifar_jpegs):
    # A short visibility timeout stands in for production's 15 min: the message of a dead node is
    # requeued by the next worker's start-up sweep once it is older than that.
    visibility_s = 4.0
    s = wsettings
    env = {"HASHLAKE_BROKER_VISIBILITY_TIMEOUT_S": str(visibility_s)}
    batch = Batch("encode", tuple(upload_cifar(store, s.images_bucket, cifar_jpegs, 40, 6)))
    broker = redis.Redis.from_url(s.redis_url)
    first = Worker(s, tmp_path, "w3", env={**env, TEST_INFER_DELAY_ENV: "30"})
    try:
        send(s, ENCODE_TASK, batch)
        wait_in_model_stage(first, batch)
        delivered_at = time.time()
        first.kill_node()
    finally:
        first.stop()
    assert broker.hlen("unacked") == 1 and broker.llen("hashlake") == 0  # held by a node that is gone
    assert lake_rows(s, "codes") == []

    time.sleep(max(0.0, delivered_at + visibility_s + 0.5 - time.time()))
    second = Worker(s, tmp_path, "w4", env=env)
    try:
        codes = wait_for_rows(s, "codes", len(batch.objects), second)
        assert sorted(r["key"] for r in codes) == sorted(o.key for o in batch.objects)
        assert broker.hlen("unacked") == 0
    finally:
        second.stop()


def test_publish_to_a_dead_broker_fails_within_seconds(settings):
    from kombu.exceptions import OperationalError

    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = make_app(dead)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError):
            app.send_task(ENCODE_TASK, args=[Batch("encode", (ObjectRef("images", "a.jpg", "e"),)).to_json()])
    finally:
        app.close()
    assert time.monotonic() - started < 5.0


def test_app_settings_are_the_delivery_contract(settings):
    conf = make_app(settings).conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == settings.broker_visibility_timeout_s
    assert conf.broker_connection_retry_on_startup


def test_celery_app_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, workers.celery_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# -- poison batches: a worker process that dies on the same batch, again and again -----------------
def _vm_data(pid: int) -> int:
    """Bytes of private writable memory of ``pid``: what RLIMIT_DATA limits."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmData:"))) * 1024


def _poster_png(width: int, height: int) -> bytes:
    """A flat-colour PNG of a few hundred KB whose decode needs width × height × 4 bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def ledger_keys(settings) -> list[bytes]:
    return redis.Redis.from_url(settings.redis_url).keys("hashlake:deliveries:*")


def test_an_image_that_exhausts_the_workers_memory_is_isolated_and_recorded(wsettings, store, model_card, tmp_path,
                                                                             cifar_jpegs):
    """The operator caps the worker's memory (RLIMIT_DATA, as `prlimit --data`, `ulimit -d` or systemd's
    LimitDATA= would) and a legal 150 Mpx PNG (at this worker's pixel limit, so the header check lets it
    through) needs 600 MB to decode: Pillow's real decoder fails to allocate in every child that tries. The batch
    is delivered, dies, is split, ... until the PNG is alone and recorded; every other image is indexed.

    Arrow's default pool (jemalloc/mimalloc) reserves 1 GiB of address space on the first shard a child
    writes, which RLIMIT_DATA counts; with Arrow on malloc (as an operator capping with RLIMIT_DATA
    would run it), a warm child's batches add little; a fresh child peaks higher while it loads the model
    and attaches the lake, which the cap's headroom leaves room for."""
    # A pixel limit above the default's 40 Mpx: the poster must need far more than the cap's headroom,
    # and a fresh child (forked after each death) needs a few hundred MB of it while it attaches the lake.
    s = wsettings.model_copy(update={"max_image_pixels": 150_000_000})
    worker = Worker(s, tmp_path, "w5", env={"ARROW_DEFAULT_MEMORY_POOL": "system",
                                            "HASHLAKE_MAX_IMAGE_PIXELS": str(s.max_image_pixels)})
    try:
        warm = Batch("encode", tuple(upload_cifar(store, s.images_bucket, cifar_jpegs, 60, 2)))
        send(s, ENCODE_TASK, warm)  # the child's first forward and shard write happen before it is measured
        wait_for_rows(s, "codes", len(warm.objects), worker)
        [child] = worker.child_pids()
        # The cap: what a warm child uses, plus 400 MB (a fresh child's model load and lake attach peak
        # above a warm child's steady use). The PNG needs 600 MB more. Children forked later (one per
        # death) inherit the main process's cap.
        cap = _vm_data(child) + 400 * 2**20
        for pid in (worker.service.pid, child):
            resource.prlimit(pid, resource.RLIMIT_DATA, (cap, cap))

        good = upload_cifar(store, s.images_bucket, cifar_jpegs, 62, 5)
        poster = _poster_png(15000, 10000)  # 150,000,000 px = this worker's max_image_pixels
        poster_etag = store.put(s.images_bucket, "posters/huge.png", poster)
        poison = ObjectRef(s.images_bucket, "posters/huge.png", poster_etag, len(poster), "2026-11-22T10:00:00Z")
        batch = Batch("encode", tuple(good[:3] + [poison] + good[3:]))
        # A process out of memory may also hang rather than raise: a short hard time limit (its halves
        # inherit it) ends such a delivery, which counts as a death too, instead of production's 600 s.
        send(s, ENCODE_TASK, batch, time_limit=20)

        [failure] = wait_for_rows(s, "failures", 1, worker, timeout_s=180)
        assert (failure["key"], failure["etag"], failure["reason"]) == ("posters/huge.png", poster_etag,
                                                                        "crashed_worker")
        assert "killed the worker process 6 times" in failure["detail"]  # whole batch, half, alone: 2 each
        # The node's view of the last death, noted by its main process, and the child's own when it had one.
        assert "exitcode 12" in failure["detail"] or "hard time limit" in failure["detail"]
        good_keys = sorted(r.key for r in warm.objects + tuple(good))
        wait_until(lambda: sorted({r["key"] for r in lake_rows(s, "codes")}) == good_keys,
                   60, "every other image indexed", worker.service.proc, worker.log)

        broker = redis.Redis.from_url(s.redis_url)
        wait_until(lambda: broker.llen("hashlake") == 0 and broker.hlen("unacked") == 0, 30, "an empty queue")
        assert ledger_keys(s) == []  # every batch, split or recorded, is done for good
        text = worker.text()
        assert "split into" in text and "exitcode 12" in text
        assert "MemoryError('out of memory reading or decoding s3://" in text
        m = worker.metrics()
        assert m[("hashlake_worker_failures_total", (("reason", "crashed_worker"),))] == 1
        assert m[("hashlake_worker_batches_total", (("kind", "encode"), ("outcome", "split")))] >= 2
    finally:
        worker.stop()


def test_a_batch_whose_worker_is_killed_twice_is_split_and_loses_nothing(wsettings, store, model_card, tmp_path,
                                                                          cifar_jpegs):
    """No poison, two deaths in a row (SIGKILL from outside, as the OOM killer would send for another
    process's memory): the third delivery sends the halves instead, both encode, nothing is recorded."""
    s = wsettings
    batch = Batch("encode", tuple(upload_cifar(store, s.images_bucket, cifar_jpegs, 80, 6)))
    worker = Worker(s, tmp_path, "w6", env={TEST_INFER_DELAY_ENV: "2"})
    try:
        send(s, ENCODE_TASK, batch)
        for times in (1, 2):
            wait_in_model_stage(worker, batch, times)
            [child] = worker.child_pids()
            os.kill(child, signal.SIGKILL)
        keys = sorted(o.key for o in batch.objects)
        wait_until(lambda: sorted(r["key"] for r in lake_rows(s, "codes")) == keys,
                   90, "both halves indexed", worker.service.proc, worker.log)
        assert batch.batch_id not in {r["batch_id"] for r in lake_rows(s, "codes")}  # written by the halves
        assert lake_rows(s, "failures") == []
        split = next(line for line in worker.text().splitlines() if "split into" in line)
        assert f"batch {batch.batch_id} of 6 objects killed the worker process 2 times" in split
        assert "signal 9 (SIGKILL)" in split
        wait_until(lambda: ledger_keys(s) == [], 10, "the ledger to forget the batches")
    finally:
        worker.stop()


def test_a_batch_that_never_finishes_is_killed_at_the_time_limit_requeued_and_recorded(wsettings, store, model_card,
                                                                                       tmp_path, cifar_jpegs):
    """The model stage never ends (the test hook sleeps past the hard time limit): each delivery is killed
    at the limit and requeued, not acked and dropped; the third records the object instead of hanging again."""
    s = wsettings
    batch = Batch("encode", tuple(upload_cifar(store, s.images_bucket, cifar_jpegs, 90, 1)))
    worker = Worker(s, tmp_path, "w7", env={TEST_INFER_DELAY_ENV: "30"})
    try:
        send(s, ENCODE_TASK, batch, time_limit=8)  # the message's own hard limit, under the app's 600 s
        # (8 s: the third delivery, which only records the object, must finish inside it on busy cores)
        [row] = wait_for_rows(s, "failures", 1, worker, timeout_s=60)
        assert row["reason"] == "crashed_worker" and "hard time limit of 8" in row["detail"]
        assert worker.text().count("Hard time limit (8") == 2
        broker = redis.Redis.from_url(s.redis_url)
        wait_until(lambda: broker.llen("hashlake") == 0 and broker.hlen("unacked") == 0, 30, "an empty queue")
    finally:
        worker.stop()


def test_a_forward_that_raises_on_one_image_is_isolated_and_recorded(wsettings, store, tmp_path, cifar_jpegs):
    """The active model's forward raises ValueError on any batch holding a flat image (tests/faulty_model.py,
    loaded into the worker with --include). The task is not acked with its objects dropped: each failed
    delivery counts as a death, the batch is split until the flat image is alone, then recorded naming
    the error; every other image is indexed."""
    import io

    from PIL import Image

    import faulty_model  # noqa: F401 — registers faulty_effnetlite0_64 in this process too

    s = wsettings
    card = init_model(s, "faulty_effnetlite0_64", img_size=IMG_SIZE, store=store)
    good = upload_cifar(store, s.images_bucket, cifar_jpegs, 100, 6)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (250, 250, 250)).save(buf, "PNG")
    flat_etag = store.put(s.images_bucket, "flat.png", buf.getvalue())
    batch = Batch("encode", tuple(good[:2] + [ObjectRef(s.images_bucket, "flat.png", flat_etag)] + good[2:]))
    tests_dir = str(ROOT / "tests")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p)}
    worker = Worker(s, tmp_path, "w8", env=env, args=["--include", "faulty_model"])
    try:
        send(s, ENCODE_TASK, batch)
        [failure] = wait_for_rows(s, "failures", 1, worker, timeout_s=120)
        assert (failure["key"], failure["etag"], failure["reason"]) == ("flat.png", flat_etag, "crashed_worker")
        assert "encoding it failed 8 times" in failure["detail"]  # in batches of 7, 3, 2 and 1 objects: 2 each
        assert "ValueError: faulty model: 1 flat image(s) in a batch of 1" in failure["detail"]
        good_keys = sorted(r.key for r in good)
        wait_until(lambda: sorted({r["key"] for r in lake_rows(s, "codes")}) == good_keys,
                   60, "every other image indexed", worker.service.proc, worker.log)
        broker = redis.Redis.from_url(s.redis_url)
        wait_until(lambda: broker.llen("hashlake") == 0 and broker.hlen("unacked") == 0, 30, "an empty queue")
        wait_until(lambda: ledger_keys(s) == [], 10, "the ledger to forget the batches")
        assert "WorkerLostError" not in worker.text()  # no process died: the errors were caught and counted
        assert worker.metrics()[("hashlake_worker_failures_total", (("reason", "crashed_worker"),))] == 1
    finally:
        worker.stop()
