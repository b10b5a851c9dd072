"""Protocol splits: sizes, per-class counts, disjointness, determinism; the real cifar10.parquet when present."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import CIFAR10

from hashing_models.parquet_dataset import decode_jpeg, read_index, read_jpegs
from hashing_models.protocols import PROTOCOLS, load_split, make_split


@pytest.fixture(scope="module")
def cifar_like() -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's shape without the file: 10 classes, 1,000 test + 5,000 train images each, shuffled."""
    rng = np.random.default_rng(123)
    labels = np.concatenate([np.repeat(np.arange(10), 1000), np.repeat(np.arange(10), 5000)])
    is_test = np.arange(60_000) < 10_000
    order = rng.permutation(60_000)
    return labels[order].astype(np.int8), is_test[order]


EXPECTED = {  # protocol → (query, train_all, database, query per class, train_all per class)
    "cifar10": (1_000, 5_000, 54_000, 100, 500),
    "cifar10-1": (1_000, 5_000, 59_000, 100, 500),
    "cifar10-2": (10_000, 50_000, 50_000, 1_000, 5_000),
}


def _check_split(split, labels, is_test):
    n_query, n_train, n_db, query_per_class, train_per_class = EXPECTED[split.protocol]
    assert (len(split.query), len(split.train_all), len(split.database)) == (n_query, n_train, n_db)
    assert np.all(np.bincount(labels[split.query], minlength=10) == query_per_class)
    assert np.all(np.bincount(labels[split.train_all], minlength=10) == train_per_class)
    assert np.all(np.bincount(labels[split.val], minlength=10) == train_per_class // 10)
    assert is_test[split.query].all()
    for part in (split.query, split.train, split.val, split.database):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # ascending, no repeats
    assert np.intersect1d(split.train, split.val).size == 0
    assert np.intersect1d(split.query, split.train_all).size == 0
    assert np.intersect1d(split.query, split.database).size == 0
    if split.protocol == "cifar10":
        assert np.intersect1d(split.train_all, split.database).size == 0
        assert len(np.union1d(np.union1d(split.query, split.train_all), split.database)) == 60_000
    if split.protocol == "cifar10-1":
        assert np.isin(split.train_all, split.database).all()
    if split.protocol == "cifar10-2":
        assert np.array_equal(split.train_all, split.database) and not is_test[split.database].any()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sizes_classes_and_disjointness(protocol, cifar_like):
    _check_split(make_split(protocol, *cifar_like), *cifar_like)


def test_splits_are_deterministic_and_seeded(cifar_like):
    a, b = make_split("cifar10", *cifar_like), make_split("cifar10", *cifar_like)
    other = make_split("cifar10", *cifar_like, seed=1)
    for name in ("query", "train", "val", "database"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(other, name))


def test_streams_are_independent(cifar_like):
    # cifar10 and cifar10-1 share query and training images; the validation fraction moves neither.
    base = make_split("cifar10", *cifar_like)
    for split in (make_split("cifar10-1", *cifar_like), make_split("cifar10", *cifar_like, val_fraction=0.2)):
        assert np.array_equal(split.query, base.query)
        assert np.array_equal(split.train_all, base.train_all)
    assert len(make_split("cifar10", *cifar_like, val_fraction=0.2).val) == 1_000


def test_bad_inputs_are_named(cifar_like):
    labels, is_test = cifar_like
    with pytest.raises(ValueError, match="unknown protocol 'nus-wide'"):
        make_split("nus-wide", labels, is_test)
    with pytest.raises(ValueError, match="class 3 has 50 candidate images, fewer than the 100 query"):
        small_class_3 = ~((labels == 3) & is_test) | (np.cumsum((labels == 3) & is_test) <= 50)
        make_split("cifar10", labels[small_class_3], is_test[small_class_3])
    with pytest.raises(ValueError, match="val_fraction"):
        make_split("cifar10", labels, is_test, val_fraction=1.0)


@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"{CIFAR10} is absent (the shared CIFAR-10 Parquet file)")
def test_real_cifar10_file():
    index = read_index(CIFAR10)
    assert len(index) == 60_000 and index.class_names[3] == "cat" and index.is_test.sum() == 10_000
    for protocol in PROTOCOLS:
        _check_split(load_split(protocol, CIFAR10), index.labels, index.is_test)
    # Pinned: the default-seed cifar10 query set. A change here changes every reported number.
    query = load_split("cifar10", CIFAR10).query
    assert hashlib.sha256(query.tobytes()).hexdigest()[:16] == "c6a04daa2a11c995"
    jpegs = read_jpegs(CIFAR10, [59_999, 0, 59_999])
    assert jpegs[0] == jpegs[2] and decode_jpeg(jpegs[1]).size == (32, 32)
    assert index.paths[59_999] == "train/truck/4999.jpg" and index.labels[59_999] == 9
    with pytest.raises(IndexError, match="image index 60000 out of range"):
        read_jpegs(CIFAR10, [60_000])
