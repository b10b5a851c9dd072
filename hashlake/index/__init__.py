"""In-memory Hamming index of one model version's codes, rebuilt from the Parquet shards.

    source.py      where shards are listed and read: the index bucket or a local folder
    visibility.py  the `codes` view's rule (newest row per key, tombstones), in SQL, used by both
    snapshot.py    immutable segments (codes matrix, identity columns, hash tables) and the snapshot
    code_index.py  CodeIndex: loads shards, refresh() adds new ones; one shared index per process
    mih.py         multi-index hashing tables (Norouzi et al.), built in numpy
    search.py      exact knn / within over a snapshot, for Python callers (answered natively)
"""
from hashlake.index.code_index import CodeIndex, shared_index
from hashlake.index.search import knn, within
from hashlake.index.snapshot import Snapshot
from hashlake.index.source import FolderSource, ShardSource, StoreSource

__all__ = ["CodeIndex", "shared_index", "knn", "within", "Snapshot", "FolderSource", "ShardSource", "StoreSource"]
