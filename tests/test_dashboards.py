"""Dashboards and alerts: valid for Prometheus, every alert fires in its promtool case, and every
metric they read is one the code exports, under the exact name its type exposes."""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import yaml

from hashlake.config import Settings
from hashlake.local.prometheus_config import render_local_config

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "dashboards" / "prometheus"
DASHBOARD = ROOT / "dashboards" / "grafana" / "dashboards" / "hashlake-ingest.json"
PACKAGES = ("hashlake", "hashing_models", "workers", "scheduler")
promtool = shutil.which("promtool")
RULE_TESTS = sorted(p.name for p in PROM.glob("*_test.yml"))  # promtool cases, run together
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool missing: `make setup` installs prometheus")

# The series names each metric type exposes on /metrics (prometheus_client's exposition).
EXPOSED_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("", "_sum", "_count"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}


def metric_modules() -> list[str]:
    """Every project module that imports prometheus_client (where hashlake metrics are defined)."""
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if re.search(r"^\s*(from prometheus_client\b|import prometheus_client\b)", path.read_text(), re.M):
                modules.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return modules


def exported_series(redis_port: int) -> dict[str, str]:
    """Series name → metric type, for every hashlake metric the processes export.

    Module-level metrics register in prometheus_client's default registry when their module is
    imported. The intake's Redis-backed gauges are a collector it registers at run time: collected
    here from a real Redis, as a scrape would."""
    from prometheus_client import REGISTRY, CollectorRegistry

    from scheduler import metrics as retrain_metrics
    from workers.intake.metrics import ListLengthCollector
    from workers.intake.pending import IntakeKeys

    for module in metric_modules():
        importlib.import_module(module)
    runtime = CollectorRegistry()
    runtime.register(ListLengthCollector(redis.Redis(port=redis_port), IntakeKeys.for_settings(Settings()),
                                         ["hashlake"]))
    series: dict[str, str] = {}
    # the retraining job pushes its own registry to the Pushgateway (scheduler/metrics.py)
    for registry in (REGISTRY, runtime, retrain_metrics.REGISTRY):
        for family in registry.collect():
            if family.name.startswith("hashlake_"):
                for suffix in EXPOSED_SUFFIXES[family.type]:
                    series[family.name + suffix] = family.type
    return series


def referenced_series(text: str) -> set[str]:
    return set(re.findall(r"\bhashlake_[a-z0-9_]+", text))


def dashboard_and_rule_text() -> str:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return DASHBOARD.read_text() + "\n".join(exprs)


def test_the_metric_name_check_refuses_invented_names(redis_service):
    exported = exported_series(redis_service.port)
    # a counter is read as _total only, a histogram through _bucket/_sum/_count only, a gauge as is
    assert exported["hashlake_worker_images_encoded_total"] == "counter"
    assert "hashlake_worker_images_encoded" not in exported
    assert "hashlake_worker_images_encoded_bucket" not in exported
    assert {"hashlake_worker_stage_seconds_bucket", "hashlake_worker_stage_seconds_sum"} <= exported.keys()
    assert "hashlake_worker_stage_seconds_total" not in exported and "hashlake_worker_stage_seconds" not in exported
    assert exported["hashlake_broker_queue_depth"] == "gauge" and "hashlake_broker_queue_depth_total" not in exported
    # a collector's families (the query process's, read from the extension at scrape time) likewise
    assert {"hashlake_query_search_seconds_bucket", "hashlake_query_search_seconds_count"} <= exported.keys()
    assert "hashlake_query_search_seconds" not in exported and "hashlake_query_search_seconds_total" not in exported
    assert exported["hashlake_query_index_rows"] == "gauge" and "hashlake_query_index_rows_total" not in exported


def test_dashboards_and_alerts_read_only_exported_metrics(redis_service):
    exported = exported_series(redis_service.port)
    referenced = referenced_series(dashboard_and_rule_text())
    assert referenced, "no hashlake metric referenced at all"
    missing = sorted(referenced - exported.keys())
    assert not missing, (f"read by a panel or an alert but exported by no module of {', '.join(PACKAGES)} "
                         f"under that name and type: {missing}")


@needs_promtool
def test_alert_rules_are_valid_and_fire_as_specified():
    subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], check=True, capture_output=True)
    out = subprocess.run([promtool, "test", "rules", *RULE_TESTS], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def alert_names() -> list[str]:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


@needs_promtool
@pytest.mark.parametrize("alert", alert_names())
def test_the_promtool_cases_fail_when_an_alert_stops_firing(alert, tmp_path):
    """Each alert with an expression that never fires: its own promtool case must then fail."""
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    for name in RULE_TESTS:
        shutil.copy(PROM / name, tmp_path)
    out = subprocess.run([promtool, "test", "rules", *RULE_TESTS], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0, f"no promtool case expects {alert} to fire"
    assert f"alertname: {alert}," in out.stdout + out.stderr


@needs_promtool
def test_deployment_scrape_config_is_valid(tmp_path):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where compose mounts the rules
    config["rule_files"] = [str(PROM / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_name_the_deployment_scrape_jobs():
    jobs = {job["job_name"] for job in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    named = set(re.findall(r'job="([^"]+)"', (PROM / "alerts.yml").read_text()))
    assert named and named <= jobs, f"alerts name scrape jobs prometheus.yml lacks: {sorted(named - jobs)}"


@needs_promtool
def test_local_stack_scrape_config_is_valid(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(render_local_config("127.0.0.1:9108", ["127.0.0.1:9109"]))
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_has_fixed_uid_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "hashlake-ingest"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert all(t["datasource"]["uid"] == uid for p in dash["panels"] for t in p["targets"])
