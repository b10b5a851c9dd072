"""hashlake report over a real lake (PostgreSQL catalog, files on moto_server): version_report's figures
equal hashing_models.evaluate's on the same current, labelled codes in (bucket, key) order; the split
rule in SQL equals split_of; compare_versions keeps the images coded under every version; the CLI
prints the table, writes report.md with its PNG and names what is missing."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from hashing_models.evaluate import evaluate_retrieval
from hashlake.catalog import Catalog, ModelCard
from hashlake.cli import app
from hashlake.lake import init_lake
from hashlake.lake.schema import CODES_SCHEMA, DELETES_SCHEMA, epoch_ns
from hashlake.lake.writer import shared_writer
from hashlake.report import multi_hot
from hashlake.report_lake import ReportError, compare_versions, version_report
from hashlake.splits import split_of, split_sql

from conftest import cli_env
from test_report import assert_same_metrics

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
BUCKET = "images"
CLASSES = ["airplane", "bird", "cat", "dog", "frog"]


def commit(settings, version: str, rows: list[tuple[str, bytes, list | None]], minutes: int = 1) -> None:
    """Codes rows (key, code, labels) of ``version`` as one encode batch; etag = f(key, minutes)."""
    when = T0 + timedelta(minutes=minutes)
    table = [{"bucket": BUCKET, "key": k, "etag": f"e-{k}-{minutes}", "version_id": None, "size": 10,
              "last_modified": when, "mtime_ns": epoch_ns(when), "code": code, "model": version,
              "encoded_at": T0 + timedelta(hours=1), "labels": labels, "batch_id": "b"} for k, code, labels in rows]
    init_lake(settings)
    shared_writer(settings).commit(pa.Table.from_pylist(table, schema=CODES_SCHEMA), None)


def delete(settings, key: str, minutes: int) -> None:
    when = T0 + timedelta(minutes=minutes)
    shared_writer(settings).commit_deletes(pa.Table.from_pylist(
        [{"bucket": BUCKET, "key": key, "version_id": None, "etag": None, "mtime_ns": epoch_ns(when),
          "deleted_at": when, "batch_id": "d"}], schema=DELETES_SCHEMA))


def publish(settings, store, *versions: str) -> Catalog:
    catalog = Catalog(store, settings)
    for v in versions:
        catalog.publish(ModelCard(version=v, arch="lsh_effnetlite0_64", method="lsh", backbone="effnetlite0",
                                  bits=16, input_size=64, description=v), {"w": torch.zeros(1)})
    return catalog


def dataset(n: int = 1500, seed: int = 0):
    """keys → (16-bit code, labels): heavy ties; one, two or no labels (None and [])."""
    rng = np.random.default_rng(seed)
    data = {}
    for i in range(n):
        key = f"img/{i:05d}.jpg"
        r = rng.random()
        labels = (None if r < 0.05 else [] if r < 0.08 else
                  list(rng.choice(CLASSES, 2, replace=False)) if r < 0.3 else [str(rng.choice(CLASSES))])
        data[key] = (rng.integers(0, 256, 2, dtype=np.uint8).tobytes(), labels)
    return data


def expected(data: dict, split: str, keys=None):
    """evaluate_retrieval on ``data``'s labelled rows in key order: ``split`` vs train."""
    keys = sorted(keys if keys is not None else data)
    keys = [k for k in keys if data[k][1]]
    names = sorted({n for k in keys for n in data[k][1]})
    hot, _ = multi_hot([data[k][1] for k in keys], names=names)
    codes = np.stack([np.frombuffer(data[k][0], np.uint8) for k in keys])
    splits = np.array([split_of(BUCKET, k) for k in keys])
    q, d = splits == split, splits == "train"
    return evaluate_retrieval(codes[q], hot[q], codes[d], hot[d]), names


