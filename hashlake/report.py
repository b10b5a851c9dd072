"""Offline retrieval reports: every metric of ``hashing_models.evaluate`` from per-distance histograms.

The native extension counts, for each query, the database codes at each Hamming distance and the
relevant ones among them (``hashlake.native.histograms``: one O(N) pass per query on every core, no
sort, no (Q, N) matrix). From those two histograms alone follow exactly, in closed form:
mAP@ALL expected over random tie orders, mAP@k and precision@k expected likewise, precision within a
Hamming radius and the precision-recall curve (``hashing_models.evaluate``'s own closed forms are
used, so both agree by construction and its conventions hold: see its module doc).

The stable tie rule (ties broken by database order) is not a function of the histograms: a relevant
item's rank depends on where it sits inside its tie group. With ``stable=True`` (the default) the
extension makes a second O(N) pass that gives each relevant item's exact rank, from which mAP@ALL,
mAP@k and precision@k under that rule follow; pass the database in the order of the tie rule you
mean (for the lake: sorted by (bucket, key), the rule of ``search``). ``stable=False`` skips that
pass (about 3x less work) and leaves those figures NaN.

Per-label AP: the mean AP (both rules) over the scored queries that carry each label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hashing_models.codes import as_code_matrix
from hashing_models.evaluate import (
    RetrievalMetrics,
    _check_topk,
    _harmonic,
    _pr_curve,
    _tie_expected_block,
)
from hashlake.native.histograms import Histograms, histograms, label_masks

# Queries per block of the closed forms: mAP@1000 builds (block, 1001) float64 temporaries.
CLOSED_FORM_QUERIES = 1024


@dataclass(frozen=True)
class Report:
    """One model version's retrieval figures on one (queries, database) pair."""

    metrics: RetrievalMetrics  # the figures of hashing_models.evaluate, same names and conventions
    label_ap: np.ndarray = field(repr=False)  # (C,) mean stable AP@ALL of scored queries carrying label c (NaN: none)
    label_ap_tie_expected: np.ndarray = field(repr=False)  # (C,) the same, tie-expected
    label_queries: np.ndarray = field(repr=False)  # (C,) int: scored queries carrying label c
    histograms: Histograms = field(repr=False)
    # where the figures come from, when known (``hashlake.report_lake`` fills them in)
    label_names: tuple[str, ...] = ()  # the C label names, in the order of label_ap
    lake_snapshot: int | None = None  # the lake snapshot the codes were read at
    split: str | None = None  # the queries' split; the database is "train"


def multi_hot(label_lists: Sequence[Sequence[str] | None], names: Sequence[str] | None = None,
              ) -> tuple[np.ndarray, list[str]]:
    """Label lists as the lake stores them (one list of label names per image, None for none) → a
    (N, C) int8 multi-hot matrix and its C label names (``names`` fixes their order, e.g. to share it
    between queries and database; by default the sorted names found). A name not in ``names`` is an
    error naming it."""
    found = sorted({name for labels in label_lists if labels for name in labels})
    names = list(names) if names is not None else found
    column = {name: c for c, name in enumerate(names)}
    unknown = [name for name in found if name not in column]
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the {len(names)} label names given")
    out = np.zeros((len(label_lists), len(names)), np.int8)
    for i, labels in enumerate(label_lists):
        for name in labels or ():
            out[i, column[name]] = 1
    return out, names


