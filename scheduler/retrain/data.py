"""The retraining job's data: the lake's labelled images, with their stored backbone features and split.

One query at one lake snapshot (``AT (VERSION => n)``; the run records n, so a resumed run trains on
exactly the data the first attempt saw): the active version's current codes rows (``rules.py``), the
ones with labels, joined with the features the encode workers kept for the active model's backbone.
Images whose features are missing (encoded before features were kept, or with another backbone) are
counted, not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hashing_models.protocols import Split
from hashlake.lake.features import decode_features, features_of_current_codes_sql
from hashlake.lake.schema import LAKE
from hashlake.splits import split_sql


@dataclass(frozen=True)
class LabelledImages:
    """N labelled images of the lake, in (bucket, key) order."""

    snapshot: int  # the lake snapshot they were read at
    refs: pa.Table  # (N,) bucket, key, etag
    features: np.ndarray  # (N, D) float32, the backbone's pooled features
    labels: np.ndarray  # (N, C) int8 multi-hot
    label_names: list[str]  # (C,) the labels' names, sorted
    split: np.ndarray  # (N,) str: train | validation | evaluation (hashlake.splits)
    active_codes: np.ndarray  # (N, bits/8) uint8: each image's code under the active version
    without_features: int  # labelled images of the active version that have no features row

    def split_indices(self) -> Split:
        """The trainer's Split: fit on train, select on validation; queries = evaluation, database = train."""
        def where(name: str) -> np.ndarray:
            return np.flatnonzero(self.split == name).astype(np.int64)

        train = where("train")
        return Split(protocol="lake", seed=0, query=where("evaluation"), train=train, val=where("validation"),
                     database=train)

    def take(self, rows: np.ndarray) -> "LabelledImages":
        """The images at positions ``rows`` (ascending), e.g. those the candidate could encode."""
        rows = np.asarray(rows, dtype=np.int64)
        return LabelledImages(snapshot=self.snapshot, refs=self.refs.take(pa.array(rows)), features=self.features[rows],
                              labels=self.labels[rows], label_names=self.label_names, split=self.split[rows],
                              active_codes=self.active_codes[rows], without_features=self.without_features)

    def counts(self) -> dict[str, int]:
        return {"images": len(self.split), **{f"{name}_images": int((self.split == name).sum())
                                               for name in ("train", "validation", "evaluation")},
                "labels": len(self.label_names), "without_features": self.without_features}


def current_snapshot(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute(f"FROM {LAKE}.current_snapshot()").fetchone()[0])


def features_sql(model_version: str, at: int, *, labelled: bool) -> str:
    """The current codes rows of ``model_version`` at snapshot ``at`` (labelled ones only, or all), each
    with its ``feature`` blob of the backbone ``$backbone`` (NULL when it has none) and its ``split``,
    in (bucket, key) order."""
    return f"""
        SELECT t.*, {split_sql('t.bucket', 't.key')} AS split
        FROM ({features_of_current_codes_sql(model_version, at)}) AS t
        {"WHERE len(t.labels) > 0" if labelled else ""}
        ORDER BY t.bucket, t.key"""


def load_labelled(con: duckdb.DuckDBPyConnection, model_version: str, backbone: str, at: int) -> LabelledImages:
    table = con.execute(features_sql(model_version, at, labelled=True), {"backbone": backbone}).to_arrow_table()
    has = pc.is_valid(table.column("feature")).to_numpy(zero_copy_only=False)
    without = int(len(has) - has.sum())
    table = table.filter(pa.array(has))
    label_lists = table.column("labels").to_pylist()
    names = sorted({name for labels in label_lists for name in labels})
    column = {name: c for c, name in enumerate(names)}
    labels = np.zeros((table.num_rows, len(names)), dtype=np.int8)
    for row, names_of_row in enumerate(label_lists):
        labels[row, [column[name] for name in names_of_row]] = 1
    codes = table.column("code").to_pylist()
    nbytes = len(codes[0]) if codes else 0
    return LabelledImages(
        snapshot=at, refs=table.select(["bucket", "key", "etag"]),
        features=decode_features(table.column("feature")), labels=labels, label_names=names,
        split=np.asarray(table.column("split").to_pylist(), dtype=object),
        active_codes=np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), nbytes),
        without_features=without)

