"""Compaction of the lake, safe while writers commit and queries read (``hashlake lake compact``; the
stack runs it every ``Settings.lake_compact_interval_s``).

1) flush inlined rows (small commits kept in the catalog) into Parquet files;
2) merge adjacent small files into files of DuckLake's target size, so a table of N rows has
   O(N / file size) files whatever the batch size was;
3) expire snapshots older than ``Settings.lake_retention_s`` (time travel reaches back that far);
4) delete the files no retained snapshot references, once they have been unreferenced for
   ``FILE_GRACE_S`` (a query that started on an older snapshot may still be reading one), and files
   no snapshot ever referenced (a writer that died before its commit) once as old.

Each step is one DuckLake call in a transaction of its own; a conflict with a concurrent commit is
retried by DuckLake, and what a step leaves undone the next run does.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import duckdb

from hashlake.config import Settings
from hashlake.lake.connection import open_lake
from hashlake.lake.schema import LAKE, TABLES

log = logging.getLogger(__name__)

FILE_GRACE_S = 600  # longer than any query over the lake's files is expected to run


@dataclass(frozen=True)
class CompactSummary:
    files_before: dict[str, int]  # table → data files referenced by the current snapshot
    files_after: dict[str, int]
    inlined_rows_flushed: int
    snapshots_expired: int
    files_deleted: int
    seconds: float


def compact(settings: Settings) -> CompactSummary:
    started = time.monotonic()
    con = open_lake(settings)
    try:
        before = _file_counts(con)
        flushed = con.execute(f"CALL ducklake_flush_inlined_data('{LAKE}')").fetchall()  # (schema, table, rows)
        inlined = sum(row[-1] for row in flushed)
        con.execute(f"CALL ducklake_merge_adjacent_files('{LAKE}')")
        expired = con.execute(
            f"CALL ducklake_expire_snapshots('{LAKE}', older_than => now() - to_seconds(?::DOUBLE))",
            [settings.lake_retention_s]).fetchall()
        deleted = con.execute(f"CALL ducklake_cleanup_old_files('{LAKE}', older_than => now() - to_seconds(?::DOUBLE))",
                              [FILE_GRACE_S]).fetchall()
        orphans = con.execute(
            f"CALL ducklake_delete_orphaned_files('{LAKE}', older_than => now() - to_seconds(?::DOUBLE))",
            [FILE_GRACE_S]).fetchall()
        after = _file_counts(con)
    finally:
        con.close()
    return CompactSummary(before, after, inlined, len(expired), len(deleted) + len(orphans),
                          round(time.monotonic() - started, 3))


def _file_counts(con) -> dict[str, int]:
    # every table of schema.TABLES (features included); the DuckLake calls above act on the whole lake.
    # Nothing is deleted from features here or elsewhere: its rows are read joined to current codes.
    return {name: con.execute(f"SELECT count(*) FROM ducklake_list_files('{LAKE}', '{name}')").fetchone()[0]
            for name in TABLES}


def compact_periodically(settings: Settings, stop: threading.Event) -> None:
    """Compact every ``Settings.lake_compact_interval_s`` until ``stop`` (the intake runs it); a failed run
    is logged and the next one comes on schedule."""
    from hashlake.lake.catalog_db import CatalogUnavailable

    while not stop.wait(settings.lake_compact_interval_s):
        try:
            summary = compact(settings)
            log.info("lake compacted: %s", summary)
        except (duckdb.Error, CatalogUnavailable) as exc:
            log.error("lake compaction failed (%s: %s); next in %.0f s", exc.__class__.__name__,
                      str(exc).strip()[:300], settings.lake_compact_interval_s)
