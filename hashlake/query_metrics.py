"""Prometheus metrics of a process that serves queries: anything that opens ``hashlake.sql.connect()``
(a user's service, a query node, ``hashlake sql``).

    hashlake_query_search_seconds{function}      histogram: latency of each search, per SQL function
                                                 (search | within | search_rows | within_rows |
                                                 search_list | within_list), seconds
    hashlake_query_index_rows{model_version}     gauge: visible rows the process's in-memory index holds
                                                 (what ``SELECT count(*) FROM codes`` counts)
    hashlake_query_index_bytes{model_version}    gauge: bytes that index holds: packed codes, the other
                                                 columns, hash tables, hidden-row lists, delete rows, tie ranks
    hashlake_query_refresh_seconds               histogram: wall time of each index refresh that read
                                                 the lake (a first load, or the change feed since the
                                                 last refresh), seconds
    hashlake_query_index_loads_total{reason}     counter: refreshes that read a whole model version:
                                                 first (the process's first connection on it) | expired
                                                 (the snapshot it held was expired by compaction) |
                                                 stalled (its change read passed index_refresh_timeout_s)

The searches run in the ``hashlake_hamming`` extension (C), which times each answer and counts it in
fixed buckets (50 µs to 1 s; hashlake/native/src/metrics.c says what is timed); ``QueryCollector``
reads those counters, and the index sizes, at scrape time, so nothing runs between scrapes. A list
call answers its chunk of queries together: each query of the chunk observes the chunk's time.

Every metric is in prometheus_client's default registry from the moment ``hashlake.index`` is
imported. Serving them:

- set ``query_metrics_port`` (``HASHLAKE_QUERY_METRICS_PORT=9110``): ``hashlake.sql.connect()`` then
  serves /metrics on that port, on every interface, once per process; deployments scrape 9110 (the
  ``hashlake-query`` job of dashboards/prometheus/prometheus.yml);
- or call ``serve(port)`` in the process;
- or nothing, in a service that already exposes prometheus_client's default registry.

One port serves one process: in a server of several processes give each its own port (or serve
from the app's own exporter), since a process whose port is taken logs a warning and serves none.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from hashlake.config import Settings

log = logging.getLogger(__name__)

# A refresh reads the change feed in tens of milliseconds; a first load of millions of rows takes
# tens of seconds.
REFRESH_SECONDS = Histogram("hashlake_query_refresh_seconds",
                            "Wall time of an index refresh that read the lake (a first load or the change feed)",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
LOADS = Counter("hashlake_query_index_loads_total",
                "Index refreshes that read a whole model version, by reason (first | expired | stalled)", ["reason"])
for _reason in ("first", "expired", "stalled"):
    LOADS.labels(_reason)  # both series from the start, at 0: increase() sees the first of each


def observe_refresh(seconds: float, load: str | None) -> None:
    """Record one refresh that read the lake: ``load`` is first | expired | stalled for a whole-version read,
    None for the change feed (``hashlake.index.code_index``)."""
    REFRESH_SECONDS.observe(seconds)
    if load is not None:
        LOADS.labels(load).inc()


class QueryCollector:
    """The search latency histogram (from the extension's counters) and the index size gauges (from
    the process's shared indexes), read on each scrape."""

    def describe(self) -> Iterator:
        # names only, so that registering reads nothing
        yield HistogramMetricFamily("hashlake_query_search_seconds", "", labels=["function"])
        yield GaugeMetricFamily("hashlake_query_index_rows", "", labels=["model_version"])
        yield GaugeMetricFamily("hashlake_query_index_bytes", "", labels=["model_version"])

    def collect(self) -> Iterator:
        # imported here: hashlake.index imports this module for observe_refresh
        from hashlake.index.code_index import shared_indexes
        from hashlake.native import loader

        search = HistogramMetricFamily("hashlake_query_search_seconds",
                                       "Latency of each search answered by the hashlake_hamming extension, "
                                       "by SQL function", labels=["function"])
        for latency in loader.search_latency():
            buckets = [(floatToGoString(le), count) for le, count in zip(latency.bounds, latency.cumulative)]
            buckets.append(("+Inf", latency.cumulative[-1]))
            search.add_metric([latency.function], buckets, latency.sum_s)
        yield search
        sizes: dict[str, list[int]] = {}  # model version → [rows, bytes], summed over the lakes it is read from
        for index in shared_indexes():
            snapshot = index.snapshot  # the current one: a refresh swaps it in one assignment
            size = sizes.setdefault(snapshot.model_version, [0, 0])
            size[0] += snapshot.rows
            size[1] += sum(snapshot.memory().values()) + loader.tie_rank_bytes(snapshot)
        rows = GaugeMetricFamily("hashlake_query_index_rows", "Visible rows of a model version the process's "
                                 "in-memory index holds", labels=["model_version"])
        nbytes = GaugeMetricFamily("hashlake_query_index_bytes", "Bytes the process's in-memory index of a model "
                                   "version holds (codes, columns, hash tables, hidden rows, deletes, tie ranks)",
                                   labels=["model_version"])
        for version, (n, b) in sorted(sizes.items()):
            rows.add_metric([version], n)
            nbytes.add_metric([version], b)
        yield rows
        yield nbytes


REGISTRY.register(QueryCollector())

_SERVERS: dict[int, object] = {}  # port asked for → the HTTP server on it
_REFUSED: set[int] = set()  # configured ports found taken: warned about once
_SERVE_LOCK = threading.Lock()


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics (prometheus_client's default registry: these metrics and any others of the process)
    on ``port``; 0 picks a free port. Returns the port served. Once per port: a later call with the same
    port (0 included) returns the port already served."""
    with _SERVE_LOCK:
        server = _SERVERS.get(port)
        if server is None:
            server, _ = start_http_server(port, addr=addr)
            _SERVERS[port] = _SERVERS[server.server_port] = server
            log.info("query metrics on http://%s:%d/metrics", addr, server.server_port)
        return server.server_port


def serve_configured(settings: Settings) -> None:
    """``serve(settings.query_metrics_port)`` when it is set (``hashlake.sql.connect()`` calls this). A
    port already taken is logged, not raised: queries do not depend on their metrics."""
    port = settings.query_metrics_port
    if port is None or port in _REFUSED:
        return
    try:
        serve(port)
    except OSError as exc:
        _REFUSED.add(port)
        log.warning("query metrics not served: port %d: %s", port, exc)
