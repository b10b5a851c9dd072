"""Offline retrieval reports from the extension's histograms: every figure equal to
hashing_models.evaluate's (1e-6) on random codes with heavy ties and on the cifar10 protocol with real
codes; label forms; errors; the Markdown report with its PR plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hashing_models.evaluate import evaluate_retrieval
from hashlake.native import histograms as native_histograms
from hashlake.report import retrieval_report
from hashlake.report_markdown import write_report

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10.parquet"
TOL = 1e-6


def assert_same_metrics(ours, ref) -> None:
    assert (ours.bits, ours.n_queries, ours.n_database, ours.n_scored) == \
        (ref.bits, ref.n_queries, ref.n_database, ref.n_scored)
    for name in ("map", "map_tie_expected", "precision_radius"):
        assert getattr(ours, name) == pytest.approx(getattr(ref, name), abs=TOL), name
    for name in ("map_at", "map_at_tie_expected", "precision_at", "precision_at_tie_expected"):
        assert getattr(ours, name).keys() == getattr(ref, name).keys(), name
        for k in getattr(ref, name):
            assert getattr(ours, name)[k] == pytest.approx(getattr(ref, name)[k], abs=TOL), (name, k)
    np.testing.assert_allclose(ours.ap, ref.ap, atol=TOL, equal_nan=True)
    np.testing.assert_allclose(ours.ap_tie_expected, ref.ap_tie_expected, atol=TOL, equal_nan=True)
    for name in ("radius", "precision", "recall", "coverage"):
        np.testing.assert_allclose(getattr(ours.pr_curve, name), getattr(ref.pr_curve, name), atol=TOL,
                                   equal_nan=True, err_msg=name)


def random_labels(rng, n: int, form: str, classes: int) -> np.ndarray:
    if form == "ids":
        return rng.integers(0, classes, n)
    return (rng.random((n, classes)) < 0.25).astype(np.int8)


@pytest.mark.parametrize("bits", [16, 48, 64, 256])
@pytest.mark.parametrize("forms", [("ids", "ids"), ("hot", "hot"), ("ids", "hot")])
def test_equals_evaluate_on_random_codes(bits, forms):
    """16-bit codes over 3,000 items: every distance holds a large tie group, so the stable and the
    tie-expected figures differ and both are checked; k past the database means ALL."""
    rng = np.random.default_rng(bits + len(forms[0]) * 7 + len(forms[1]))
    n_q, n_db, classes = 150, 3_000, 6
    q_codes = rng.integers(0, 256, (n_q, bits // 8), dtype=np.uint8)
    d_codes = rng.integers(0, 256, (n_db, bits // 8), dtype=np.uint8)
    q_labels = random_labels(rng, n_q, forms[0], classes)
    d_labels = random_labels(rng, n_db, forms[1], classes)
    if forms[0] == "ids":
        q_labels[:5] = classes  # a class the database lacks: unscored queries
        if forms[1] == "hot":
            d_labels = np.concatenate([d_labels, np.zeros((n_db, 1), np.int8)], axis=1)
    topk = (1, 10, 1000, 5000)
    ours = retrieval_report(q_codes, q_labels, d_codes, d_labels, topk=topk)
    ref = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels, topk=topk)
    assert_same_metrics(ours.metrics, ref)
    if bits == 16:
        assert abs(ref.map - ref.map_tie_expected) > 1e-4  # the two rules really differ here


def test_many_labels_and_the_label_limit():
    rng = np.random.default_rng(3)
    q_codes = rng.integers(0, 256, (40, 8), dtype=np.uint8)
    d_codes = rng.integers(0, 256, (900, 8), dtype=np.uint8)
    q_labels = (rng.random((40, 200)) < 0.02).astype(np.int8)
    d_labels = (rng.random((900, 200)) < 0.02).astype(np.int8)
    assert_same_metrics(retrieval_report(q_codes, q_labels, d_codes, d_labels).metrics,
                        evaluate_retrieval(q_codes, q_labels, d_codes, d_labels))
    # single-label data: class ids of any number
    q_ids, d_ids = rng.integers(0, 1000, 40), rng.integers(0, 1000, 900)
    q_ids[:20] = d_ids[:20]
    assert_same_metrics(retrieval_report(q_codes, q_ids, d_codes, d_ids).metrics,
                        evaluate_retrieval(q_codes, q_ids, d_codes, d_ids))
    with pytest.raises(ValueError, match="multi-hot labels with 300 classes: reports take at most 256"):
        retrieval_report(q_codes, np.zeros((40, 300), np.int8), d_codes, np.zeros((900, 300), np.int8))


def test_bad_input_names_it():
    codes = np.zeros((4, 8), np.uint8)
    with pytest.raises(ValueError, match=r"query_labels must have shape \(4,\)"):
        retrieval_report(codes, np.zeros(3, int), codes, np.zeros(4, int))
    with pytest.raises(ValueError, match="db_labels: class ids must be integers"):
        retrieval_report(codes, np.zeros(4, int), codes, np.zeros(4))
    with pytest.raises(ValueError, match="code has 128 bits"):
        retrieval_report(codes, np.zeros(4, int), np.zeros((4, 16), np.uint8), np.zeros(4, int))
    with pytest.raises(ValueError, match="no query has a relevant item"):
        retrieval_report(codes, np.zeros(4, int), codes, np.ones(4, int))
    with pytest.raises(ValueError, match="radius must lie in 0..64"):
        retrieval_report(codes, np.zeros(4, int), codes, np.zeros(4, int), radius=65)


def test_histograms_alone_skip_the_stable_pass():
    rng = np.random.default_rng(4)
    q_codes = rng.integers(0, 256, (30, 8), dtype=np.uint8)
    d_codes = rng.integers(0, 256, (2_000, 8), dtype=np.uint8)
    q_labels, d_labels = rng.integers(0, 4, 30), rng.integers(0, 4, 2_000)
    quick = retrieval_report(q_codes, q_labels, d_codes, d_labels, stable=False)
    full = retrieval_report(q_codes, q_labels, d_codes, d_labels)
    assert np.isnan(quick.metrics.map) and quick.histograms.ap_sum is None
    assert quick.metrics.map_tie_expected == full.metrics.map_tie_expected
    assert (quick.histograms.all == full.histograms.all).all()
    assert (quick.histograms.all.sum(axis=1) == 2_000).all()


def _pixel_features(parquet: Path) -> tuple[np.ndarray, np.ndarray]:
    """8x8 RGB thumbnails (JPEG DCT scaling, no full decode) of every image: (60000, 192) float32, labels."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(parquet, columns=["jpeg", "label"])
    features = np.empty((table.num_rows, 192), np.float32)
    for i, data in enumerate(table.column("jpeg").to_pylist()):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (8, 8))
        features[i] = np.asarray(image.convert("RGB").resize((8, 8)), np.float32).reshape(-1) / 255.0
    return features, table.column("label").to_numpy()


