"""The local stack end to end, as `make demo` runs it, one test per way an image gets in.

One stack (redis-server, moto_server, PostgreSQL, intake, a Celery worker, Prometheus) for the module. Its
reconciler runs once at start-up and then only on demand, so each test shows that its own event
source — MinIO webhook, MinIO Redis list, reconciler — is what indexed its images.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from hashlake.local import stack
from hashlake.config import Settings
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.sql import connect, refresh
from hashlake.store import ObjectStore
from hashlake.upload import upload_all, upload_one
from workers.intake.events import minio_record, redis_access_element, webhook_body

pytestmark = pytest.mark.services
IMAGES = list(iter_images(SAMPLE, limit=60))
INDEX_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def running():
    # Not under pytest's 0700 tmp folders: run as root, the stack's PostgreSQL runs as the postgres
    # system user, which must be able to enter the stack folder.
    root = Path(tempfile.mkdtemp(prefix="hashlake-test-stack-"))
    root.chmod(0o755)
    base = Settings(stack_dir=root)
    settings = stack.up(base, stack.StackOptions(workers=1, prometheus=True, reconcile_interval_s=3600),
                        log=lambda *_: None)
    yield base, settings
    stack.down(base, log=lambda *_: None)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(running) -> ObjectStore:
    return ObjectStore(running[1])


def post_webhook(settings: Settings, records: list[dict], token: str | None = None) -> int:
    token = settings.webhook_token.get_secret_value() if token is None else token
    req = urllib.request.Request(f"http://127.0.0.1:{settings.webhook_port}/minio/events",
                                 data=webhook_body(records), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def put_records(settings: Settings, etags: dict[str, str]) -> list[dict]:
    return [minio_record("s3:ObjectCreated:Put", settings.images_bucket, key, etag=etag, size=1)
            for key, etag in etags.items()]


def wait_for(con, condition, what: str):
    """Refresh and evaluate ``condition(con)`` until it returns a truthy value."""
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while time.monotonic() < deadline:
        refresh(con)
        result = condition(con)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {INDEX_TIMEOUT_S} s waiting for {what}")


def indexed(con, keys) -> dict[str, str]:
    rows = con.execute("SELECT key, etag FROM codes WHERE list_contains(?, key)", [list(keys)]).fetchall()
    return dict(rows)


def test_stack_status_and_single_instance(running):
    base, _ = running
    rows = stack.status(base)
    assert {r.name for r, _ in rows} == {"redis", "s3", "postgres", "ray", "pushgateway", "intake", "worker0",
                                         "prometheus"}
    assert [r.name for r, healthy in rows if not healthy] == []
    with pytest.raises(Exception, match="already running"):
        stack.up(base, log=lambda *_: None)


def test_webhook_events_index_images_once_and_refuse_bad_tokens(running, store):
    _, settings = running
    etags = upload_all(store, settings.images_bucket, IMAGES[:20])
    records = put_records(settings, etags)
    assert post_webhook(settings, records, token="wrong") == 401
    assert post_webhook(settings, records) == 200
    assert post_webhook(settings, records[:5]) == 200  # MinIO retried part of it: duplicates
    con = connect(settings)
    assert wait_for(con, lambda c: indexed(c, etags) == etags, "webhook images")
    # Exactly one visible row per image, whatever the duplicates.
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM codes WHERE list_contains(?, key)",
                       [list(etags)]).fetchone() == (20, 20)
    # An image's own code is its nearest neighbour, at distance 0.
    key = IMAGES[0].name
    hits = con.execute("SELECT key, distance FROM (SELECT unnest(search_list(code, 5), recursive := true) "
                       "FROM codes WHERE key = ?)", [key]).fetchall()
    assert (key, 0) in hits and [d for _, d in hits] == sorted(d for _, d in hits)


def test_redis_list_events_index_images(running, store):
    _, settings = running
    etags = upload_all(store, settings.images_bucket, IMAGES[20:30])
    client = redis.Redis.from_url(settings.redis_url)
    for record in put_records(settings, etags):
        client.rpush(settings.events_key, redis_access_element([record]))
    con = connect(settings)
    assert wait_for(con, lambda c: indexed(c, etags) == etags, "Redis-list images")


def test_reconciler_indexes_what_no_event_announced(running, store):
    from workers.intake import reconcile_once

    _, settings = running
    etags = upload_all(store, settings.images_bucket, IMAGES[30:40])
    summary = reconcile_once(settings)
    assert summary.queued >= len(etags)
    con = connect(settings)
    assert wait_for(con, lambda c: indexed(c, etags) == etags, "reconciled images")


def test_bad_input_is_a_failure_row_and_the_rest_is_indexed(running, store):
    _, settings = running
    good = upload_all(store, settings.images_bucket, IMAGES[40:45])
    bad = {"notes.jpg": store.put(settings.images_bucket, "notes.jpg", b"hello, this is text"),
           "empty.jpg": store.put(settings.images_bucket, "empty.jpg", b"")}
    assert post_webhook(settings, put_records(settings, {**good, **bad})) == 200
    con = connect(settings)
    assert wait_for(con, lambda c: indexed(c, good) == good, "the good images")

    def failure_reasons(c):
        rows = c.execute("SELECT key, reason FROM failures WHERE list_contains(?, key)", [list(bad)]).fetchall()
        return dict(rows) if len(rows) == len(bad) else None

    assert wait_for(con, failure_reasons, "two failure rows") == {"notes.jpg": "not_an_image", "empty.jpg": "empty"}
    assert not indexed(con, bad)


def test_delete_event_hides_the_key(running, store):
    _, settings = running
    image = IMAGES[45]
    etag = upload_one(store, settings.images_bucket, image)
    assert post_webhook(settings, put_records(settings, {image.name: etag})) == 200
    con = connect(settings)
    assert wait_for(con, lambda c: indexed(c, [image.name]), "the image before its delete")
    store.delete(settings.images_bucket, image.name)
    assert post_webhook(settings, [minio_record("s3:ObjectRemoved:Delete", settings.images_bucket, image.name)]) == 200
    assert wait_for(con, lambda c: not indexed(c, [image.name]), "the key to disappear")


def test_promote_reencodes_under_the_new_version_while_the_old_one_serves(running, store):
    """Last in the module: it changes the active version."""
    from hashlake.catalog import Catalog
    from hashlake.model_versions import init_model
    from scheduler.promote import promote
    from workers.intake import reconcile_once

    _, settings = running
    etags = upload_all(store, settings.images_bucket, IMAGES[46:52])
    reconcile_once(settings)
    con = connect(settings)
    wait_for(con, lambda c: indexed(c, etags) == etags, "the images under the first version")
    catalog = Catalog(store, settings)
    first = catalog.active()
    serving = dict(con.execute("SELECT key, etag FROM codes").fetchall())
    second = init_model(settings, "lsh_effnetlite0_64", img_size=64, activate=False)

    seen_while_encoding = []

    def progress(summary) -> None:  # what a user's query saw at each staged run
        probe = connect(settings)
        seen_while_encoding.append(dict(probe.execute("SELECT key, etag FROM codes").fetchall()))
        probe.close()

    result = promote(settings, second.version, timeout_s=INDEX_TIMEOUT_S, poll_s=0.5, progress=progress)
    assert (result.previous, catalog.active()) == (first, second.version)
    assert result.runs >= 2 and all(seen == serving for seen in seen_while_encoding)  # never emptied
    after = connect(settings)
    assert dict(after.execute("SELECT key, etag FROM codes").fetchall()) == serving
    assert after.execute("SELECT DISTINCT model FROM codes").fetchall() == [(second.version,)]
    # A connection opened before the promotion moves to the new version at its next refresh, and its
    # hash_image to the new model: a stored image's own code is its nearest neighbour again.
    refresh(con)
    assert con.execute("SELECT DISTINCT model FROM codes").fetchall() == [(second.version,)]
    image = IMAGES[46]
    (key, distance), *_ = con.execute("SELECT key, distance FROM search(hash_image(?::BLOB), 1)",
                                      [image.body]).fetchall()
    assert (key, distance) == (image.name, 0)
