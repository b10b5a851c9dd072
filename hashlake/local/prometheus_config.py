"""The Prometheus scrape configuration for the local stack (the deployment's lives in dashboards/)."""
from __future__ import annotations

from pathlib import Path

ALERT_RULES = Path(__file__).resolve().parents[2] / "dashboards" / "prometheus" / "alerts.yml"


def render_local_config(intake: str, workers: list[str], scrape_interval_s: int = 5,
                        pushgateway: str | None = None) -> str:
    """Scrape jobs named as the deployment's (``hashlake-intake``, ``hashlake-worker``): the alert rules
    that notice a vanished target select them by job. The Pushgateway (the retraining job's metrics) is
    scraped with ``honor_labels``, so its series keep the job label they were pushed under."""
    rules = f"rule_files:\n  - {ALERT_RULES}\n" if ALERT_RULES.exists() else ""
    targets = [("hashlake-intake", [intake], ""), ("hashlake-worker", workers, "")]
    if pushgateway:
        targets.append(("hashlake-pushgateway", [pushgateway], "    honor_labels: true\n"))
    jobs = "".join(f"  - job_name: {name}\n{extra}    static_configs:\n      - targets: [{', '.join(repr(t) for t in hosts)}]\n"
                   for name, hosts, extra in targets)
    return (f"global:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\n"
            f"{rules}scrape_configs:\n{jobs}")