@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"needs the CIFAR-10 file at {CIFAR10}")
def test_equals_evaluate_on_the_cifar10_protocol_with_real_codes():
    """The cifar10 protocol (1,000 queries, 54,000 database images) with real codes: ITQ at 32 bits
    fitted on the protocol's training images' pixel thumbnails."""
    from hashing_models.baselines import make_baseline
    from hashing_models.protocols import load_split

    split = load_split("cifar10", CIFAR10)
    features, labels = _pixel_features(CIFAR10)
    itq = make_baseline("itq", 32).fit(features[split.train_all])
    q_codes, d_codes = itq.encode(features[split.query]), itq.encode(features[split.database])
    q_labels, d_labels = labels[split.query], labels[split.database]
    ours = retrieval_report(q_codes, q_labels, d_codes, d_labels, topk=(100, 1000))
    ref = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels, topk=(100, 1000))
    assert_same_metrics(ours.metrics, ref)
    assert ref.map_tie_expected > 0.12  # better than chance (0.1): the codes carry the images' content
    # per-label AP: the mean AP of each class's 100 queries
    for c in range(10):
        assert ours.label_queries[c] == 100
        assert ours.label_ap_tie_expected[c] == pytest.approx(np.nanmean(ref.ap_tie_expected[q_labels == c]), abs=TOL)
        assert ours.label_ap[c] == pytest.approx(np.nanmean(ref.ap[q_labels == c]), abs=TOL)


def test_markdown_report_compares_versions(tmp_path):
    rng = np.random.default_rng(6)
    q_labels, d_labels = rng.integers(0, 3, 60), rng.integers(0, 3, 1_500)
    d_codes = rng.integers(0, 256, (1_500, 8), dtype=np.uint8)
    # "good": codes that carry the label in their first byte; "random": codes that do not
    good_db = d_codes.copy()
    good_db[:, 0] = d_labels * 85
    good_q = rng.integers(0, 256, (60, 8), dtype=np.uint8)
    good_q[:, 0] = q_labels * 85
    reports = {"v-good": retrieval_report(good_q, q_labels, good_db, d_labels),
               "v-random": retrieval_report(rng.integers(0, 256, (60, 8), dtype=np.uint8), q_labels, d_codes, d_labels)}
    path = write_report(reports, tmp_path / "out", label_names=["cat", "dog", "ship"], notes=["split: evaluation"])
    text = path.read_text()
    assert "| metric | v-good | v-random |" in text
    assert f"| mAP@ALL, tie-expected | {reports['v-good'].metrics.map_tie_expected:.4f} | " \
           f"{reports['v-random'].metrics.map_tie_expected:.4f} |" in text
    assert "| ship |" in text and "![precision-recall curves](pr_curve.png)" in text
    assert reports["v-good"].metrics.map_tie_expected > reports["v-random"].metrics.map_tie_expected + 0.2
    png = (tmp_path / "out" / "pr_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match="label_names has 2 names for 3 labels"):
        write_report(reports, tmp_path / "bad", label_names=["cat", "dog"])
    assert not (tmp_path / "bad" / "report.md").exists()


def test_kernel_refuses_more_than_16_ks():
    masks = native_histograms.label_masks(np.zeros(2, int), np.zeros(3, int), 2, 3)
    with pytest.raises(ValueError, match="at most 16 values of k"):
        native_histograms.histograms(np.zeros((2, 8), np.uint8), np.zeros((3, 8), np.uint8), masks, ks=tuple(range(1, 18)))


def test_lake_label_lists_become_multi_hot():
    from hashlake.report import multi_hot

    matrix, names = multi_hot([["cat"], ["dog", "cat"], None, []])
    assert names == ["cat", "dog"]
    assert matrix.tolist() == [[1, 0], [1, 1], [0, 0], [0, 0]]
    db, _ = multi_hot([["dog"], ["ship"]], names=["cat", "dog", "ship"])
    assert db.tolist() == [[0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"labels \['ship'\] are not among the 2 label names given"):
        multi_hot([["ship"]], names=["cat", "dog"])