def test_split_sql_equals_split_of():
    con = duckdb.connect()
    keys = [f"photos/{i:06d}.jpg" for i in range(4000)] + ["ünïcødé/猫 1.png", "a'b\"c", "", "x" * 300]
    buckets = ["images", "other-bucket"]
    con.execute("CREATE TABLE t (bucket VARCHAR, key VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(b, k) for b in buckets for k in keys])
    got = con.execute(f"SELECT bucket, key, {split_sql()} FROM t").fetchall()
    assert len(got) == len(buckets) * len(keys)
    assert [s for _, _, s in got] == [split_of(b, k) for b, k, _ in got]
    shares = {s: sum(1 for *_, x in got if x == s) / len(got) for s in ("train", "validation", "evaluation")}
    assert 0.77 < shares["train"] < 0.83 and 0.08 < shares["evaluation"] < 0.12


def test_version_report_equals_evaluate_on_the_current_labelled_codes(settings, store):
    data = dataset()
    items = list(data.items())
    np.random.default_rng(1).shuffle(items)  # written out of key order: the report must sort
    commit(settings, "v1", [(k, c, l) for k, (c, l) in items[:900]])
    commit(settings, "v1", [(k, c, l) for k, (c, l) in items[900:]], minutes=2)
    # a re-upload (newer row wins) and a delete
    renewed = items[0][0]
    data[renewed] = (bytes([255, 255]), ["cat", "dog"])
    commit(settings, "v1", [(renewed, *data[renewed])], minutes=5)
    gone = items[1][0]
    delete(settings, gone, minutes=6)
    del data[gone]

    for split in ("evaluation", "validation"):
        report = version_report(settings, "v1", split=split)
        ref, names = expected(data, split)
        assert_same_metrics(report.metrics, ref)
        assert list(report.label_names) == names == CLASSES
        assert report.split == split and report.lake_snapshot is not None
    labelled = [k for k in data if data[k][1]]
    report = version_report(settings, "v1")
    assert report.metrics.n_queries == sum(split_of(BUCKET, k) == "evaluation" for k in labelled)
    assert report.metrics.n_database == sum(split_of(BUCKET, k) == "train" for k in labelled)

    with pytest.raises(ReportError, match="split must be one of"):
        version_report(settings, "v1", split="train")
    with pytest.raises(ReportError, match="no image has a current code under model version 'nope'"):
        version_report(settings, "nope")


def test_compare_versions_restricts_to_the_common_images(settings, store):
    data1, data2 = dataset(seed=3), dataset(seed=4)
    keys = sorted(data1)
    for k in keys:  # same image, same labels: only the codes differ
        data2[k] = (data2[k][0], data1[k][1])
    commit(settings, "v1", [(k, *data1[k]) for k in keys])
    only_some = keys[::3] + keys[1::3]  # v2 coded two thirds of the images
    commit(settings, "v2", [(k, *data2[k]) for k in only_some])
    reupload = keys[1]  # re-uploaded since v1 coded it: v2 has the new image version only
    commit(settings, "v2", [(reupload, *data2[reupload])], minutes=7)
    common = [k for k in only_some if k != reupload]

    reports = compare_versions(settings, ["v1", "v2"], "evaluation")
    assert list(reports) == ["v1", "v2"]
    for version, data in (("v1", data1), ("v2", data2)):
        ref, names = expected(data, "evaluation", keys=common)
        assert_same_metrics(reports[version].metrics, ref)
        assert list(reports[version].label_names) == names
    assert reports["v1"].lake_snapshot == reports["v2"].lake_snapshot
    alone = version_report(settings, "v1")  # not restricted: every image of v1
    assert alone.metrics.n_database > reports["v1"].metrics.n_database


def test_cli_report_prints_writes_and_names_what_is_missing(settings, store, tmp_path):
    catalog = publish(settings, store, "v1", "v2", "unlabelled", "trainonly")
    data = dataset(600, seed=5)
    commit(settings, "v1", [(k, *v) for k, v in data.items()])
    commit(settings, "v2", [(k, bytes([c[0], 0]), l) for k, (c, l) in data.items()])
    commit(settings, "unlabelled", [(k, c, None) for k, (c, _) in data.items()])
    commit(settings, "trainonly", [(k, *v) for k, v in data.items() if split_of(BUCKET, k) == "train"])
    catalog.activate("v1")
    env = {**cli_env(settings), "COLUMNS": "200"}
    runner = CliRunner()

    result = runner.invoke(app, ["report", "--out", str(tmp_path / "one")], env=env)
    assert result.exit_code == 0, result.output
    ref, _ = expected(data, "evaluation")
    assert "mAP@ALL (tie-expected)" in result.output and f"{ref.map_tie_expected:.4f}" in result.output
    assert f"{ref.map:.4f}" in result.output and "P@r≤2" in result.output and "mAP@1000" in result.output
    text = (tmp_path / "one" / "report.md").read_text()
    assert "| v1 |" in text and "cat" in text and "pr_curve.png" in text
    assert (tmp_path / "one" / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    both = runner.invoke(app, ["report", "--model", "v1", "--model", "v2", "--split", "validation",
                               "--out", str(tmp_path / "two")], env=env)
    assert both.exit_code == 0, both.output
    assert "v2" in both.output and "validation" in both.output
    assert "| metric | v1 | v2 |" in (tmp_path / "two" / "report.md").read_text()

    for args, message in ((["--model", "nosuch"], "model version 'nosuch' not found"),
                          (["--model", "unlabelled"], "carries labels"),
                          (["--model", "trainonly"], "is in the 'evaluation' split"),
                          (["--split", "test"], "split must be one of")):
        failed = runner.invoke(app, ["report", *args], env=env)
        assert failed.exit_code == 1 and message in failed.output, (args, failed.output)
        assert "Traceback" not in failed.output
