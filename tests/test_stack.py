"""The local stack end to end, as `make demo` runs it: stack up, upload, indexed, SQL search, stack down."""
from __future__ import annotations

import time

import pytest

from hashlake import stack
from hashlake.config import Settings
from hashlake.datasets import SAMPLE, iter_images
from hashlake.store import ObjectStore
from hashlake.upload import upload_all

pytestmark = pytest.mark.services


@pytest.fixture
def running_stack(tmp_path):
    base = Settings(stack_dir=tmp_path / "stack")
    settings = stack.up(base, stack.StackOptions(workers=1, prometheus=True, reconcile_interval_s=1.0),
                        log=lambda *_: None)
    yield base, settings
    stack.down(base, log=lambda *_: None)


def test_stack_indexes_uploads_and_answers_sql(running_stack):
    from hashlake.sql import connect

    base, settings = running_stack
    assert all(healthy for _, healthy in stack.status(base))
    with pytest.raises(Exception, match="already running"):
        stack.up(base, log=lambda *_: None)

    images = list(iter_images(SAMPLE, limit=40))
    store = ObjectStore(settings)
    etags = upload_all(store, settings.images_bucket, images)
    store.put(settings.images_bucket, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")

    con = connect(settings)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        indexed = dict(con.execute("SELECT key, etag FROM codes").fetchall())
        failed = {k for (k,) in con.execute("SELECT key FROM failures").fetchall()}
        if len(indexed) == len(etags) and "broken.jpg" in failed:
            break
        time.sleep(1)
    assert indexed == etags
    assert failed == {"broken.jpg"}

    # An indexed image's own code is its nearest neighbour at distance 0.
    first = images[0]
    rows = con.execute("SELECT key, distance FROM search((SELECT code FROM codes WHERE key = ?), 5)",
                       [first.name]).fetchall()
    assert rows[0] == (first.name, 0) or (first.name, 0) in rows
    assert len(rows) == 5 and [d for _, d in rows] == sorted(d for _, d in rows)

    stack.down(base, log=lambda *_: None)
    assert stack.status(base) == []
