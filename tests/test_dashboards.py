"""Dashboards and alerts: valid for Prometheus, and every metric they read is one the code exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hashlake.prometheus_config import render_local_config

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "dashboards" / "prometheus"
DASHBOARD = ROOT / "dashboards" / "grafana" / "dashboards" / "hashlake-ingest.json"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool missing: `make setup` installs prometheus")


def exported_metric_names() -> set[str]:
    """Names the intake and worker exporters publish (histograms add _bucket/_sum/_count)."""
    from prometheus_client.metrics import MetricWrapperBase

    import workers.intake.metrics as intake_metrics
    import workers.metrics as worker_metrics

    names: set[str] = set()
    for module in (intake_metrics, worker_metrics):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                names |= {m.name for m in value.describe()}
    # The Redis-backed gauges: describe() names them without touching Redis.
    names |= {m.name for m in intake_metrics.ListLengthCollector.describe(None)}
    return names


def referenced_metrics(text: str) -> set[str]:
    # Counters are described without their _total suffix; histograms are read through _bucket/_sum/_count.
    found = set(re.findall(r"\bhashlake_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in found}


@needs_promtool
def test_alert_rules_are_valid_and_fire_as_specified():
    subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], check=True, capture_output=True)
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_local_stack_scrape_config_is_valid(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(render_local_config(["127.0.0.1:9108", "127.0.0.1:9109"]))
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


def test_dashboards_and_alerts_read_only_exported_metrics():
    exported = exported_metric_names()
    text = DASHBOARD.read_text() + (PROM / "alerts.yml").read_text()
    referenced = referenced_metrics(text)
    assert referenced, "no hashlake metric referenced at all"
    assert referenced <= exported, f"not exported by any hashlake process: {sorted(referenced - exported)}"
