"""Event intake: MinIO event parsing, webhook, Redis-list consumer, batcher and reconciler, on real Redis and S3."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import SecretStr

from conftest import WEBHOOK_TOKEN, cli_env
from hashlake.catalog import ModelNotFound
from hashlake.local.services import free_port, start_redis
from hashlake.lake import init_lake
from hashlake.lake.schema import CODES_SCHEMA, FAILURES_SCHEMA, epoch_ns
from hashlake.lake.writer import shared_writer
from workers.intake import reconcile_once, run_intake
from workers.intake.batcher import Batcher
from workers.intake.events import MalformedEvent, ObjectEvent, parse_access_element, parse_webhook_body
from workers.intake.pending import IntakeKeys, claim_many, decode_entry, encode_entry, intake_redis, read_dead_letters
from workers.intake.reconciler import Reconciler, open_reconciler
from workers.intake.redis_source import RedisListConsumer
from workers.intake.sender import BatchSender, task_queue_names
from workers.intake.webhook import MAX_BODY_BYTES, WEBHOOK_PATH, WeakWebhookToken, create_webhook_app
from workers.messages import ENCODE_TASK, TOMBSTONE_TASK, ObjectRef, batch_id_for

EVENTS = Path(__file__).resolve().parents[2] / "shared" / "events"
AUTH = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
INTAKE_DB = 11  # a Redis db of these tests' own: the Celery queue list in it holds only what they sent


def sample(name: str) -> bytes:
    path = EVENTS / name
    if not path.exists():
        pytest.skip(f"MinIO event sample {path} not found (it lives in ../shared/events)")
    return path.read_bytes()


def record(name="s3:ObjectCreated:Put", key="a%2Fb.jpg", etag="e1", bucket="images", size=10):
    obj = {"key": key, "size": size, "eTag": etag} if etag is not None else {"key": key}
    return {"eventName": name, "eventTime": "2026-11-22T17:41:54.120Z", "s3": {"bucket": {"name": bucket},
                                                                               "object": obj}}


def sent_tasks(client: redis.Redis, queue: str) -> list[tuple[str, dict]]:
    """(task name, batch JSON) of the Celery messages waiting in ``queue``, oldest first.
    Kombu's Redis transport LPUSHes a JSON envelope whose body is the base64 of [args, kwargs, embed]."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], args[0]))
    return out


@pytest.fixture
def intake_settings(settings):
    """The test's settings on a Redis db flushed for it."""
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{INTAKE_DB}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


@pytest.fixture
def event_settings(intake_settings):
    """For the event tests: the samples' bucket is "images" (the reconciler tests keep the per-test bucket)."""
    return intake_settings.model_copy(update={"images_bucket": "images"})


@pytest.fixture
def client(intake_settings):
    c = intake_redis(intake_settings)
    yield c
    c.close()


@pytest.fixture
def keys(intake_settings):
    return IntakeKeys.for_settings(intake_settings)


@pytest.fixture
def queue(intake_settings):
    (name,) = task_queue_names(intake_settings)
    return name


@pytest.fixture
def sender(intake_settings):
    s = BatchSender(intake_settings)
    yield s
    s.close()


def pending_refs(client, keys) -> list[tuple[str, str, str, str]]:
    return [(e["kind"], e["ref"]["bucket"], e["ref"]["key"], e["ref"]["etag"])
            for e in map(json.loads, client.lrange(keys.pending, 0, -1))]


