"""Image datasets stored as one Parquet file (path, split, label, label_name, jpeg): labels eagerly, JPEGs by index.

An image's *index* is its row number in the file; for ``cifar10.parquet`` rows are sorted by
``path`` (``test/...`` rows 0–9,999, then ``train/...``), so indices are stable across readers and
are what ``protocols.Split`` holds. The file's path is always an argument: a user's machine has no
``../shared``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# The classes of cifar10.parquet's `label` column, in label order (alphabetical).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_INDEX_COLUMNS = ("path", "split", "label", "label_name")


@dataclass(frozen=True)
class ImageIndex:
    """Everything about a dataset file except the image bytes; arrays are aligned by image index."""

    parquet_path: Path  # the file the indices refer to
    paths: np.ndarray  # (N,) object (str): e.g. "train/cat/0000.jpg"
    labels: np.ndarray  # (N,) class ids, the file's integer type (int8 for CIFAR-10)
    is_test: np.ndarray  # (N,) bool: split == "test"
    class_names: tuple[str, ...]  # class_names[label]

    def __len__(self) -> int:
        return len(self.labels)


def _open(parquet_path: str | Path, columns: Sequence[str]):
    import pyarrow.parquet as pq  # heavy optional import, kept out of `import hashing_models`

    path = Path(parquet_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist (for CIFAR-10: pass the path of cifar10.parquet)")
    file = pq.ParquetFile(path)
    missing = [c for c in columns if c not in file.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {file.schema_arrow.names}")
    return file


def read_index(parquet_path: str | Path) -> ImageIndex:
    """Read paths, labels and splits (not the JPEGs: ~0.1 s for CIFAR-10's 60,000 rows)."""
    file = _open(parquet_path, _INDEX_COLUMNS)
    table = file.read(columns=list(_INDEX_COLUMNS))
    labels = table["label"].to_numpy()
    names = table["label_name"].to_numpy(zero_copy_only=False)
    ids, first = np.unique(labels, return_index=True)
    name_of = dict(zip(ids.tolist(), names[first].tolist()))
    class_names = tuple(name_of.get(i, "") for i in range(int(ids.max(initial=-1)) + 1))
    split = table["split"].to_numpy(zero_copy_only=False)
    unknown = set(np.unique(split)) - {"train", "test"}
    if unknown:
        raise ValueError(f"{parquet_path}: column 'split' holds {sorted(unknown)}; expected 'train' or 'test'")
    return ImageIndex(parquet_path=Path(parquet_path), paths=table["path"].to_numpy(zero_copy_only=False),
                      labels=labels, is_test=split == "test", class_names=class_names)


def read_jpegs(parquet_path: str | Path, indices: Sequence[int] | np.ndarray) -> list[bytes]:
    """JPEG bytes of the images at ``indices`` (any order, repeats allowed), in that order.

    Reads only the row groups (5,000 rows each in cifar10.parquet) that hold a requested index,
    and decodes nothing: all 60,000 CIFAR-10 JPEGs are ~55 MB of bytes (0.3 s), decoded ~180 MB.
    """
    file = _open(parquet_path, ("jpeg",))
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_rows = file.metadata.num_rows
    if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        bad = indices[(indices < 0) | (indices >= n_rows)][0]
        raise IndexError(f"image index {bad} out of range for {parquet_path} ({n_rows} rows)")
    group_sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
    group_of = np.searchsorted(group_starts, indices, side="right") - 1

    out: list[bytes | None] = [None] * indices.size
    for group in np.unique(group_of):
        column = file.read_row_group(int(group), columns=["jpeg"])["jpeg"]
        positions = np.flatnonzero(group_of == group)
        for position, jpeg in zip(positions, column.take(indices[positions] - group_starts[group]).to_pylist()):
            out[position] = jpeg
    return out  # type: ignore[return-value]


def decode_jpeg(data: bytes):
    """JPEG bytes → RGB ``PIL.Image.Image`` (decoded now; PIL's lazy open would keep the buffer)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image
