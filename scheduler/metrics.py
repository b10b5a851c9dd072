"""Prometheus metrics of the retraining job, pushed to a Pushgateway when the run ends.

A Ray job lives minutes, shorter than a scrape interval may allow, so it pushes rather than being
scraped (``Settings.pushgateway_url``; the local stack runs one and Prometheus scrapes it with
``honor_labels``). Everything goes under one grouping key, ``job="hashlake-retrain"``, and each push
replaces the group:

- ``hashlake_retrain_runs_total{outcome}`` counts the finished run records in the index bucket
  (``RunLog``), so it only grows and every job pushes the same truth, whichever ran last: the contract the
  retraining alerts (dashboards/prometheus/alerts.yml) read;
- ``hashlake_retrain_step_seconds{step}``, ``hashlake_reencode_rows_per_second`` and
  ``hashlake_model_map{version,split}`` are the last run's figures.

Without a Pushgateway the figures stay in the run record (``hashlake jobs``).
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from prometheus_client.core import CounterMetricFamily

log = logging.getLogger(__name__)

RETRAIN_OUTCOMES = ("succeeded", "failed", "rejected")
PUSH_JOB = "hashlake-retrain"



class RunCounts:
    """``hashlake_retrain_runs_total``: the recorded runs by outcome (a counter whose value is read, not
    incremented, since the run records are the count)."""

    def __init__(self):
        self.counts = {outcome: 0 for outcome in RETRAIN_OUTCOMES}

    def collect(self):
        family = CounterMetricFamily("hashlake_retrain_runs", "Finished retraining runs, by outcome",
                                     labels=["outcome"])
        for outcome, count in self.counts.items():
            family.add_metric([outcome], count)
        yield family


REGISTRY = CollectorRegistry()  # the job's own: a push sends these and nothing of the process
RETRAIN_RUNS = RunCounts()
REGISTRY.register(RETRAIN_RUNS)
STEP_SECONDS = Gauge("hashlake_retrain_step_seconds", "Duration of each step of the last retraining run", ["step"],
                     registry=REGISTRY)
REENCODE_RATE = Gauge("hashlake_reencode_rows_per_second", "Images re-encoded per second by the last run",
                      registry=REGISTRY)
MODEL_MAP = Gauge("hashlake_model_map", "Tie-expected mAP@ALL on the evaluation split, by model version",
                  ["version", "split"], registry=REGISTRY)


def observe_step(step: str, seconds: float) -> None:
    STEP_SECONDS.labels(step).set(seconds)


def record_run(settings, state) -> None:
    """Set the run's figures and the run counts, and push them (when a Pushgateway is configured)."""
    from scheduler.retrain.state import RunLog

    figures = state.figures
    if figures.get("reencode.rows_per_s"):
        REENCODE_RATE.set(figures["reencode.rows_per_s"])
    for side, version in (("candidate", state.candidate), ("active", state.previous)):
        value = figures.get(f"evaluate.{side}_map")
        if version and value is not None:
            MODEL_MAP.labels(version, "evaluation").set(value)
    if not settings.pushgateway_url:
        return
    try:
        counts = {outcome: 0 for outcome in RETRAIN_OUTCOMES}  # every outcome exported, 0 included
        for run in RunLog(settings).runs():
            if run.outcome in counts:
                counts[run.outcome] += 1
        RETRAIN_RUNS.counts = counts
        push_to_gateway(settings.pushgateway_url, job=PUSH_JOB, registry=REGISTRY)
    except Exception as exc:  # metrics must not fail a run that did its work; the run record has the figures
        log.warning("could not push the retraining metrics to %s: %s", settings.pushgateway_url, exc)
