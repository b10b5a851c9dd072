"""The Prometheus scrape configuration for the local stack (the deployment's lives in dashboards/)."""
from __future__ import annotations

from pathlib import Path

ALERT_RULES = Path(__file__).resolve().parents[1] / "dashboards" / "prometheus" / "alerts.yml"


def render_local_config(targets: list[str], scrape_interval_s: int = 5) -> str:
    rules = f"rule_files:\n  - {ALERT_RULES}\n" if ALERT_RULES.exists() else ""
    target_list = ", ".join(f'"{t}"' for t in targets)
    return (
        f"global:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\n"
        f"{rules}"
        "scrape_configs:\n"
        "  - job_name: hashlake\n"
        f"    static_configs:\n      - targets: [{target_list}]\n"
    )
