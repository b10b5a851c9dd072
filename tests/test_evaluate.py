"""Retrieval metrics against brute-force references: stable ranking, exhaustive tie orders, conventions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hashing_models.codes import SUPPORTED_BITS, hamming_reference, pack_bits
from hashing_models.evaluate import evaluate_retrieval, hamming_distances, mean_average_precision


# --------------------------------------------------------------------------- brute-force references


def _relevant(query_label, db_labels) -> list[bool]:
    """Shares at least one label; labels are ids or multi-hot rows."""
    def as_set(label):
        label = np.asarray(label)
        return {int(label)} if label.ndim == 0 else set(np.flatnonzero(label).tolist())
    q = as_set(query_label)
    return [bool(q & as_set(d)) for d in db_labels]


def _ranking_metrics(ranked_rel: list[bool], ks: list[int]) -> dict:
    """AP@ALL, AP@k, P@k of one ranked relevance list, by a plain loop over ranks."""
    total = sum(ranked_rel)
    hits, precisions = 0, []
    for rank, is_rel in enumerate(ranked_rel, start=1):
        if is_rel:
            hits += 1
            precisions.append((hits / rank, rank))
    out = {"ap": sum(p for p, _ in precisions) / total}
    for k in ks:
        top = [p for p, rank in precisions if rank <= k]
        out[("ap", k)] = sum(top) / len(top) if top else 0.0
        out[("p", k)] = len(top) / min(k, len(ranked_rel))
    return out


def _reference(q_codes, q_labels, d_codes, d_labels, ks, exhaustive_ties=False) -> dict:
    """Means over scored queries; with ``exhaustive_ties`` the mean over every order of every tie group."""
    dist = hamming_reference(q_codes, d_codes)
    per_query = []
    for qi in range(len(q_codes)):
        rel = _relevant(q_labels[qi], d_labels)
        if not any(rel):
            continue
        if not exhaustive_ties:
            order = sorted(range(len(d_codes)), key=lambda j: (dist[qi, j], j))
            per_query.append(_ranking_metrics([rel[j] for j in order], ks))
            continue
        outcomes = []
        for perm in itertools.permutations(range(len(d_codes))):
            if all(dist[qi, a] <= dist[qi, b] for a, b in zip(perm, perm[1:])):
                outcomes.append(_ranking_metrics([rel[j] for j in perm], ks))
        per_query.append({key: np.mean([o[key] for o in outcomes]) for key in outcomes[0]})
    return {key: np.mean([m[key] for m in per_query]) for key in per_query[0]}


def _codes_from_pool(rng: np.random.Generator, n: int, pool: int, bits: int) -> np.ndarray:
    """n packed codes drawn from `pool` distinct random codes, so that Hamming ties are frequent."""
    distinct = pack_bits(rng.integers(0, 2, size=(pool, bits)))
    return distinct[rng.integers(0, pool, size=n)]


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_hamming_distances_match_reference(bits):
    rng = np.random.default_rng(bits)
    q, d = (pack_bits(rng.integers(0, 2, size=(n, bits))) for n in (7, 33))
    d[0] = ~q[0]  # maximal distance K (256 does not fit uint8)
    np.testing.assert_array_equal(hamming_distances(q, d), hamming_reference(q, d))
    assert hamming_distances(q, d)[0, 0] == bits


# --------------------------------------------------------------------------- stable ranking


@pytest.mark.parametrize("bits,multi_label", [(16, False), (48, True), (128, False), (256, True)])
def test_matches_bruteforce_stable_ranking(bits, multi_label):
    rng = np.random.default_rng(7)
    q_codes, d_codes = _codes_from_pool(rng, 25, 12, bits), _codes_from_pool(rng, 300, 12, bits)
    if multi_label:
        q_labels, d_labels = ((rng.random((n, 5)) < 0.25).astype(np.uint8) for n in (25, 300))
    else:
        q_labels, d_labels = rng.integers(0, 6, 25), rng.integers(0, 6, 300)
    ks = [1, 10, 250, 1000]
    got = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels, topk=ks, block_elements=1000)
    ref = _reference(q_codes, q_labels, d_codes, d_labels, ks)
    assert got.map == pytest.approx(ref["ap"], abs=1e-12)
    for k in ks:
        assert got.map_at[k] == pytest.approx(ref[("ap", k)], abs=1e-12)
        assert got.precision_at[k] == pytest.approx(ref[("p", k)], abs=1e-12)


def test_ties_are_broken_by_database_index():
    # All database codes equal: the ranking is the database order itself.
    codes = np.zeros((4, 2), dtype=np.uint8)
    got = evaluate_retrieval(codes[:1], np.array([1]), codes, np.array([0, 1, 0, 1]), topk=[2])
    assert got.map == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert got.map_at[2] == pytest.approx(1 / 2)
    assert got.precision_at[2] == pytest.approx(1 / 2)
    # Expected over the 4! orders: relevant items occupy 2 of 4 uniformly random slots.
    expected = np.mean([_ranking_metrics([i in s for i in range(4)], [])["ap"]
                        for s in itertools.combinations(range(4), 2)])
    assert got.map_tie_expected == pytest.approx(expected)


def test_multi_hot_and_class_ids_agree():
    rng = np.random.default_rng(3)
    q_codes, d_codes = _codes_from_pool(rng, 20, 9, 32), _codes_from_pool(rng, 200, 9, 32)
    q_ids, d_ids = rng.integers(0, 4, 20), rng.integers(0, 4, 200)
    by_ids = evaluate_retrieval(q_codes, q_ids, d_codes, d_ids)
    by_hot = evaluate_retrieval(q_codes, np.eye(4, dtype=bool)[q_ids], d_codes, d_ids)  # mixed forms
    assert by_hot.summary() == pytest.approx(by_ids.summary())


# --------------------------------------------------------------------------- tie-expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_db=st.integers(1, 7), pool=st.integers(1, 4),
       multi_label=st.booleans())
def test_tie_expected_matches_exhaustive_tie_orders(seed, n_db, pool, multi_label):
    rng = np.random.default_rng(seed)
    q_codes, d_codes = _codes_from_pool(rng, 3, pool, 8), _codes_from_pool(rng, n_db, pool, 8)
    if multi_label:
        q_labels, d_labels = ((rng.random((n, 3)) < 0.4).astype(np.int8) for n in (3, n_db))
        q_labels[:, 0] = 1  # every query has a label
        d_labels[0] = q_labels[0]  # ... and query 0 is scored
    else:
        q_labels, d_labels = rng.integers(0, 3, 3), rng.integers(0, 3, n_db)
        d_labels[0] = q_labels[0]
    ks = [1, 2, 4, 9]
    got = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels, topk=ks)
    ref = _reference(q_codes, q_labels, d_codes, d_labels, ks, exhaustive_ties=True)
    assert got.map_tie_expected == pytest.approx(ref["ap"], abs=1e-12)
    for k in ks:
        assert got.map_at_tie_expected[k] == pytest.approx(ref[("ap", k)], abs=1e-12)
        assert got.precision_at_tie_expected[k] == pytest.approx(ref[("p", k)], abs=1e-12)


def test_tie_expected_matches_monte_carlo_on_large_ties():
    # Few distinct codes and 600 items: tie groups of ~100, far beyond exhaustive enumeration.
    rng = np.random.default_rng(11)
    q_codes, d_codes = _codes_from_pool(rng, 4, 6, 16), _codes_from_pool(rng, 600, 6, 16)
    q_labels, d_labels = rng.integers(0, 3, 4), rng.integers(0, 3, 600)
    got = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels, topk=[50])
    dist, draws = hamming_reference(q_codes, d_codes), 4000
    ap, ap50 = np.zeros((4, draws)), np.zeros((4, draws))
    for qi in range(4):
        for t in range(draws):
            ranked = (d_labels == q_labels[qi])[np.lexsort((rng.random(600), dist[qi]))]  # random tie order
            precision = np.cumsum(ranked) / np.arange(1, 601)
            ap[qi, t] = precision[ranked].mean()
            ap50[qi, t] = precision[:50][ranked[:50]].mean() if ranked[:50].any() else 0.0
    sem = lambda sample: sample.std(axis=1) / np.sqrt(draws)  # noqa: E731
    assert np.all(np.abs(got.ap_tie_expected - ap.mean(axis=1)) < 5 * sem(ap))
    assert abs(got.map_at_tie_expected[50] - ap50.mean()) < 5 * np.sqrt((sem(ap50) ** 2).sum()) / 4


def test_tie_expected_is_exact_for_database_sized_groups():
    # Groups of ~12,500 after up to ~37,500 items: the closed form's harmonic differences must not
    # lose precision against the direct per-position sum Σ_p (r/n)(R0 + 1 + (p-1)(r-1)/(n-1))/(N0 + p).
    rng = np.random.default_rng(4)
    d_codes = np.array([[0], [1], [3], [7]], dtype=np.uint8)[rng.integers(0, 4, 50_000)]
    d_labels = rng.integers(0, 10, 50_000)
    got = evaluate_retrieval(np.zeros((1, 1), dtype=np.uint8), np.array([0]), d_codes, d_labels)
    dist = np.bitwise_count(d_codes[:, 0])  # distances 0..3 to the all-zero query code
    total, n_before, r_before = 0.0, 0, 0
    for d in range(4):
        n, r = int((dist == d).sum()), int(((dist == d) & (d_labels == 0)).sum())
        p = np.arange(1, n + 1)
        total += ((r / n) * (r_before + 1 + (p - 1) * (r - 1) / (n - 1)) / (n_before + p)).sum()
        n_before, r_before = n_before + n, r_before + r
    assert got.map_tie_expected == pytest.approx(total / r_before, rel=1e-12)


def test_tie_expected_equals_stable_without_ties():
    # 8 distinct distances to 8 items: no tie group has two members.
    q = np.zeros((1, 1), dtype=np.uint8)
    d = np.array([[0], [1], [3], [7], [15], [31], [63], [127]], dtype=np.uint8)
    got = evaluate_retrieval(q, np.array([0]), d, np.array([0, 1, 0, 0, 1, 1, 0, 1]), topk=[3])
    assert got.map_tie_expected == pytest.approx(got.map)
    assert got.map_at_tie_expected[3] == pytest.approx(got.map_at[3])


# --------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("bits", [16, 256])
def test_exclude_self_equals_leaving_each_query_out(bits):
    rng = np.random.default_rng(8)
    codes, labels = _codes_from_pool(rng, 40, 6, bits), rng.integers(0, 3, 40)
    got = evaluate_retrieval(codes, labels, codes, labels, topk=[5, 39], exclude_self=True, block_elements=100)
    one_by_one = [evaluate_retrieval(codes[i : i + 1], labels[i : i + 1], np.delete(codes, i, axis=0),
                                     np.delete(labels, i), topk=[5, 39]) for i in range(40)]
    np.testing.assert_allclose(got.ap, [m.map for m in one_by_one])
    np.testing.assert_allclose(got.ap_tie_expected, [m.map_tie_expected for m in one_by_one])
    for k in (5, 39):
        assert got.map_at_tie_expected[k] == pytest.approx(np.mean([m.map_at_tie_expected[k] for m in one_by_one]))
        assert got.precision_at[k] == pytest.approx(np.mean([m.precision_at[k] for m in one_by_one]))
    assert got.precision_radius == pytest.approx(np.mean([m.precision_radius for m in one_by_one]))
    assert mean_average_precision(codes, labels, codes, labels, exclude_self=True) == pytest.approx(got.map)
    assert mean_average_precision(codes, labels, codes, labels, exclude_self=True, tie_expected=True) == \
        pytest.approx(got.map_tie_expected)
    with pytest.raises(ValueError, match="exclude_self needs"):
        evaluate_retrieval(codes[:3], labels[:3], codes, labels, exclude_self=True)


def test_queries_without_relevant_items_are_excluded():
    rng = np.random.default_rng(5)
    q_codes, d_codes = _codes_from_pool(rng, 3, 5, 16), _codes_from_pool(rng, 50, 5, 16)
    d_labels = rng.integers(0, 2, 50)
    with_orphan = evaluate_retrieval(q_codes, np.array([0, 9, 1]), d_codes, d_labels)
    without = evaluate_retrieval(q_codes[[0, 2]], np.array([0, 1]), d_codes, d_labels)
    assert (with_orphan.n_queries, with_orphan.n_scored) == (3, 2)
    assert np.isnan(with_orphan.ap[1]) and np.isnan(with_orphan.ap_tie_expected[1])
    assert with_orphan.summary() == pytest.approx(without.summary())
    with pytest.raises(ValueError, match="no query has a relevant item"):
        evaluate_retrieval(q_codes, np.array([7, 8, 9]), d_codes, d_labels)


def test_perfect_codes_score_one():
    codes = np.repeat(np.arange(5, dtype=np.uint8)[:, None] * 51, 2, axis=1)  # one code per class
    labels = np.arange(5)
    got = evaluate_retrieval(codes, labels, np.repeat(codes, 10, axis=0), np.repeat(labels, 10), topk=[10])
    assert got.map == got.map_tie_expected == got.map_at[10] == got.precision_at[10] == 1.0
    assert got.precision_radius == 1.0


def test_radius_precision_and_pr_curve():
    # Query 0: ball of radius 2 holds items 0 (relevant) and 1 (not); query 1: its ball is empty.
    q = pack_bits(np.zeros((2, 8), dtype=np.uint8))
    q[1] = 0b11111111
    d_bits = np.zeros((4, 8), dtype=np.uint8)
    d_bits[1, :2] = 1  # distance 2 from query 0
    d_bits[2, :4] = 1  # distance 4
    d_bits[3, :3] = 1  # distance 3
    d = pack_bits(d_bits)  # distances from query 1: 8, 6, 4, 5
    got = evaluate_retrieval(q, np.array([0, 1]), d, np.array([0, 1, 0, 1]), topk=[1])
    assert got.precision_radius == pytest.approx((1 / 2 + 0.0) / 2)  # empty ball scores 0
    pr = got.pr_curve
    np.testing.assert_allclose(pr.precision[2] * pr.coverage[2], got.precision_radius)
    assert pr.coverage[2] == 0.5 and pr.precision[2] == 0.5
    assert pr.recall[-1] == 1.0 and np.all(np.diff(pr.recall) >= 0)
    assert pr.recall[2] == pytest.approx((1 / 2 + 0 / 2) / 2)
    assert got.pr_curve.radius.tolist() == list(range(9))


def test_k_beyond_database_means_all():
    rng = np.random.default_rng(2)
    q_codes, d_codes = _codes_from_pool(rng, 5, 4, 16), _codes_from_pool(rng, 30, 4, 16)
    got = evaluate_retrieval(q_codes, rng.integers(0, 2, 5), d_codes, rng.integers(0, 2, 30), topk=[30, 10_000])
    assert got.map_at[10_000] == pytest.approx(got.map) == pytest.approx(got.map_at[30])
    assert got.map_at_tie_expected[10_000] == pytest.approx(got.map_tie_expected)
    assert got.precision_at[10_000] == got.precision_at[30]


@pytest.mark.parametrize("kwargs,match", [
    ({"query_labels": np.array([0.5, 1.0])}, "must be integers"),
    ({"query_labels": np.array([0, 1, 2])}, r"must have shape \(2,\)"),
    ({"db_labels": np.array([[0, 2], [1, 0], [1, 1]])}, "only 0 and 1"),
    ({"db_codes": np.zeros((3, 4), dtype=np.uint8)}, "16 bits were expected"),
    ({"radius": 17}, "radius must lie in 0..16"),
    ({"topk": [0]}, "topk values must be"),
])
def test_bad_inputs_are_named(kwargs, match):
    args = {"query_codes": np.zeros((2, 2), dtype=np.uint8), "query_labels": np.array([0, 1]),
            "db_codes": np.zeros((3, 2), dtype=np.uint8), "db_labels": np.array([0, 1, 1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_retrieval(**args)
