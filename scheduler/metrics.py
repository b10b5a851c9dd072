"""Prometheus metrics of the scheduler's jobs.

``hashlake_retrain_runs_total`` is the contract the retraining alerts (dashboards/prometheus/alerts.yml)
read; the nightly retraining job that will count its runs here is not built yet, so today the series
stays at 0 for every outcome.
"""
from __future__ import annotations

from prometheus_client import Counter

RETRAIN_OUTCOMES = ("succeeded", "failed", "rejected")
RETRAIN_RUNS = Counter("hashlake_retrain_runs_total", "Finished retraining runs, by outcome", ["outcome"])
for _outcome in RETRAIN_OUTCOMES:
    RETRAIN_RUNS.labels(_outcome)  # every outcome exported from the start, at 0
