"""Image sources a user points the demo or `hashlake upload` at: the CIFAR-10 Parquet or a folder.

Both yield ``LabeledImage(name, labels, jpeg)``; a folder's labels are its images' parent folder names.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SAMPLE = Path(__file__).with_name("samples") / "cifar10-sample.parquet"  # 1,000 test images, 100 per class
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class LabeledImage:
    name: str  # object key to upload under, e.g. "test/cat/0001.jpg"
    labels: tuple[str, ...]
    body: bytes


def iter_images(source: Path = SAMPLE, limit: int | None = None, split: str | None = None) -> Iterator[LabeledImage]:
    """Images of a CIFAR-style Parquet file (columns path, label_name, jpeg) or a folder tree."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset {source} does not exist (give a .parquet file or a folder of images)")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:limit]:
            rel = path.relative_to(source)
            labels = (path.parent.name,) if path.parent != source else ()
            yield LabeledImage(rel.as_posix(), labels, path.read_bytes())
        return
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(source, columns=["path", "split", "label_name", "jpeg"])
    if split:
        table = table.filter(pc.equal(table["split"], split))
    if limit is not None:
        table = _balanced(table, limit)
    for row in table.to_pylist():
        yield LabeledImage(row["path"], (row["label_name"],), row["jpeg"])


def _balanced(table, limit: int):
    """The first rows of each class in turn, so a small limit still covers every class."""
    import numpy as np
    import pyarrow as pa

    names = np.asarray(table["label_name"].to_pylist())
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    for name in np.unique(names):  # rank of each row within its class
        idx = order[names[order] == name]
        rank[idx] = np.arange(len(idx))
    picked = np.lexsort((np.arange(len(names)), rank))[:limit]
    return table.take(pa.array(np.sort(picked)))
