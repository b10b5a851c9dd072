"""The dashboards and alerts against a real Prometheus scraping a running local stack during an ingest:
every panel's query returns data, every series an alert reads exists, and Prometheus evaluates every
rule without error.

Prometheus runs with the deployment's scrape jobs (dashboards/prometheus/prometheus.yml: the job names
the alerts use), pointed at the stack's exporters instead of compose's DNS names. The query panels'
target is this test's own process: a query connection on the stack that searches with every SQL
function and refreshes, all along, and serves its metrics (hashlake.query_metrics).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from hashlake import query_metrics, sql
from hashlake.catalog import Catalog
from hashlake.config import Settings
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.local import stack
from hashlake.local.services import free_port, start_prometheus
from hashlake.store import ObjectStore
from hashlake.upload import upload_all
from workers.intake.events import minio_record, webhook_body

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "dashboards" / "prometheus"
DASHBOARD = ROOT / "dashboards" / "grafana" / "dashboards" / "hashlake-ingest.json"
SCRAPE_S = 1  # scrape and rule evaluation interval: a rate over [1m] has ~60 samples
DATA_TIMEOUT_S = 240
# Series an alert reads that no process of the local stack exports yet.
NOT_IN_THE_LOCAL_STACK = {
    # the retraining scheduler's counter (contract in alerts.yml); nothing retrains during an ingest
    "hashlake_retrain_runs_total",
}


def scrape_config(intake: str, workers: list[str], query: str) -> str:
    """prometheus.yml of the deployment with static targets in place of DNS discovery."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(PROM / "alerts.yml")]
    targets = {"hashlake-intake": [intake], "hashlake-worker": workers, "hashlake-query": [query]}
    config["scrape_configs"] = [{"job_name": job, "static_configs": [{"targets": hosts}]}
                                for job, hosts in targets.items()]
    return yaml.safe_dump(config)


QUERIES = ("SELECT * FROM search($q, 5)", "SELECT * FROM within($q, 8)", "SELECT * FROM search_rows($q, 5)",
           "SELECT * FROM within_rows($q, 8)", "SELECT search_list($q, 5)", "SELECT within_list($q, 8)")


def query_load(settings: Settings, stop: threading.Event, errors: list) -> None:
    """A query process's work until ``stop``: every SQL search function, then a refresh, twice a second."""
    try:
        con = sql.connect(settings)
        while not stop.wait(0.5):
            row = con.sql("SELECT code FROM codes LIMIT 1").fetchone()
            q = row[0] if row else b"\0" * 8  # an empty index takes a code of any length
            for statement in QUERIES:
                con.execute(statement, {"q": q}).fetchall()
            sql.refresh(con)
    except Exception as exc:  # reported by the test
        errors.append(exc)


@pytest.fixture(scope="module")
def live():
    """(stack settings, Prometheus URL, errors of the query load) of a stack with one worker, a query
    process (this one) searching it, and a Prometheus of this test's own."""
    # Not under pytest's 0700 tmp folder: run as root, the stack's PostgreSQL belongs to the postgres
    # system user, which must enter its data folder.
    root = Path(tempfile.mkdtemp(prefix="hashlake-live-"))
    root.chmod(0o755)
    base = Settings(stack_dir=root / "stack")
    settings = stack.up(base, stack.StackOptions(workers=1, prometheus=False, reconcile_interval_s=3600),
                        log=lambda *_: None)
    prometheus = None
    stop, errors = threading.Event(), []
    load = threading.Thread(target=query_load, args=(settings, stop, errors), daemon=True)
    try:
        load.start()
        workers = [f"127.0.0.1:{r.port}" for r, _ in stack.status(base) if r.name.startswith("worker")]
        (root / "prometheus.yml").write_text(scrape_config(f"127.0.0.1:{settings.metrics_port}", workers,
                                                           f"127.0.0.1:{query_metrics.serve(0)}"))
        port = free_port()
        prometheus = start_prometheus(port, root / "prometheus.yml", root / "tsdb", root / "prometheus.log")
        yield settings, f"http://127.0.0.1:{port}", errors
    finally:
        stop.set()
        load.join(timeout=30)
        if prometheus is not None:
            prometheus.stop()
        stack.down(base, log=lambda *_: None)
        shutil.rmtree(root, ignore_errors=True)


