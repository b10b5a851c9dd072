"""The query process's metrics against a real lake: a query connection with ``query_metrics_port`` set
serves /metrics; each SQL search function's latency histogram counts exactly the queries it answered,
the index gauges match the codes view, and refreshes that read the lake are timed (unchanged ones not)."""
from __future__ import annotations

import socket
import urllib.request
import uuid

import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

from hashlake import query_metrics, sql
from hashlake.config import Settings

from test_sql import commit_codes, random_codes

FUNCTIONS = ("search", "within", "search_rows", "within_rows", "search_list", "within_list")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value, from the /metrics a query process serves on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def search_counts(samples) -> dict[str, float]:
    return {f: samples.get(("hashlake_query_search_seconds_count", (("function", f),)), 0.0) for f in FUNCTIONS}


def refreshes(samples) -> float:
    return samples.get(("hashlake_query_refresh_seconds_count", ()), 0.0)


def test_a_query_process_serves_search_latency_index_size_and_refresh_times(settings, store):
    version = f"qm-{uuid.uuid4().hex[:8]}"  # this test's own: the gauges sum an index per model version
    codes = random_codes(3000, 64, seed=5)
    commit_codes(settings, [f"q{i:05d}" for i in range(2500)], codes[:2500], version=version)
    port = free_port()
    before_connect = refreshes(scrape(query_metrics.serve(0)))  # the process's registry, whoever serves it
    loads_before = scrape(query_metrics.serve(0))[("hashlake_query_index_loads_total", (("reason", "first"),))]

    con = sql.connect(settings.model_copy(update={"query_metrics_port": port}), model_version=version)
    assert query_metrics.serve(port) == port  # connect() serves on the configured port; once
    samples = scrape(port)
    assert refreshes(samples) == before_connect + 1  # the first load
    assert samples[("hashlake_query_index_loads_total", (("reason", "first"),))] == loads_before + 1
    before = search_counts(samples)

    q = codes[7].tobytes()
    for _ in range(3):
        assert len(con.execute("SELECT * FROM search(?, 10)", [q]).fetchall()) == 10
    for _ in range(2):
        con.execute("SELECT * FROM within(?, 12)", [q.hex()]).fetchall()
    assert len(sql.search_codes(con, q, 5)) == 5  # the Python helper runs search(): one more
    for _ in range(2):
        con.execute("SELECT * FROM search_rows(?, 4)", [q]).fetchall()
    con.execute("SELECT * FROM within_rows(?, 9)", [q]).fetchall()
    batch = [c.tobytes() for c in codes[:5]] + [None]  # a NULL query is no search
    con.register("queries", pa.table({"code": pa.array(batch, pa.binary())}))
    assert len(con.execute("SELECT search_list(code, 3) FROM queries").fetchall()) == 6
    con.execute("SELECT within_list(code, 8) FROM queries").fetchall()
    con.execute("SELECT within_list(code, 8) FROM queries LIMIT 2").fetchall()

    samples = scrape(port)
    grown = {f: search_counts(samples)[f] - before[f] for f in FUNCTIONS}
    assert grown == {"search": 4, "within": 2, "search_rows": 2, "within_rows": 1, "search_list": 5,
                     "within_list": 7}
    for function in FUNCTIONS:
        labels = (("function", function),)
        buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in samples.items()
                          if k[0] == "hashlake_query_search_seconds_bucket" and dict(k[1])["function"] == function))
        assert [le for le, _ in buckets][:2] == [5e-05, 1e-04] and buckets[-1][0] == float("inf")
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
        assert buckets[-1][1] == samples[("hashlake_query_search_seconds_count", labels)]
        assert samples[("hashlake_query_search_seconds_sum", labels)] > 0

    gauge = ("model_version", version),
    count = con.sql("SELECT count(*) FROM codes").fetchone()[0]
    assert samples[("hashlake_query_index_rows", gauge)] == count == 2500
    assert samples[("hashlake_query_index_bytes", gauge)] > 2500 * 8  # the codes and more

    # a refresh with new commits is timed and moves the gauges; one that finds nothing new is not timed
    commit_codes(settings, [f"q{i:05d}" for i in range(2500, 3000)], codes[2500:], minutes=2, version=version)
    sql.refresh(con)
    samples = scrape(port)
    assert refreshes(samples) == before_connect + 2
    assert samples[("hashlake_query_index_loads_total", (("reason", "first"),))] == loads_before + 1
    assert samples[("hashlake_query_index_rows", gauge)] == con.sql("SELECT count(*) FROM codes").fetchone()[0] == 3000
    sql.refresh(con)
    assert refreshes(scrape(port)) == before_connect + 2


def test_a_port_already_taken_is_logged_not_raised(caplog):
    assert Settings().query_metrics_port is None  # off unless set
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        query_metrics.serve_configured(Settings(query_metrics_port=port))
    assert f"query metrics not served: port {port}" in caplog.text
