"""In-memory Hamming index of one model version's codes, loaded from the lake and refreshed from its change feed.

    lake_source.py where the index reads: a read-only lake connection, every read at a named lake snapshot
    snapshot.py    immutable segments (codes matrix, identity columns, hash tables) and the snapshot
    code_index.py  CodeIndex: the first refresh loads, later ones add the lake's changes; one per process
    mih.py         multi-index hashing tables (Norouzi et al.), built in numpy
    search.py      exact knn / within over a snapshot, for Python callers (answered natively)
"""
from hashlake.index.code_index import CodeIndex, shared_index
from hashlake.index.lake_source import LakeSource
from hashlake.index.search import knn, within
from hashlake.index.snapshot import Snapshot

__all__ = ["CodeIndex", "shared_index", "knn", "within", "Snapshot", "LakeSource"]