def _query_label_matrix(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(Q,) ids or (Q, C) multi-hot → (Q, C) bool."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(bool)
    out = np.zeros((labels.shape[0], n_labels), bool)
    out[np.arange(labels.shape[0]), labels] = True
    return out


def retrieval_report(query_codes, query_labels, db_codes, db_labels, *, topk: Sequence[int] = (100, 1000),
                     radius: int = 2, stable: bool = True) -> Report:
    """Rank the whole database for every query by Hamming distance and compute every metric.

    query_codes (Q, B), db_codes (N, B): packed uint8 codes, K = 8·B bits (at most 256).
    query_labels / db_labels: (Q,) / (N,) class ids, or (Q, C) / (N, C) multi-hot (C <= 256).
    topk: the k of mAP@k and precision@k (k > N means ALL). radius: of ``precision_radius``.
    """
    q_codes = as_code_matrix(query_codes)
    d_codes = as_code_matrix(db_codes, q_codes.shape[1])
    n_q, n_db, bits = q_codes.shape[0], d_codes.shape[0], 8 * q_codes.shape[1]
    if n_q == 0 or n_db == 0:
        raise ValueError(f"need at least one query and one database code, got {n_q} queries and {n_db} codes")
    if not 0 <= radius <= bits:
        raise ValueError(f"radius must lie in 0..{bits} for {bits}-bit codes, got {radius}")
    masks = label_masks(query_labels, db_labels, n_q, n_db)
    ks = _check_topk(topk)
    ks_eff = tuple(min(k, n_db) for k in ks)
    hist = histograms(q_codes, d_codes, masks, ks=ks_eff, stable=stable)

    n_relevant = hist.relevant.sum(axis=1)
    scored = n_relevant > 0
    n_scored = int(scored.sum())
    if n_scored == 0:
        raise ValueError("no query has a relevant item in the database: check that query_labels and "
                         "db_labels use the same classes")

    # tie-expected figures, in blocks of queries (closed forms of hashing_models.evaluate)
    harmonic = _harmonic(n_db)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_db + 1)))])
    ap_tie = np.zeros(n_q)
    ap_at_tie = np.zeros((n_q, len(ks)))
    p_at_tie = np.zeros((n_q, len(ks)))
    for start in range(0, n_q, CLOSED_FORM_QUERIES):
        stop = min(n_q, start + CLOSED_FORM_QUERIES)
        ap_tie[start:stop], ap_at_tie[start:stop], p_at_tie[start:stop] = _tie_expected_block(
            hist.all[start:stop], hist.relevant[start:stop], ks_eff, harmonic, log_factorial)

    # stable-rule figures from the second pass's sums
    with np.errstate(divide="ignore", invalid="ignore"):
        if stable:
            ap = hist.ap_sum / n_relevant
            ap_at = np.where(hist.hits_at > 0, hist.ap_at_sum / hist.hits_at, 0.0)
            p_at = hist.hits_at / np.asarray(ks_eff, np.float64)[None, :]
        else:
            ap = np.full(n_q, np.nan)
            ap_at = p_at = np.full((n_q, len(ks)), np.nan)
    ap[~scored] = np.nan
    ap_tie[~scored] = np.nan

    pr_curve, ball_precision = _pr_curve(hist.all[scored], hist.relevant[scored])

    def mean(per_query: np.ndarray) -> float:
        return float(per_query[scored].mean())

    metrics = RetrievalMetrics(
        bits=bits, n_queries=n_q, n_database=n_db, n_scored=n_scored,
        map=mean(ap), map_tie_expected=mean(ap_tie),
        map_at={k: mean(ap_at[:, j]) for j, k in enumerate(ks)},
        map_at_tie_expected={k: mean(ap_at_tie[:, j]) for j, k in enumerate(ks)},
        precision_at={k: mean(p_at[:, j]) for j, k in enumerate(ks)},
        precision_at_tie_expected={k: mean(p_at_tie[:, j]) for j, k in enumerate(ks)},
        radius=radius, precision_radius=float(ball_precision[:, radius].mean()),
        pr_curve=pr_curve, ap=ap, ap_tie_expected=ap_tie,
    )

    carries = _query_label_matrix(query_labels, masks.n_labels) & scored[:, None]  # (Q, C)
    label_queries = carries.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        label_ap = np.where(carries, np.nan_to_num(ap)[:, None], 0.0).sum(axis=0) / label_queries
        label_ap_tie = np.where(carries, np.nan_to_num(ap_tie)[:, None], 0.0).sum(axis=0) / label_queries
    if not stable:
        label_ap = np.full(masks.n_labels, np.nan)
    return Report(metrics, label_ap, label_ap_tie, label_queries, hist)
