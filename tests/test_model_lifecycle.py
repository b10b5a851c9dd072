"""Rollback and gc against real services: the active pointer keeps the version it replaced; a rollback
serves the previous version's codes again (twice: back where it was), and is refused without a
previous version or when its codes no longer cover the images; gc deletes only the rows of versions
neither active nor previous, and its dry run deletes nothing."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from hashlake import sql
from hashlake.catalog import ACTIVE_KEY
from hashlake.cli import app
from hashlake.lake.schema import FAILURES_SCHEMA
from hashlake.lake.writer import shared_writer
from hashlake.model_lifecycle import RollbackError, gc, plan_gc, rollback

from conftest import cli_env, lake_rows
from test_report_lake import BUCKET, T0, commit, publish

KEYS = [f"k{i:03d}" for i in range(40)]


def codes_of(version_byte: int, keys=KEYS) -> list[tuple[str, bytes, list]]:
    return [(k, bytes([version_byte, i]), ["cat"]) for i, k in enumerate(keys)]


def served(settings) -> set[tuple[str, str, bytes]]:
    con = sql.connect(settings)
    try:
        return set(con.sql("SELECT key, model, code FROM codes").fetchall())
    finally:
        con.close()


def failure(settings, version: str, key: str) -> None:
    shared_writer(settings).commit(None, pa.Table.from_pylist(
        [{"bucket": BUCKET, "key": key, "etag": "e", "version_id": None, "mtime_ns": 1, "reason": "not_an_image",
          "detail": "x", "model": version, "failed_at": T0, "batch_id": "f"}], schema=FAILURES_SCHEMA))


def test_previous_is_kept_and_rollback_serves_it_again_twice_returns(settings, store):
    catalog = publish(settings, store, "v1", "v2")
    commit(settings, "v1", codes_of(1))
    commit(settings, "v2", codes_of(2))
    catalog.activate("v1")
    assert catalog.previous() is None
    with pytest.raises(RollbackError, match="no previous model version"):
        rollback(settings)
    refused = CliRunner().invoke(app, ["model", "rollback"], env=cli_env(settings))
    assert refused.exit_code == 1 and "error: no previous model version" in refused.output

    catalog.activate("v2")
    catalog.activate("v2")  # re-activating the active version keeps the history
    assert (catalog.active(), catalog.previous()) == ("v2", "v1")
    assert {m for _, m, _ in served(settings)} == {"v2"}

    result = CliRunner().invoke(app, ["model", "rollback"], env={**cli_env(settings), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "active model is now v1 (was v2" in result.output
    assert (catalog.active(), catalog.previous()) == ("v1", "v2")
    assert served(settings) == {(k, "v1", c) for k, c, _ in codes_of(1)}

    again = rollback(settings)
    assert (again.version, again.rolled_back_from, again.codes, again.missing) == ("v2", "v1", len(KEYS), 0)
    assert (catalog.active(), catalog.previous()) == ("v2", "v1")
    assert served(settings) == {(k, "v2", c) for k, c, _ in codes_of(2)}


def test_rollback_is_refused_when_the_previous_codes_do_not_cover(settings, store):
    catalog = publish(settings, store, "v1", "v2")
    commit(settings, "v1", codes_of(1, KEYS[:30]))
    commit(settings, "v2", codes_of(2))
    catalog.activate("v1")
    catalog.activate("v2")
    result = CliRunner().invoke(app, ["model", "rollback"], env=cli_env(settings))
    assert result.exit_code == 1
    assert "no current code for 10 of the images coded under 'v2'" in result.output
    assert "hashlake model promote v1" in result.output
    assert catalog.active() == "v2"  # nothing moved
    forced = rollback(settings, force=True)
    assert (forced.version, forced.missing) == ("v1", 10) and catalog.active() == "v1"


def test_an_old_pointer_without_history_has_no_previous(settings, store):
    catalog = publish(settings, store, "v1", "v2")
    store.put(settings.index_bucket, ACTIVE_KEY, json.dumps({"version": "v1"}).encode())
    assert catalog.previous() is None and catalog.active() == "v1"
    catalog.activate("v2")
    assert json.loads(store.get(settings.index_bucket, ACTIVE_KEY)[0]) == {"version": "v2", "previous": "v1"}


def test_gc_deletes_only_versions_neither_active_nor_previous(settings, store):
    catalog = publish(settings, store, "v1", "v2", "v3", "v4")
    for i, v in enumerate(("v1", "v2", "v3", "v4"), start=1):
        commit(settings, v, codes_of(i))
        failure(settings, v, "bad.jpg")
    catalog.activate("v1")
    catalog.activate("v3")
    catalog.activate("v4")  # active v4, previous v3

    def counts() -> dict[str, tuple[int, int]]:
        codes, failures = lake_rows(settings, "codes"), lake_rows(settings, "failures")
        return {v: (sum(r["model"] == v for r in codes), sum(r["model"] == v for r in failures))
                for v in ("v1", "v2", "v3", "v4")}

    before = counts()
    assert before == {v: (len(KEYS), 1) for v in before}
    plan = plan_gc(settings)
    assert plan.keep == ("v4", "v3") and plan.delete == {"v1": (len(KEYS), 1), "v2": (len(KEYS), 1)}
    dry = CliRunner().invoke(app, ["model", "gc"], env={**cli_env(settings), "COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    assert "would delete the rows of 2 version(s)" in dry.output and "v1" in dry.output and "v2" in dry.output
    assert counts() == before  # a dry run deletes nothing

    kept = gc(settings, keep=["v2"])
    assert kept.delete == {"v1": (len(KEYS), 1)}
    result = CliRunner().invoke(app, ["model", "gc", "--yes"], env={**cli_env(settings), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "deleted the rows of 1 version(s)" in result.output
    assert counts() == {"v1": (0, 0), "v2": (0, 0), "v3": (len(KEYS), 1), "v4": (len(KEYS), 1)}
    assert set(catalog.versions()) == {"v1", "v2", "v3", "v4"}  # weights and cards stay
    assert served(settings) == {(k, "v4", c) for k, c, _ in codes_of(4)}
    nothing = CliRunner().invoke(app, ["model", "gc", "--yes"], env=cli_env(settings))
    assert nothing.exit_code == 0 and "nothing to delete" in nothing.output