# -- parsing ----------------------------------------------------------------------------------------
def test_events_carry_their_order_and_version():
    put = parse_webhook_body(sample("webhook-put.json")).events[0].ref
    assert put.mtime_ns == 0x187A2C3D4F1B2A40  # MinIO's sequencer: nanoseconds, increasing per key
    plain = record()
    (event,) = parse_webhook_body(json.dumps({"Records": [plain]}).encode()).events
    assert event.ref.mtime_ns == 1_795_369_314_120_000_000  # no sequencer: eventTime, to the millisecond
    version_delete = record(name="s3:ObjectRemoved:Delete", etag=None)
    version_delete["s3"]["object"]["versionId"] = "3f2a-v1"
    marker = record(name="s3:ObjectRemoved:DeleteMarkerCreated", etag=None)
    marker["s3"]["object"]["versionId"] = "marker-9"
    unversioned = record(name="s3:ObjectRemoved:Delete", etag=None)
    unversioned["s3"]["object"]["versionId"] = "null"
    refs = [e.ref for e in parse_webhook_body(json.dumps({"Records": [version_delete, marker, unversioned]}).encode()).events]
    assert [r.version_id for r in refs] == ["3f2a-v1", None, None]  # a marker deletes the key, not one version
    bad = record()
    bad["s3"]["object"]["sequencer"] = "not-hex"
    assert "sequencer 'not-hex' is not hexadecimal" in parse_webhook_body(json.dumps({"Records": [bad]}).encode()).errors[0]


def test_samples_parse_to_decoded_keys():
    put = parse_webhook_body(sample("webhook-put.json"))
    assert not put.errors and [(e.kind, e.ref.bucket, e.ref.key, e.ref.etag, e.ref.size) for e in put.events] == [
        ("encode", "images", "cats/tabby 01.jpg", "9b2cf535f27731c974343645a3985328", 2417)]
    delete = parse_webhook_body(sample("webhook-delete.json"))
    assert [(e.kind, e.ref.key, e.ref.etag, e.ref.event_time) for e in delete.events] == [
        ("delete", "cats/tabby 01.jpg", "", "2026-11-22T17:45:02.004Z")]
    access = parse_access_element(sample("redis-access-put.json"))
    assert [(e.kind, e.ref.key) for e in access.events] == [("encode", "cats/tabby 01.jpg")]


def test_malformed_records_are_named_and_the_rest_kept():
    body = json.dumps({"Records": [record(key="ok.jpg"), {"eventName": "s3:ObjectCreated:Put"},
                                   record(name="s3:ObjectAccessed:Get"), record(size="big"), "x"]})
    parsed = parse_webhook_body(body.encode())
    assert [e.ref.key for e in parsed.events] == ["ok.jpg"] and parsed.ignored == 1
    assert len(parsed.errors) == 3
    assert "Records[1]" in parsed.errors[0] and "s3 is missing" in parsed.errors[0]
    assert "Records[3]: s3.object.size must be int, got str" == parsed.errors[1]
    assert "Records[4]" in parsed.errors[2]
    with pytest.raises(MalformedEvent, match="not JSON"):
        parse_webhook_body(b"{nope")
    with pytest.raises(MalformedEvent, match="no 'Records' list"):
        parse_webhook_body(b'{"EventName": "s3:ObjectCreated:Put"}')
    with pytest.raises(MalformedEvent, match="JSON array"):
        parse_access_element(b'{"Event": []}')


# -- webhook ----------------------------------------------------------------------------------------
@pytest.fixture
def webhook(event_settings, client, keys):
    with TestClient(create_webhook_app(event_settings, client, keys)) as http:
        yield http


