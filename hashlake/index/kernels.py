"""Flat Hamming kernels over one packed code matrix: exact k nearest, radius search, plain distances.

faiss does the scanning (its popcount kernels run ~690M 64-bit codes/s per core here); a single query is
split into row blocks scanned on every core at once (faiss parallelises over queries only, and
releases the GIL, so Python threads give real parallelism); a batch of queries goes to faiss whole and
faiss spreads the queries over its OpenMP threads.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

# Below this many rows per block the thread hand-off (~50 µs) costs more than the scan it saves
# (65,536 64-bit codes scan in ~0.1 ms on one core here).
BLOCK_MIN_ROWS = 1 << 16
THREADS = max(1, os.cpu_count() or 1)
# Each block thread runs faiss with one OpenMP thread: otherwise every call starts its own OpenMP
# team, whose threads then spin-wait and steal the cores from the other blocks (measured: 10× slower).
_POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="hamming", initializer=lambda: faiss.omp_set_num_threads(1))


# faiss's counting variant ("mc": one counter per distance) beats its heap ("hc") for codes of
# 2, 4 and 8 bytes (measured here: 0.84 vs 1.12 ms per 1M 64-bit codes); for 6, 16 and 32 bytes
# the heap is as fast or faster.
_COUNTING_BYTES = (2, 4, 8)


def _knn_hamming(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    variant = "mc" if codes.shape[1] in _COUNTING_BYTES else "hc"
    return faiss.knn_hamming(queries, codes, k, variant=variant)


def word_view(codes: np.ndarray) -> np.ndarray:
    """(n, B) uint8 codes → a zero-copy (n, W) view in the widest unsigned word that divides B bytes
    (popcount of XOR is the same whatever the word width; wider words mean fewer numpy ops)."""
    nbytes = codes.shape[1]
    for dtype in (np.uint64, np.uint32, np.uint16):
        if nbytes % np.dtype(dtype).itemsize == 0:
            return codes.view(dtype)
    return codes


def distances(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distances (n,) int32 of every row of ``codes`` (n, B) to one ``query`` (B,) uint8."""
    if codes.shape[0] == 0:
        return np.zeros(0, np.int32)
    words = word_view(codes)
    q = word_view(query.reshape(1, -1))
    return np.bitwise_count(words ^ q).sum(axis=1, dtype=np.int32)


def _blocks(n: int) -> list[tuple[int, int]]:
    parts = max(1, min(THREADS, n // BLOCK_MIN_ROWS))
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def knn(codes: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of ``codes`` (n, B) to each of ``queries`` (nq, B) → (D, I), both (nq, k),
    sorted by distance; which of the rows tied at the k-th distance are kept is unspecified (the
    caller settles ties). Requires 1 <= k <= n."""
    n = codes.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"knn needs 1 <= k <= rows, got k={k} for {n} rows")
    blocks = _blocks(n)
    if queries.shape[0] > 1 or len(blocks) == 1:
        return _knn_hamming(queries, codes, k)
    parts = list(_POOL.map(lambda ab: _knn_hamming(queries, codes[ab[0]:ab[1]], min(k, ab[1] - ab[0])), blocks))
    D = np.concatenate([d for d, _ in parts], axis=1)
    I = np.concatenate([i + ab[0] for (_, i), ab in zip(parts, blocks)], axis=1)
    order = np.lexsort((I, D), axis=1)[:, :k]  # by distance, then row index
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _range_one_block(queries: np.ndarray, codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nq, n = queries.shape[0], codes.shape[0]
    result = faiss.RangeSearchResult(nq)
    # faiss keeps distances strictly below its radius argument, hence radius + 1
    faiss.hamming_range_search(faiss.swig_ptr(queries), faiss.swig_ptr(codes), nq, n, radius + 1,
                               codes.shape[1], result)
    lims = faiss.rev_swig_ptr(result.lims, nq + 1).copy()
    found = int(lims[-1])
    D = faiss.rev_swig_ptr(result.distances, found).astype(np.int32) if found else np.zeros(0, np.int32)
    I = faiss.rev_swig_ptr(result.labels, found).copy() if found else np.zeros(0, np.int64)
    return lims, D, I


def within(codes: np.ndarray, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every row of ``codes`` within ``radius`` of each query → per query (D int32, I int64), unordered."""
    queries = np.ascontiguousarray(queries)
    if codes.shape[0] == 0:
        return [(np.zeros(0, np.int32), np.zeros(0, np.int64)) for _ in range(queries.shape[0])]
    blocks = _blocks(codes.shape[0])
    if queries.shape[0] > 1 or len(blocks) == 1:
        lims, D, I = _range_one_block(queries, codes, radius)
        return [(D[a:b], I[a:b]) for a, b in zip(lims[:-1], lims[1:])]
    parts = list(_POOL.map(lambda ab: _range_one_block(queries, codes[ab[0]:ab[1]], radius), blocks))
    return [(np.concatenate([d for _, d, _ in parts]),
             np.concatenate([i + ab[0] for (_, _, i), ab in zip(parts, blocks)]))]
