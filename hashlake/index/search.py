"""Exact k-nearest and radius search over a snapshot, answered by the ``hashlake_hamming`` extension.

The SQL functions ``search``/``within`` of ``hashlake.sql`` call the extension directly; this module
is the same search for Python callers holding a ``Snapshot`` (tests, tools), through a DuckDB
connection of its own per thread.

Answers are exact: ``knn`` returns the k visible rows that come first by (distance, bucket, key) —
the stated tie rule, the same order as ``ORDER BY hamming(code, q), bucket, key LIMIT k`` — and
``within`` every visible row within the radius, in that order. Which method answers (multi-index
hashing or the flat scan) is the extension's choice per query, by estimated cost; see hamming.c.
"""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from hashlake.index.snapshot import Snapshot
from hashlake.native import loader

RESULT_SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                           ("distance", pa.int32())])

_LOCAL = threading.local()  # a DuckDB connection must not be used by two threads at once


def knn(snapshot: Snapshot, queries: np.ndarray, k: int) -> list[pa.Table]:
    """The k nearest visible rows to each query (nq, bits/8) → per query a RESULT_SCHEMA table."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return _run("hashlake_search_list", snapshot, queries, k)


def within(snapshot: Snapshot, queries: np.ndarray, radius: int) -> list[pa.Table]:
    """Every visible row within ``radius`` of each query → per query a RESULT_SCHEMA table."""
    if radius < 0:
        raise ValueError(f"radius must be at least 0, got {radius}")
    return _run("hashlake_within_list", snapshot, queries, radius)


def _run(function: str, snapshot: Snapshot, queries: np.ndarray, param: int) -> list[pa.Table]:
    con = getattr(_LOCAL, "con", None)
    if con is None:
        con = _LOCAL.con = loader.connect()
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    table = pa.table({"i": pa.array(np.arange(len(queries))), "q": pa.array([q.tobytes() for q in queries], pa.binary())})
    con.register("_hashlake_queries", table)
    try:
        loader.pin(con, snapshot)
        hits = con.execute(f"SELECT {function}(q, ?) AS hits FROM _hashlake_queries ORDER BY i",
                           [param]).to_arrow_table().column("hits")
    finally:
        con.unregister("_hashlake_queries")
    return [pa.Table.from_pylist(row or [], schema=RESULT_SCHEMA) for row in hits.to_pylist()]
