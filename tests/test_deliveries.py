"""The delivery ledger against a real redis-server: starts counted, clean ends uncounted, deaths kept with
how they happened, everything forgotten once a batch is done, and a dead Redis never stops a batch."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

from hashlake.local.services import free_port
from workers.deliveries import EXPIRE_S, DeliveryLedger, History


@pytest.fixture
def ledger(redis_service) -> DeliveryLedger:
    return DeliveryLedger(redis.Redis(port=redis_service.port, db=3))


def test_deaths_are_the_starts_that_never_finished(ledger):
    batch_id = uuid.uuid4().hex[:24]
    assert ledger.start(batch_id) == History(0)  # first delivery
    ledger.finish(batch_id, done=False)  # a Celery retry: it will come again, nothing died
    assert ledger.start(batch_id) == History(0)
    # ... and this child dies: no finish. Its node notes how; the next delivery sees one death.
    ledger.note(batch_id, "exit", "Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.")
    second = ledger.start(batch_id)
    assert second.unfinished == 1 and "SIGSEGV" in second.describe()
    ledger.note(batch_id, "cause", "MemoryError in pool process 42")  # this one dies too, knowing why
    third = ledger.start(batch_id)
    assert third == History(2, "Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.", "MemoryError in pool process 42")
    assert third.describe() == "Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.; MemoryError in pool process 42"
    assert 0 < ledger.client.ttl(ledger.key(batch_id)) <= EXPIRE_S
    ledger.finish(batch_id, done=True)  # split or recorded: done for good
    assert not ledger.client.exists(ledger.key(batch_id))
    assert ledger.start(batch_id) == History(0)


def test_a_duplicate_finishing_in_between_never_counts_below_zero(ledger):
    batch_id = uuid.uuid4().hex[:24]
    ledger.start(batch_id)
    ledger.start(batch_id)  # a duplicate delivery, running at the same time
    ledger.finish(batch_id, done=True)
    ledger.finish(batch_id, done=False)
    assert ledger.start(batch_id) == History(0)


def test_no_death_recorded_reads_as_such():
    assert "no exit status recorded" in History(2).describe()


def test_notes_expire_and_unknown_fields_are_refused(ledger):
    batch_id = uuid.uuid4().hex[:24]
    ledger.note(batch_id, "exit", "Worker exited prematurely: exitcode 12 Job: 1.")  # the hash may not exist yet
    assert 0 < ledger.client.ttl(ledger.key(batch_id)) <= EXPIRE_S
    with pytest.raises(ValueError, match="unknown ledger field"):
        ledger.note(batch_id, "unfinished", "0")


def test_a_dead_redis_never_stops_a_batch(settings, caplog):
    dead = DeliveryLedger.for_settings(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    started = time.monotonic()
    assert dead.start("b") == History(0)  # the batch runs, unguarded
    dead.finish("b", done=True)
    dead.note("b", "exit", "signal 9")
    assert caplog.text.count("delivery ledger unavailable") == 3
    assert time.monotonic() - started < 3.0  # fails fast: a refused connection, one retry
