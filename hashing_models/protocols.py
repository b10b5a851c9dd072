"""Standard retrieval protocols (cifar10, cifar10-1, cifar10-2) as seeded, reproducible index splits.

| protocol  | query                           | training images (train ∪ val)     | database                 |
|-----------|---------------------------------|-----------------------------------|--------------------------|
| cifar10   | 1,000 test images, 100 per class | 5,000, 500 per class, from the rest | the other 54,000         |
| cifar10-1 | the same 1,000                   | the same 5,000 (drawn from the database) | 59,000 (all but query) |
| cifar10-2 | the 10,000 test images           | the 50,000 train images           | the 50,000 train images  |

Indices are image indices of ``parquet_dataset.read_index`` (row numbers of the Parquet file).

Seeds. Every random draw is a per-class uniform sample without replacement: for classes 0..C-1
in order, ``rng.permutation(candidates_of_class)[:n]`` with candidates in ascending index order and
one generator per *stream*, ``np.random.default_rng([seed, stream])``: query = stream 1, training
images = stream 2, validation = stream 3. ``DEFAULT_SEED = 0``. Separate streams mean that the
validation fraction never moves the query or training images, and cifar10 / cifar10-1 share both.

Validation. ``val`` is carved from the protocol's training images, stratified by class
(``round(val_fraction · n_class)`` per class); ``train`` is the rest. Select checkpoints and
hyper-parameters on ``val`` codes as queries against ``train`` codes as database — both labelled
training images — never on ``query``. ``train_all`` (train ∪ val) is the protocol's training set,
e.g. for a final refit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOLS = ("cifar10", "cifar10-1", "cifar10-2")
DEFAULT_SEED = 0
DEFAULT_VAL_FRACTION = 0.1  # cifar10: 50 per class (500); cifar10-2: 500 per class (5,000)

_QUERY_STREAM, _TRAIN_STREAM, _VAL_STREAM = 1, 2, 3
_QUERY_PER_CLASS = 100  # cifar10, cifar10-1
_TRAIN_PER_CLASS = 500  # cifar10, cifar10-1


@dataclass(frozen=True)
class Split:
    """Image indices (int64, ascending) of one protocol's sets; see the module doc for their use."""

    protocol: str  # one of PROTOCOLS
    seed: int  # the seed the random draws came from
    query: np.ndarray  # (Q,) final evaluation queries only
    train: np.ndarray  # fit set: the protocol's training images minus val
    val: np.ndarray  # model-selection queries (against train as database)
    database: np.ndarray  # final evaluation database

    @property
    def train_all(self) -> np.ndarray:
        """The protocol's training images: train ∪ val, ascending."""
        return np.union1d(self.train, self.val)

    def sizes(self) -> dict[str, int]:
        return {"query": len(self.query), "train": len(self.train), "val": len(self.val),
                "database": len(self.database)}


def _per_class_sample(candidates: np.ndarray, labels: np.ndarray, per_class: np.ndarray,
                      rng: np.random.Generator, what: str) -> np.ndarray:
    """Draw per_class[c] indices of class c from ascending ``candidates``, classes in order → ascending."""
    chosen = []
    for label, n in enumerate(per_class):
        of_class = candidates[labels[candidates] == label]
        if len(of_class) < n:
            raise ValueError(f"class {label} has {len(of_class)} candidate images, fewer than the {n} "
                             f"{what} images the protocol draws")
        chosen.append(rng.permutation(of_class)[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def make_split(protocol: str, labels: np.ndarray, is_test: np.ndarray, *, seed: int = DEFAULT_SEED,
               val_fraction: float = DEFAULT_VAL_FRACTION) -> Split:
    """Split images with class ids ``labels`` (N,) and test flags ``is_test`` (N,) by ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    labels, is_test = np.asarray(labels), np.asarray(is_test, dtype=bool)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.shape != is_test.shape:
        raise ValueError(f"labels must be (N,) class ids and is_test (N,) flags; got labels {labels.shape} "
                         f"{labels.dtype} and is_test {is_test.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_classes = int(labels.max()) + 1
    every = np.arange(len(labels), dtype=np.int64)

    if protocol == "cifar10-2":
        query, train_all = every[is_test], every[~is_test]
        database = train_all
    else:
        per_class = lambda n: np.full(n_classes, n)  # noqa: E731
        query = _per_class_sample(every[is_test], labels, per_class(_QUERY_PER_CLASS),
                                  np.random.default_rng([seed, _QUERY_STREAM]), "query")
        rest = np.setdiff1d(every, query)
        train_all = _per_class_sample(rest, labels, per_class(_TRAIN_PER_CLASS),
                                      np.random.default_rng([seed, _TRAIN_STREAM]), "training")
        database = np.setdiff1d(rest, train_all) if protocol == "cifar10" else rest

    val_per_class = np.rint(val_fraction * np.bincount(labels[train_all], minlength=n_classes)).astype(int)
    val = _per_class_sample(train_all, labels, val_per_class, np.random.default_rng([seed, _VAL_STREAM]),
                            "validation")
    return Split(protocol=protocol, seed=seed, query=query, train=np.setdiff1d(train_all, val), val=val,
                 database=database)


def load_split(protocol: str, parquet_path: str | Path, *, seed: int = DEFAULT_SEED,
               val_fraction: float = DEFAULT_VAL_FRACTION) -> Split:
    """``make_split`` on the labels and splits of a dataset file (e.g. cifar10.parquet)."""
    from hashing_models.parquet_dataset import read_index

    index = read_index(parquet_path)
    return make_split(protocol, index.labels, index.is_test, seed=seed, val_fraction=val_fraction)
