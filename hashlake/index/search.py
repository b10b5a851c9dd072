"""Exact k-nearest and radius search over a snapshot; multi-index hashing when it is cheaper, else a flat scan.

Answers are exact: ``knn`` returns the k visible rows that come first by (distance, bucket, key) —
the stated tie rule, the same order as ``ORDER BY hamming(code, q), bucket, key LIMIT k`` — and
``within`` every visible row within the radius, in that order.

Choosing the method per query: multi-index hashing probes its tables within a time budget (a
fraction of what the flat scan is estimated to cost, from the constants below, measured on this
machine); a query that runs out of budget — random-looking codes, a large radius — goes to the
flat scan, so the worst case is the flat scan plus about MIH_BUDGET of it. A radius profile per
segment (sampled distances) predicts the k-NN radius first; when reaching it looks too dear, MIH
only gets MIH_QUICK_BUDGET, enough to catch near duplicates. ``within`` probes only when the
estimate says probing is cheaper than the scan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hashlake.index import kernels
from hashlake.index.mih import MultiIndexHash, shell_size
from hashlake.index.snapshot import Segment, Snapshot

RESULT_SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                           ("distance", pa.int32())])
_ORDER = [("distance", "ascending"), ("bucket", "ascending"), ("key", "ascending")]

# Cost model, in nanoseconds (2-core machine here): flat scan per code byte on one core
# (faiss: ~1.4 ns per 64-bit code, ~690M codes/s); one probed key; one verified candidate; one
# numpy round per probed (table, shell). MIH may spend MIH_BUDGET of the flat cost before giving up.
FLAT_NS_PER_BYTE = 0.18
PROBE_NS = 25.0
CANDIDATE_NS = 40.0
SHELL_NS = 15_000.0
MIH_BUDGET = 0.5
# When the radius profile says the k-th neighbour lies too far for MIH to pay off, MIH still gets
# this much, which finds exact and near duplicates (the common case with real images) at once.
MIH_QUICK_BUDGET = 0.03

# Extra neighbours fetched so that the rows tied at the k-th distance are all in hand: each query
# whose ties overflow costs a second, radius scan. With 10M random 64-bit codes ~10-30 rows share
# the k-th distance; with 2k alone half the queries paid the second scan (measured).
TIE_MARGIN = 64

Found = list[tuple[np.ndarray, np.ndarray]]  # per segment: (rows int64, distances int32)


def knn(snapshot: Snapshot, queries: np.ndarray, k: int) -> list[pa.Table]:
    """The k nearest visible rows to each query (nq, bits/8) → per query a RESULT_SCHEMA table."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not snapshot.segments:
        return [RESULT_SCHEMA.empty_table() for _ in range(queries.shape[0])]
    budget = MIH_BUDGET * _flat_cost(snapshot)
    results: list[pa.Table | None] = []
    for q in queries:
        found = _knn_mih(snapshot, q, k, budget) if _has_mih(snapshot) else None
        results.append(None if found is None else _ordered(snapshot, found, k))
    flat = [i for i, r in enumerate(results) if r is None]
    if flat:
        for i, found in zip(flat, _knn_flat(snapshot, queries[flat], k)):
            results[i] = _ordered(snapshot, found, k)
    return results  # type: ignore[return-value]


def within(snapshot: Snapshot, queries: np.ndarray, radius: int) -> list[pa.Table]:
    """Every visible row within ``radius`` of each query → per query a RESULT_SCHEMA table."""
    if radius < 0:
        raise ValueError(f"radius must be at least 0, got {radius}")
    if not snapshot.segments:
        return [RESULT_SCHEMA.empty_table() for _ in range(queries.shape[0])]
    budget = _flat_cost(snapshot)  # a radius query probes only when that is estimated cheaper than the scan
    results: list[pa.Table | None] = []
    for q in queries:
        found = _within_mih(snapshot, q, radius, budget) if _has_mih(snapshot) else None
        results.append(None if found is None else _ordered(snapshot, found))
    flat = [i for i, r in enumerate(results) if r is None]
    if flat:
        per_segment = [kernels.within(s.codes, queries[flat], radius) for s in snapshot.segments]
        for j, i in enumerate(flat):
            found = [_drop_hidden(rows, d, h) for (d, rows), h in
                     zip((p[j] for p in per_segment), snapshot.hidden)]
            results[i] = _ordered(snapshot, found)
    return results  # type: ignore[return-value]


