"""Per-query histograms of database codes by Hamming distance, total and relevant, from the extension.

The engine of offline retrieval reports (``hashlake.report``): for Q queries over N database codes,
one O(N) pass per query on every core the process may use, no sort and no (Q, N) matrix. With
``stable=True`` a second pass also gives, exactly, the sums that the stable tie rule (ties broken by
database order, as ``hashing_models.evaluate``) needs: they depend on the order inside each tie
group, which histograms alone do not hold.

Labels go in as bitmasks: ``label_masks`` turns class ids or multi-hot rows into them.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from hashing_models.codes import as_code_matrix
from hashlake.native.loader import _library

MAX_LABELS = 256  # multi-hot labels: 4 uint64 words per item
MAX_KS = 16  # REPORT_MAX_KS in src/report.c


@dataclass(frozen=True)
class LabelMasks:
    """Labels in the kernel's form. ``words == 0``: (n, 1) int64 class ids, relevant = equal ids;
    ``words > 0``: (n, words) uint64 multi-hot bitmasks (bit c of word c // 64), relevant = a bit in common."""

    query: np.ndarray
    db: np.ndarray
    words: int
    n_labels: int  # classes: max id + 1, or the multi-hot width


def _check_labels(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (class ids) or ({n}, C) (multi-hot), got {labels.shape}")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: class ids must be integers, got dtype {labels.dtype}")
        if n and labels.min() < 0:
            raise ValueError(f"{name}: class ids must be >= 0, got {labels.min()}")
    elif labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name}: a multi-hot label matrix must hold only 0 and 1")
    return labels


def _bitmasks(labels: np.ndarray, n_labels: int, words: int) -> np.ndarray:
    """(n,) ids or (n, C) multi-hot → (n, words) uint64, bit c of word c // 64 = label c."""
    hot = labels.astype(bool) if labels.ndim == 2 else np.zeros((labels.shape[0], n_labels), bool)
    if labels.ndim == 1:
        hot[np.arange(labels.shape[0]), labels] = True
    padded = np.zeros((hot.shape[0], words * 64), bool)
    padded[:, :hot.shape[1]] = hot
    # packbits little-endian per byte, bytes little-endian per word: bit c of the word is label c
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def label_masks(query_labels, db_labels, n_queries: int, n_db: int) -> LabelMasks:
    """Check both label sets (as ``hashing_models.evaluate`` takes them) and bring them to the kernel's form."""
    q = _check_labels(query_labels, n_queries, "query_labels")
    d = _check_labels(db_labels, n_db, "db_labels")
    n_labels = max(x.shape[1] if x.ndim == 2 else int(x.max(initial=-1)) + 1 for x in (q, d))
    if q.ndim == 2 and d.ndim == 2 and q.shape[1] != d.shape[1]:
        raise ValueError(f"query_labels have {q.shape[1]} classes, db_labels {d.shape[1]}")
    for x, name in ((q, "query_labels"), (d, "db_labels")):
        if x.ndim == 1 and x.size and x.max() >= n_labels:
            raise ValueError(f"{name}: class id {x.max()} does not exist in a {n_labels}-class multi-hot matrix")
    if q.ndim == 1 and d.ndim == 1:
        return LabelMasks(np.ascontiguousarray(q, np.int64)[:, None], np.ascontiguousarray(d, np.int64)[:, None],
                          0, n_labels)
    if n_labels > MAX_LABELS:
        raise ValueError(f"multi-hot labels with {n_labels} classes: reports take at most {MAX_LABELS} "
                         f"(single-label data can pass class ids, of any number)")
    words = max(1, -(-n_labels // 64))
    return LabelMasks(_bitmasks(q, n_labels, words), _bitmasks(d, n_labels, words), words, n_labels)


@dataclass(frozen=True)
class Histograms:
    """What one pass (two with the stable sums) over the database gives per query."""

    all: np.ndarray  # (Q, K+1) int64: database codes at each distance 0..K
    relevant: np.ndarray  # (Q, K+1) int64: relevant ones among them
    ks: tuple[int, ...]  # the k of ap_at_sum / hits_at
    ap_sum: np.ndarray | None  # (Q,) stable rule: Σ precision at the rank of each relevant item; None if not asked
    ap_at_sum: np.ndarray | None  # (Q, len(ks)): the same over relevant items ranked <= k
    hits_at: np.ndarray | None  # (Q, len(ks)) int64: relevant items ranked <= k


def _pointer(array: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if array is None else array.ctypes.data)


def histograms(query_codes, db_codes, masks: LabelMasks, *, ks: tuple[int, ...] = (),
               stable: bool = True) -> Histograms:
    """Histograms of ``db_codes`` (N, B) by distance to each of ``query_codes`` (Q, B), total and
    relevant by ``masks``; with ``stable``, the stable tie rule's sums (ranks 1-based, k <= N)."""
    q = as_code_matrix(query_codes)
    d = as_code_matrix(db_codes, q.shape[1])
    if q.shape[1] > 32:
        raise ValueError(f"codes of {q.shape[1] * 8} bits: the extension takes at most 256")
    if len(ks) > MAX_KS:
        raise ValueError(f"at most {MAX_KS} values of k, got {len(ks)}")
    bits, n_q = q.shape[1] * 8, q.shape[0]
    lib = _library()
    fn = lib.hashlake_report_histograms
    fn.restype = ctypes.c_int32
    hist_all = np.zeros((n_q, bits + 1), np.int64)
    hist_rel = np.zeros((n_q, bits + 1), np.int64)
    ks_arr = np.ascontiguousarray(ks, np.int64)
    ap_sum = np.zeros(n_q) if stable else None
    ap_at_sum = np.zeros((n_q, len(ks))) if stable else None
    hits_at = np.zeros((n_q, len(ks)), np.int64) if stable else None
    q_labels, d_labels = np.ascontiguousarray(masks.query), np.ascontiguousarray(masks.db)
    status = fn(ctypes.c_int32(q.shape[1]), ctypes.c_int32(masks.words), ctypes.c_int64(n_q), _pointer(q),
                _pointer(q_labels), ctypes.c_int64(d.shape[0]), _pointer(d), _pointer(d_labels),
                ctypes.c_int32(len(ks)), _pointer(ks_arr), _pointer(hist_all), _pointer(hist_rel),
                _pointer(ap_sum), _pointer(ap_at_sum), _pointer(hits_at))
    if status == -1:
        raise MemoryError("hashlake_hamming: out of memory computing report histograms")
    if status != 0:
        raise ValueError(f"hashlake_report_histograms refused its arguments (status {status})")
    return Histograms(hist_all, hist_rel, tuple(int(k) for k in ks), ap_sum, ap_at_sum, hits_at)
