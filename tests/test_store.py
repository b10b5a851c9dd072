"""The object store face: round trips, the missing/unavailable split, whole writes."""
import pytest

from hashlake.config import Settings
from hashlake.store import ObjectMissing, ObjectStore, StoreUnavailable
from hashlake.local.services import free_port


def test_put_get_list_roundtrip(store, settings):
    etag = store.put(settings.images_bucket, "a/b c.jpg", b"hello", metadata={"labels": "cat"})
    body, info = store.get(settings.images_bucket, "a/b c.jpg")
    assert body == b"hello" and info.etag == etag and info.size == 5
    assert info.metadata["labels"] == "cat"
    assert [o.key for o in store.list(settings.images_bucket)] == ["a/b c.jpg"]


def test_missing_object_is_object_missing(store, settings):
    with pytest.raises(ObjectMissing, match="nope.jpg"):
        store.get(settings.images_bucket, "nope.jpg")


def test_dead_server_is_unavailable(tmp_path):
    dead = Settings(s3_endpoint=f"http://127.0.0.1:{free_port()}", stack_dir=tmp_path)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        ObjectStore(dead, timeout_s=0.5, retries=0).get("images", "x.jpg")


def test_put_writes_one_object_and_replaces_it_whole(store, settings):
    """Shards are written with a plain PUT: the listing shows the final name only, and a rewrite (a
    retried batch) replaces the object, with a new etag."""
    first = store.put(settings.index_bucket, "codes/v1/abc.parquet", b"PAR1 first")
    second = store.put(settings.index_bucket, "codes/v1/abc.parquet", b"PAR1 second")
    listed = list(store.list(settings.index_bucket, "codes/"))
    assert [(o.key, o.etag) for o in listed] == [("codes/v1/abc.parquet", second)] and first != second
    assert store.get(settings.index_bucket, "codes/v1/abc.parquet")[0] == b"PAR1 second"