# -- flat scan ------------------------------------------------------------------------------------
def _knn_flat(snapshot: Snapshot, queries: np.ndarray, k: int) -> list[Found]:
    """faiss top-(2k + TIE_MARGIN + hidden) per segment; where a segment's last returned distance does
    not exceed the k-th best, rows tied at the cut may be missing, so that segment is re-read by radius."""
    per_segment = []
    start = time.perf_counter_ns()
    for segment, hidden in zip(snapshot.segments, snapshot.hidden):
        kk = min(segment.rows, 2 * k + TIE_MARGIN + len(hidden))
        per_segment.append(kernels.knn(segment.codes, queries, kk))
    _FLAT_SPEED.record((time.perf_counter_ns() - start) // len(queries), sum(s.codes.nbytes for s in snapshot.segments))
    out = []
    for j in range(queries.shape[0]):
        found = [_drop_hidden(I[j], D[j], h) for (D, I), h in zip(per_segment, snapshot.hidden)]
        all_d = np.sort(np.concatenate([d for _, d in found]))
        if all_d.size <= k:
            out.append(found)
            continue
        cut = int(all_d[k - 1])
        for s, ((D, _), segment, hidden) in enumerate(zip(per_segment, snapshot.segments, snapshot.hidden)):
            complete = D.shape[1] == segment.rows or D[j, -1] > cut
            if complete:
                rows, d = found[s]
                found[s] = (rows[d <= cut], d[d <= cut])
            else:
                d, rows = kernels.within(segment.codes, queries[j:j + 1], cut)[0]
                found[s] = _drop_hidden(rows, d, hidden)
        out.append(found)
    return out


class _FlatSpeed:
    """Nanoseconds per scanned code byte of the flat path as measured on recent queries (an
    exponential average), so MIH budgets follow the machine's real speed, cores taken by other
    processes included; starts from the FLAT_NS_PER_BYTE estimate spread over every core."""

    def __init__(self) -> None:
        self.ns_per_byte = FLAT_NS_PER_BYTE / kernels.THREADS

    def record(self, elapsed_ns: int, scanned_bytes: int) -> None:
        if scanned_bytes:
            self.ns_per_byte = 0.8 * self.ns_per_byte + 0.2 * elapsed_ns / scanned_bytes


_FLAT_SPEED = _FlatSpeed()


def _flat_cost(snapshot: Snapshot) -> float:
    return sum(s.codes.nbytes for s in snapshot.segments) * _FLAT_SPEED.ns_per_byte


def _has_mih(snapshot: Snapshot) -> bool:
    return any(s.mih is not None for s in snapshot.segments)


# -- multi-index hashing --------------------------------------------------------------------------
@dataclass
class _Probe:
    """One query's progress through one segment's tables: every row probed so far, deduplicated."""

    segment: Segment
    hidden: np.ndarray
    query: np.ndarray
    keys: list[int] | None  # the query's table keys; None for a segment without tables
    shells: list[int]  # per table, the largest shell probed (-1: none)
    rows: np.ndarray
    dist: np.ndarray

    @classmethod
    def start(cls, segment: Segment, hidden: np.ndarray, query: np.ndarray) -> "_Probe":
        if segment.mih is None:  # small segment: every distance, at once
            rows, d = _drop_hidden(np.arange(segment.rows), kernels.distances(segment.codes, query), hidden)
            return cls(segment, hidden, query, None, [], rows, d)
        mih = segment.mih
        return cls(segment, hidden, query, mih.query_keys(query), [-1] * mih.tables,
                   np.zeros(0, np.int64), np.zeros(0, np.int32))

    def cost_to(self, radius: int) -> float:
        """Estimated ns to probe every shell needed for ``radius`` that is not probed yet."""
        if self.keys is None:
            return 0.0
        mih = self.segment.mih
        cost = 0.0
        for t, limit in enumerate(_shell_limits(mih, radius)):
            for shell in range(self.shells[t] + 1, limit + 1):
                probes = shell_size(mih.key_bits[t], shell)
                cost += SHELL_NS + probes * (PROBE_NS + CANDIDATE_NS * mih.n / 2 ** mih.key_bits[t])
        return cost

    def extend(self, radius: int) -> int:
        """Probe what ``radius`` needs; return how many candidates were verified."""
        if self.keys is None:
            return 0
        mih = self.segment.mih
        new = []
        for t, limit in enumerate(_shell_limits(mih, radius)):
            while self.shells[t] < limit:
                self.shells[t] += 1
                new.append(mih.probe(t, self.keys[t], self.shells[t]))
        if not new:
            return 0
        cand = np.unique(np.concatenate(new))
        cand = np.setdiff1d(cand, self.rows, assume_unique=True)
        rows, d = _drop_hidden(cand, kernels.distances(self.segment.codes[cand], self.query), self.hidden)
        self.rows, self.dist = np.concatenate([self.rows, rows]), np.concatenate([self.dist, d])
        return int(cand.size)

    def within(self, radius: int) -> tuple[np.ndarray, np.ndarray]:
        keep = self.dist <= radius
        return self.rows[keep], self.dist[keep]


def _shell_limits(mih: MultiIndexHash, radius: int) -> list[int]:
    """Largest shell each table must be probed to for ``radius`` (Norouzi et al., section 4): with
    radius = m·s + a, one of the first a+1 substrings is within s, or one of the others within s-1."""
    s, a = divmod(radius, mih.tables)
    return [min(s if t <= a else s - 1, mih.key_bits[t]) for t in range(mih.tables)]


def _knn_mih(snapshot: Snapshot, query: np.ndarray, k: int, budget: float) -> Found | None:
    """Grow the radius until k visible rows lie within it; None when the budget runs out first."""
    start = time.perf_counter_ns()
    probes = [_Probe.start(s, h, query) for s, h in zip(snapshot.segments, snapshot.hidden)]
    bits = snapshot.bits or 0
    expected = _expected_radius(snapshot, k)
    if sum(p.cost_to(expected) for p in probes) > budget:
        budget *= MIH_QUICK_BUDGET / MIH_BUDGET
    for radius in range(bits + 1):
        # the time actually spent (the model's guesses can be off) plus the next step's estimate
        if time.perf_counter_ns() - start + sum(p.cost_to(radius) for p in probes) > budget:
            return None
        for p in probes:
            p.extend(radius)
        if sum(int(np.count_nonzero(p.dist <= radius)) for p in probes) >= k or radius == bits:
            return [p.within(radius) for p in probes]
    return [p.within(bits) for p in probes]


def _expected_radius(snapshot: Snapshot, k: int) -> int:
    """The smallest radius holding k rows by the segments' radius profiles (sampled distances)."""
    expected = np.zeros((snapshot.bits or 0) + 1)
    for segment in snapshot.segments:
        if segment.radius_profile is not None:
            expected += segment.rows * segment.radius_profile
    return int(min(np.searchsorted(expected, k), snapshot.bits or 0))


def _within_mih(snapshot: Snapshot, query: np.ndarray, radius: int, budget: float) -> Found | None:
    radius = min(radius, snapshot.bits or 0)
    probes = [_Probe.start(s, h, query) for s, h in zip(snapshot.segments, snapshot.hidden)]
    if sum(p.cost_to(radius) for p in probes) > budget:
        return None
    for p in probes:
        p.extend(radius)
    return [p.within(radius) for p in probes]


# -- shared helpers -------------------------------------------------------------------------------
def _drop_hidden(rows: np.ndarray, d: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.int64, copy=False)
    d = d.astype(np.int32, copy=False)
    if hidden.size == 0 or rows.size == 0:
        return rows, d
    at = np.minimum(np.searchsorted(hidden, rows), hidden.size - 1)
    keep = hidden[at] != rows
    return rows[keep], d[keep]


def _ordered(snapshot: Snapshot, found: Found, limit: int | None = None) -> pa.Table:
    """Candidates → a RESULT_SCHEMA table in (distance, bucket, key) order, the first ``limit`` rows."""
    parts = []
    for segment, (rows, d) in zip(snapshot.segments, found):
        if rows.size:
            ident = segment.identity.select(["bucket", "key", "etag"]).take(pa.array(rows))
            parts.append(ident.append_column("distance", pa.array(d, pa.int32())))
    if not parts:
        return RESULT_SCHEMA.empty_table()
    table = pa.concat_tables(parts).sort_by(_ORDER)
    return table if limit is None else table.slice(0, limit)