def test_webhook_requires_the_bearer_token(webhook, client, keys):
    body = sample("webhook-put.json")
    missing = webhook.post(WEBHOOK_PATH, content=body)
    wrong = webhook.post(WEBHOOK_PATH, content=body, headers={"Authorization": "Bearer nope"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "no Authorization header" in missing.json()["detail"] and "wrong bearer token" in wrong.json()["detail"]
    assert client.llen(keys.pending) == 0


@pytest.mark.parametrize("token, problem", [("", "is empty"), ("   ", "is empty"), ("change-me", "is the default"),
                                            ("fifteen-chars15", "has 15 characters")])
def test_the_intake_refuses_to_start_with_a_token_anyone_could_guess(event_settings, client, keys, token, problem):
    weak = event_settings.model_copy(update={"webhook_token": SecretStr(token)})
    for start in (lambda: create_webhook_app(weak, client, keys),
                  lambda: run_intake(weak, stop=threading.Event(), metrics_port=0)):
        with pytest.raises(WeakWebhookToken) as refused:
            start()
        message = str(refused.value)
        assert f"(HASHLAKE_WEBHOOK_TOKEN) {problem}" in message and "at least 16 characters" in message
        assert "set HASHLAKE_WEBHOOK_TOKEN=" in message and "secrets.token_urlsafe" in message
    # 16 characters is enough; the conftest's token is longer than that.
    create_webhook_app(event_settings.model_copy(update={"webhook_token": SecretStr("x" * 16)}), client, keys)
    assert len(WEBHOOK_TOKEN) >= 16


def test_webhook_queues_samples_and_multi_record_bodies(webhook, client, keys):
    assert webhook.post(WEBHOOK_PATH, content=sample("webhook-put.json"), headers=AUTH).json() == {
        "queued": 1, "ignored": 0}
    assert webhook.post(WEBHOOK_PATH, content=sample("webhook-delete.json"), headers=AUTH).status_code == 200
    three = {"Records": [record(key="x%2By+z.jpg"), record(key="dir%2Fsub%2Fq.png", etag="e2"),
                         record(name="s3:ObjectRemoved:DeleteMarkerCreated", key="old.jpg", etag=None)]}
    assert webhook.post(WEBHOOK_PATH, json=three, headers=AUTH).json()["queued"] == 3
    assert pending_refs(client, keys) == [
        ("encode", "images", "cats/tabby 01.jpg", "9b2cf535f27731c974343645a3985328"),
        ("delete", "images", "cats/tabby 01.jpg", ""),
        ("encode", "images", "x+y z.jpg", "e1"),  # '%2B' is a literal '+', a bare '+' a space
        ("encode", "images", "dir/sub/q.png", "e2"),
        ("delete", "images", "old.jpg", ""),
    ]


def test_webhook_ignores_other_event_types_and_buckets(webhook, client, keys):
    body = {"Records": [record(name="s3:ObjectAccessed:Get"), record(bucket="hashlake"), record(key="mine.jpg")]}
    assert webhook.post(WEBHOOK_PATH, json=body, headers=AUTH).json() == {"queued": 1, "ignored": 2}
    assert [r[2] for r in pending_refs(client, keys)] == ["mine.jpg"]


def test_webhook_malformed_bodies_are_dead_lettered_and_answered_2xx(webhook, client, keys, event_settings):
    """MinIO retries every non-2xx answer for ever: a bad record must not make it loop (re-queueing the
    valid records of its body each time). The valid records are queued, the body kept for a person."""
    bad_json = webhook.post(WEBHOOK_PATH, content=b'{"Records": [', headers=AUTH)
    assert bad_json.status_code == 200 and bad_json.json()["queued"] == 0 and bad_json.json()["dead_lettered"] == 1
    assert "not JSON" in bad_json.json()["errors"][0]
    mixed = webhook.post(WEBHOOK_PATH, json={"Records": [record(key="good.jpg"), record(etag=5)]}, headers=AUTH)
    assert mixed.status_code == 200
    assert mixed.json() == {"queued": 1, "ignored": 0, "dead_lettered": 1,
                            "errors": ["Records[1]: s3.object.eTag must be str, got int"]}
    huge = webhook.post(WEBHOOK_PATH, content=b"x" * (MAX_BODY_BYTES + 1), headers=AUTH)
    assert huge.status_code == 200 and huge.json()["dead_lettered"] == 1
    assert [r[2] for r in pending_refs(client, keys)] == ["good.jpg"]

    total, letters = read_dead_letters(client, keys)
    assert total == 3 and [letter.source for letter in letters] == ["webhook"] * 3
    assert letters[0].element == '{"Records": [' and "not JSON" in letters[0].reason
    assert letters[1].reason == "Records[1]: s3.object.eTag must be str, got int (1 valid records were queued)"
    assert '"eTag": 5' in letters[1].element.replace('"eTag":5', '"eTag": 5')
    assert len(letters[2].element) == 64 * 1024 and f"over {MAX_BODY_BYTES}" in letters[2].reason
    assert read_dead_letters(client, keys, limit=1) == (3, letters[2:])
    assert REGISTRY.get_sample_value("hashlake_intake_dead_lettered_total", {"source": "webhook"}) >= 3

    # `hashlake intake dead-letters` reads them, newest last, and says how many there are.
    out = subprocess.run([sys.executable, "-m", "hashlake.cli", "intake", "dead-letters", "--limit", "2"],
                         env={**os.environ, **cli_env(event_settings), "COLUMNS": "200"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "s3.object.eTag must be str, got int" in out.stdout and "not JSON" not in out.stdout
    assert f"2 of 3 dead letters in {keys.dead}" in out.stdout


def test_webhook_dead_broker_is_503_and_nothing_lost_after_restart(event_settings, tmp_path):
    port = free_port()
    broker = start_redis(port, tmp_path / "redis")
    own = event_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    keys, client = IntakeKeys.for_settings(own), intake_redis(own)
    try:
        with TestClient(create_webhook_app(own, client, keys)) as http:
            assert http.post(WEBHOOK_PATH, json={"Records": [record(key="first.jpg")]}, headers=AUTH).status_code == 200
            broker.stop()
            started = time.monotonic()
            down = http.post(WEBHOOK_PATH, content=sample("webhook-put.json"), headers=AUTH)
            assert down.status_code == 503 and down.headers["Retry-After"]
            assert time.monotonic() - started < 3  # MinIO is still waiting: fail fast
            broker = start_redis(port, tmp_path / "redis")  # same dir: the append-only file comes back
            # MinIO retries the refused event until it gets a 2xx.
            assert http.post(WEBHOOK_PATH, content=sample("webhook-put.json"), headers=AUTH).status_code == 200
        assert [r[2] for r in pending_refs(client, keys)] == ["first.jpg", "cats/tabby 01.jpg"]
    finally:
        client.close()
        broker.stop()


# -- Redis-list consumer ----------------------------------------------------------------------------
def test_redis_consumer_hands_events_on_and_dead_letters_malformed(client, keys):
    client.rpush(keys.events, sample("redis-access-put.json"), b"not json",
                 json.dumps([{"Event": [record(key="ok.jpg"), record(size=-1)]}]))
    consumer = RedisListConsumer(client, keys, "images")
    while consumer.step(0):
        pass
    assert [r[2] for r in pending_refs(client, keys)] == ["cats/tabby 01.jpg", "ok.jpg"]
    dead = [json.loads(d) for d in client.lrange(keys.dead, 0, -1)]
    assert [d["element"] for d in dead][0] == "not json" and "not JSON" in dead[0]["reason"]
    assert "[0].Event[1]: s3.object.size must be >= 0" in dead[1]["reason"] and "1 valid records" in dead[1]["reason"]
    assert client.llen(keys.events) == client.llen(keys.events_processing) == 0


def test_redis_consumer_crash_between_claim_and_enqueue_redelivers(client, keys):
    client.rpush(keys.events, sample("redis-access-put.json"))
    crashed = RedisListConsumer(client, keys, "images")
    crashed.recover()
    assert crashed.claim(0) is not None  # claimed ... and the process dies here
    assert client.llen(keys.events) == 0 and client.llen(keys.pending) == 0
    restarted = RedisListConsumer(client, keys, "images")
    assert restarted.step(0) is True  # start-up gives the claimed element back, then hands it on
    assert [r[2] for r in pending_refs(client, keys)] == ["cats/tabby 01.jpg"]
    assert client.llen(keys.events_processing) == 0


# -- batcher ----------------------------------------------------------------------------------------
def push_events(client, keys, *records_):
    consumer = RedisListConsumer(client, keys, "images")
    client.rpush(keys.events, json.dumps([{"Event": list(records_)}]))
    consumer.step(0)


def test_batcher_respects_batch_size_and_dedups(client, keys, sender, queue):
    push_events(client, keys, *[record(key=f"k{i}.jpg") for i in range(7)], record(key="k0.jpg"),
                record(name="s3:ObjectRemoved:Delete", key="gone.jpg", etag=None))
    batcher = Batcher(client, keys, sender, batch_size=3, window_ms=60_000)
    for _ in range(4):
        batcher.step()
    tasks = sent_tasks(client, queue)
    assert [(name, [o["key"] for o in b["objects"]]) for name, b in tasks] == [
        (ENCODE_TASK, ["k0.jpg", "k1.jpg", "k2.jpg"]), (ENCODE_TASK, ["k3.jpg", "k4.jpg", "k5.jpg"])]
    assert tasks[0][1]["batch_id"] == batch_id_for([("images", f"k{i}.jpg", "e1") for i in range(3)])
    # k6 + the duplicate k0 (a new batch: k0 was already sent) and the delete wait for the window.
    assert {k: len(b.refs) for k, b in batcher.open.items()} == {("encode", None): 2, ("delete", None): 1}
    batcher.flush()
    names = [name for name, _ in sent_tasks(client, queue)]
    assert names.count(TOMBSTONE_TASK) == 1 and len(names) == 4
    assert client.llen(keys.pending) == client.llen(keys.pending_processing) == 0


def test_claim_many_moves_the_oldest_in_order(client, keys):
    client.rpush(keys.pending, *[b"e%d" % i for i in range(5)])
    client.rpush(keys.pending_processing, b"held")
    assert claim_many(client, keys.pending, keys.pending_processing, 3) == [b"e0", b"e1", b"e2"]
    assert client.lrange(keys.pending, 0, -1) == [b"e3", b"e4"]
    assert client.lrange(keys.pending_processing, 0, -1) == [b"held", b"e0", b"e1", b"e2"]
    assert claim_many(client, keys.pending, keys.pending_processing, 10) == [b"e3", b"e4"]
    assert claim_many(client, keys.pending, keys.pending_processing, 10) == []


def test_batcher_claims_nothing_past_a_full_batch(client, keys, sender, queue):
    push_events(client, keys, *[record(key=f"k{i:02d}.jpg") for i in range(70)])
    batcher = Batcher(client, keys, sender, batch_size=32, window_ms=60_000)
    batcher.step()
    ((_, batch),) = sent_tasks(client, queue)
    assert [o["key"] for o in batch["objects"]] == [f"k{i:02d}.jpg" for i in range(32)]
    assert client.llen(keys.pending) == 38 and client.llen(keys.pending_processing) == 0 and not batcher.open


def test_batcher_sends_after_the_window(client, keys, sender, queue):
    batcher = Batcher(client, keys, sender, batch_size=100, window_ms=300)
    push_events(client, keys, record(key="a.jpg"), record(key="a.jpg"))  # same object twice
    started = time.monotonic()
    batcher.step()
    assert sent_tasks(client, queue) == [] and batcher.open
    while not sent_tasks(client, queue):
        batcher.step()
    waited = time.monotonic() - started
    assert 0.25 <= waited < 1.5
    ((_, batch),) = sent_tasks(client, queue)
    assert [o["key"] for o in batch["objects"]] == ["a.jpg"]  # no re-enqueue within the batch


def test_batcher_keeps_entries_until_the_broker_confirms(intake_settings, client, keys, queue, tmp_path):
    dead = intake_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    push_events(client, keys, record(key="a.jpg"), record(key="b.jpg"))
    broken = BatchSender(dead)  # publishes to a broker that is not there
    batcher = Batcher(client, keys, broken, batch_size=2, window_ms=60_000)
    started = time.monotonic()
    with pytest.raises(Exception, match="Connection refused|Error 111"):
        batcher.step()
    assert time.monotonic() - started < 3
    assert client.llen(keys.pending_processing) == 2  # still claimed, not lost
    broken.close()
    # The process dies here; the next batcher gives the claimed entries back and sends them.
    with_broker = BatchSender(intake_settings)
    Batcher(client, keys, with_broker, batch_size=2, window_ms=60_000).step()
    with_broker.close()
    ((_, batch),) = sent_tasks(client, queue)
    assert sorted(o["key"] for o in batch["objects"]) == ["a.jpg", "b.jpg"]
    assert client.llen(keys.pending_processing) == 0


def test_malformed_pending_entry_is_dead_lettered(client, keys, sender, queue):
    client.rpush(keys.pending, b'{"kind": "encode"}')
    push_events(client, keys, record(key="a.jpg"))
    Batcher(client, keys, sender, batch_size=1, window_ms=60_000).step()
    assert [o["key"] for _, b in sent_tasks(client, queue) for o in b["objects"]] == ["a.jpg"]
    (dead,) = [json.loads(d) for d in client.lrange(keys.dead, 0, -1)]
    assert dead["source"] == "pending" and "not a hashlake intake entry" in dead["reason"]


# -- reconciler -------------------------------------------------------------------------------------
def write_codes(settings, version, infos):
    """Commit code rows for listed objects (``ObjectInfo``), ordered as the listing orders them."""
    init_lake(settings)
    now = datetime.now(timezone.utc)
    shared_writer(settings).commit(pa.Table.from_pylist(
        [{"bucket": i.bucket, "key": i.key, "etag": i.etag, "version_id": None, "size": i.size,
          "last_modified": i.last_modified, "mtime_ns": epoch_ns(i.last_modified), "code": bytes(8), "model": version,
          "encoded_at": now, "labels": [], "batch_id": "b"} for i in infos], schema=CODES_SCHEMA), None)


def write_failure(settings, version, info, reason="not_an_image"):
    init_lake(settings)
    shared_writer(settings).commit(None, pa.Table.from_pylist(
        [{"bucket": info.bucket, "key": info.key, "etag": info.etag, "version_id": None,
          "mtime_ns": epoch_ns(info.last_modified), "reason": reason, "detail": "x", "model": version,
          "failed_at": datetime.now(timezone.utc), "batch_id": "f"}], schema=FAILURES_SCHEMA))


def test_reconcile_without_a_model_says_so(intake_settings, store):
    with pytest.raises(ModelNotFound, match="no active model.*hashlake model init"):
        reconcile_once(intake_settings)


def test_reconciler_queues_unindexed_and_deletes_vanished(intake_settings, store, client, keys, queue):
    # Pinned version; a short re-queue delay so the re-queue rule can be seen within the test.
    settings = intake_settings.model_copy(update={"model_version": "v1", "reconcile_requeue_s": 5.0})
    bucket = settings.images_bucket
    for key in ("indexed/a.jpg", "indexed/b.jpg", "new/c.jpg", "changed.jpg", "broken.jpg", "gone.jpg",
                "deleted-later.jpg", "vanished.jpg"):
        store.put(bucket, key, key.encode())
    infos = {o.key: o for o in store.list(bucket)}
    write_codes(settings, "v1", [infos[k] for k in ("indexed/a.jpg", "indexed/b.jpg", "deleted-later.jpg")])
    write_codes(settings, "v1", [replace(infos["changed.jpg"], etag="old-etag")])  # overwritten since
    write_codes(settings, "v0", [infos["new/c.jpg"]])  # another model version does not count
    write_failure(settings, "v1", infos["broken.jpg"])
    write_failure(settings, "v1", infos["vanished.jpg"], reason="missing")  # missing once: not settled
    # An indexed object deleted from the bucket (its event lost), and one deleted and already deleted in the lake.
    write_codes(settings, "v1", [infos["gone.jpg"]])
    tombstone = ObjectRef(bucket, "gone.jpg", mtime_ns=epoch_ns(datetime.now(timezone.utc)))
    from workers.encode.runner import tombstone_batch
    from workers.messages import Batch
    tombstone_batch(Batch("delete", (tombstone,)), settings)
    store.delete(bucket, "gone.jpg")
    store.delete(bucket, "deleted-later.jpg")

    reconciler = Reconciler(settings, store, client, keys, [queue])
    summary = reconciler.run_once()
    first_queued = time.monotonic()
    assert (summary.model_version, summary.listed, summary.indexed, summary.failed, summary.missing,
            summary.queued, summary.deleted) == ("v1", 6, 2, 1, 3, 3, 1)
    assert summary.batcher_alive is False and summary.pending == 4
    assert sorted(pending_refs(client, keys)) == [
        ("delete", bucket, "deleted-later.jpg", infos["deleted-later.jpg"].etag),
        ("encode", bucket, "changed.jpg", infos["changed.jpg"].etag),
        ("encode", bucket, "new/c.jpg", infos["new/c.jpg"].etag),
        ("encode", bucket, "vanished.jpg", infos["vanished.jpg"].etag)]

    # A second run right after does not queue what it queued a moment ago.
    again = reconciler.run_once()
    assert (again.queued, again.deleted, again.skipped_recent) == (0, 0, 4)
    # Once encoded, the object is indexed and forgotten.
    write_codes(settings, "v1", [infos["new/c.jpg"]])
    third = reconciler.run_once()
    assert (third.indexed, third.skipped_recent) == (3, 3)
    # Still missing after the re-queue delay: those tasks were lost; queued again though the queue is full.
    time.sleep(max(0.0, first_queued + settings.reconcile_requeue_s + 0.2 - time.monotonic()))
    assert client.llen(keys.pending) > 0
    fourth = reconciler.run_once()
    assert (fourth.queued, fourth.deleted, fourth.skipped_recent) == (2, 1, 0)


def test_a_pass_queues_at_most_its_bound_and_the_next_passes_take_the_rest(intake_settings, store, client, keys):
    settings = intake_settings.model_copy(update={"model_version": "v1", "reconcile_max_per_pass": 2})
    for i in range(5):
        store.put(settings.images_bucket, f"img{i}.jpg", b"x%d" % i)
    init_lake(settings)
    with open_reconciler(settings) as reconciler:
        queued = [reconciler.run_once().queued for _ in range(4)]
    assert queued == [2, 2, 1, 0]
    assert len({r[2] for r in pending_refs(client, keys)}) == 5


def test_reconciled_objects_flow_through_the_batcher(intake_settings, store, client, keys, sender, queue):
    settings = intake_settings.model_copy(update={"model_version": "v1"})
    for i in range(5):
        store.put(settings.images_bucket, f"img{i}.jpg", b"x%d" % i)
    init_lake(settings)
    summary = reconcile_once(settings)
    assert summary.queued == 5 and summary.skipped_recent == 0
    batcher = Batcher(client, keys, sender, batch_size=4, window_ms=50)
    while len(sent_tasks(client, queue)) < 2:
        batcher.step()
    assert [len(b["objects"]) for _, b in sent_tasks(client, queue)] == [4, 1]
    assert reconcile_once(settings).skipped_recent == 5  # queued a moment ago: not again
    assert reconcile_once(settings, force=True).queued == 5


def test_staged_runs_queue_encodes_for_their_version_beside_the_active_runs(intake_settings, store, client, keys,
                                                                           sender, queue):
    settings = intake_settings.model_copy(update={"model_version": "v1"})
    bucket = settings.images_bucket
    for i in range(3):
        store.put(bucket, f"img{i}.jpg", b"x%d" % i)
    write_codes(settings, "v2", [next(o for o in store.list(bucket) if o.key == "img0.jpg")])  # encoded under v2
    with open_reconciler(settings) as reconciler:
        active, staged = reconciler.run_once(), reconciler.run_once(version="v2")
    assert (active.model_version, active.indexed, active.queued) == ("v1", 0, 3)
    assert (staged.model_version, staged.indexed, staged.queued) == ("v2", 1, 2)
    batcher = Batcher(client, keys, sender, batch_size=10, window_ms=50)
    while len(sent_tasks(client, queue)) < 2:
        batcher.step()
    sent = {b["model_version"]: sorted(o["key"] for o in b["objects"]) for _, b in sent_tasks(client, queue)}
    assert sent == {None: ["img0.jpg", "img1.jpg", "img2.jpg"], "v2": ["img1.jpg", "img2.jpg"]}
    # Each kind of run remembers what it queued: neither forgets the other's and queues it again.
    with open_reconciler(settings) as reconciler:
        assert reconciler.run_once(version="v2").skipped_recent == 2
        assert reconciler.run_once().skipped_recent == 3


def test_a_pending_entry_naming_a_version_must_be_an_encode():
    ref = ObjectRef("images", "a.jpg", "e1")
    assert decode_entry(encode_entry(ObjectEvent("encode", ref, "v2"), "reconciler")) == (
        ObjectEvent("encode", ref, "v2"), "reconciler")
    with pytest.raises(MalformedEvent, match="model_version 'v2' on a 'delete' entry"):
        decode_entry(encode_entry(ObjectEvent("delete", ref, "v2"), "reconciler"))


def test_redis_consumer_backs_off_while_redis_is_down_and_resumes(intake_settings, tmp_path):
    def errors() -> float:
        return REGISTRY.get_sample_value("hashlake_intake_broker_errors_total", {"component": "redis_consumer"}) or 0

    port = free_port()
    broker = start_redis(port, tmp_path / "redis")
    own = intake_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    keys, client = IntakeKeys.for_settings(own), intake_redis(own)
    stop = threading.Event()
    consumer = threading.Thread(target=RedisListConsumer(client, keys, "images").run, args=(stop,))
    errors_before = errors()
    try:
        consumer.start()
        broker.stop()
        time.sleep(1.0)
        assert consumer.is_alive() and errors() > errors_before  # it failed, backs off, keeps going
        broker = start_redis(port, tmp_path / "redis")
        client.rpush(keys.events, sample("redis-access-put.json"))
        deadline = time.monotonic() + 10
        while client.llen(keys.pending) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r[2] for r in pending_refs(client, keys)] == ["cats/tabby 01.jpg"]
    finally:
        stop.set()
        consumer.join(10)
        client.close()
        broker.stop()


def test_event_builders_match_the_minio_samples_and_the_parsers():
    """The builders that stand in for MinIO (stack tests, ingest benchmark) produce what the parsers read,
    in the shape of the shared samples."""
    from workers.intake.events import (minio_record, parse_access_element, parse_webhook_body,
                                       redis_access_element, webhook_body)

    if not EVENTS.exists():
        pytest.skip(f"MinIO event samples not found in {EVENTS}")
    put = minio_record("s3:ObjectCreated:Put", "images", "cats/tabby 01.jpg", etag="9b2c", size=2417)
    sample = json.loads((EVENTS / "webhook-put.json").read_text())["Records"][0]
    assert put["s3"]["object"]["key"] == sample["s3"]["object"]["key"] == "cats%2Ftabby+01.jpg"
    assert set(put) <= set(sample)
    (event,) = parse_webhook_body(webhook_body([put])).events
    assert (event.kind, event.ref.key, event.ref.etag, event.ref.size) == ("encode", "cats/tabby 01.jpg", "9b2c", 2417)
    delete = minio_record("s3:ObjectRemoved:Delete", "images", "a+b c.jpg")
    (event,) = parse_access_element(redis_access_element([delete])).events
    assert (event.kind, event.ref.key, event.ref.etag) == ("delete", "a+b c.jpg", "")
