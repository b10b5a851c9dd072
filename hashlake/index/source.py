"""Where shards are read from: the index bucket of the object store, or a local folder with the same layout.

Both answer the same three questions: which Parquet files lie under a prefix (with a fingerprint that
changes when a file is rewritten), read one as an Arrow table, and the address DuckDB's
``read_parquet`` opens for it (``s3://bucket/key`` through httpfs, or an absolute path).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from hashlake.config import Settings
from hashlake.store import ObjectStore

PARQUET_SUFFIX = ".parquet"


@dataclass(frozen=True)
class ShardFile:
    name: str  # path relative to the index root, e.g. "codes/<model_version>/<batch_id>.parquet"
    fingerprint: str  # etag (store) or "<mtime_ns>-<size>" (folder): changes when the shard is rewritten


class ShardSource(Protocol):
    def list(self, prefix: str) -> list[ShardFile]: ...

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table: ...

    def url(self, name: str) -> str: ...

    def describe(self) -> str: ...


class StoreSource:
    """Shards in ``settings.index_bucket``, read through ``ObjectStore`` (the minio SDK)."""

    def __init__(self, store: ObjectStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.bucket = settings.index_bucket

    def list(self, prefix: str) -> list[ShardFile]:
        return sorted((ShardFile(o.key, o.etag) for o in self.store.list(self.bucket, prefix)
                       if o.key.endswith(PARQUET_SUFFIX)), key=lambda f: f.name)

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        body, _ = self.store.get(self.bucket, name)
        return pq.read_table(io.BytesIO(body), columns=columns)

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def describe(self) -> str:
        return f"{self.settings.s3_endpoint}/{self.bucket}"


class FolderSource:
    """Shards under a local folder laid out like the index bucket (``<root>/codes/<version>/…``)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder {self.root} does not exist; pass the folder holding codes/")

    def list(self, prefix: str) -> list[ShardFile]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        files = []
        for path in sorted(base.rglob(f"*{PARQUET_SUFFIX}")):
            st = path.stat()
            files.append(ShardFile(path.relative_to(self.root).as_posix(), f"{st.st_mtime_ns}-{st.st_size}"))
        return files

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.root / name, columns=columns)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def describe(self) -> str:
        return str(self.root)