def api(prometheus: str, path: str, **params) -> dict:
    url = f"{prometheus}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def post_webhook(settings: Settings, body: bytes) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{settings.webhook_port}/minio/events", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {settings.webhook_token.get_secret_value()}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_data(prometheus: str, queries: list[str]) -> dict[str, list]:
    """Each query's result once every query returns at least one series (or the timeout's report)."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:
        results = {q: api(prometheus, "query", query=q)["result"] for q in queries}
        empty = [q for q, result in results.items() if not result]
        if not empty:
            return results
        if time.monotonic() > deadline:
            raise AssertionError(f"no data after {DATA_TIMEOUT_S} s for: {empty}")
        time.sleep(2)


# The retraining panels' series come from a retraining run's push (scheduler/metrics.py), not from an ingest.
RETRAINING_SERIES = ("hashlake_retrain_", "hashlake_reencode_", "hashlake_model_map")


def panel_queries() -> list[str]:
    """The ingest panels' queries (the retraining panels are left out: nothing retrains during an ingest)."""
    dash = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dash["panels"] for target in panel["targets"]
            if not any(series in target["expr"] for series in RETRAINING_SERIES)]


def alert_selectors() -> set[str]:
    """Every vector selector the alert rules read, with its label matchers (`up{job="..."}` included)."""
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    selectors = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            selectors |= {m.group(0) for m in re.finditer(r"\b(?:hashlake_[a-z0-9_]+|up)(?:\{[^}]*\})?", rule["expr"])}
    return selectors


def test_every_panel_and_alert_reads_live_data_during_an_ingest(live):
    settings, prometheus, query_errors = live
    # Prometheus holds the query process's first load before any image arrives, so the refresh that
    # reads the new codes is an increase it sees (scraped only after it, the counter would look flat).
    wait_for_data(prometheus, ["hashlake_query_refresh_seconds_count >= 1"])
    store = ObjectStore(settings)
    etags = upload_all(store, settings.images_bucket, iter_images(SAMPLE, limit=64))
    bad = {"notes.jpg": store.put(settings.images_bucket, "notes.jpg", b"not an image")}  # a failures series
    records = [minio_record("s3:ObjectCreated:Put", settings.images_bucket, key, etag=etag, size=1)
               for key, etag in {**etags, **bad}.items()]
    assert post_webhook(settings, webhook_body(records)) == 200
    assert post_webhook(settings, b"{not json") == 200  # dead-lettered, answered 2xx: a malformed-events series

    # the query process searched with every function, refreshed with new codes, and holds them all (in the
    # index of this stack's version: earlier tests of this pytest process leave indexes of their own in it)
    active = Catalog(store, settings).active()
    searched = [f'rate(hashlake_query_search_seconds_count{{function="{f}"}}[1m]) > 0'
                for f in ("search", "within", "search_rows", "within_rows", "search_list", "within_list")]
    results = wait_for_data(prometheus, [*panel_queries(), 'sum(hashlake_worker_images_encoded_total) >= 64',
                                         *searched, 'rate(hashlake_query_refresh_seconds_count[5m]) > 0',
                                         f'hashlake_query_index_rows{{model_version="{active}"}} >= 64'])
    assert results, "no panel query at all"
    assert not query_errors, query_errors

    selectors = sorted(s for s in alert_selectors() if re.match(r"[a-z0-9_]+", s)[0] not in NOT_IN_THE_LOCAL_STACK)
    assert any(s.startswith("up{") for s in selectors) and len(selectors) > 5
    wait_for_data(prometheus, selectors)

    # Prometheus loaded every rule of alerts.yml and evaluates each without error.
    groups = api(prometheus, "rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = [r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert sorted(loaded) == sorted(expected)
    deadline = time.monotonic() + 30
    while any(rule.get("health") != "ok" for rule in loaded.values()) and time.monotonic() < deadline:
        time.sleep(1)
        loaded = {rule["name"]: rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]}
    assert {name: rule.get("lastError") for name, rule in loaded.items() if rule.get("health") != "ok"} == {}
    # Every exporter is up, and no alert that means "gone" is even pending (the job names match).
    up = api(prometheus, "query", query="up")["result"]
    assert {(r["metric"]["job"], r["value"][1]) for r in up} == {("hashlake-intake", "1"), ("hashlake-worker", "1"),
                                                                 ("hashlake-query", "1")}
    active = {a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"]}  # pending or firing
    assert not {"HashlakeIntakeAbsent", "HashlakeWorkersAbsent", "HashlakeTargetDown"} & active, active
