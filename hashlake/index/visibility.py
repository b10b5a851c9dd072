"""The visibility rule of the ``codes`` view, written once in SQL and used by the view and by the index.

Per (bucket, key) the current row is the one with the newest ``last_modified`` (tie: newest
``encoded_at``, then the greatest ``etag``, so the choice never depends on read order); duplicate
rows of one (bucket, key, etag) collapse to one. A row is hidden when a tombstone for its
(bucket, key) has ``deleted_at >= last_modified``; a row without ``last_modified`` is hidden by any
tombstone of its key (its age is unknown, so a delete is taken to be newer).

Tombstones are applied before the newest row is picked: this gives the same answer as picking first
(a tombstone that hides the newest row hides every older one too) and lets the index work
incrementally, because a row once hidden stays hidden as more shards arrive.
"""
from __future__ import annotations

IDENTITY_COLUMNS = ("bucket", "key", "etag", "last_modified", "encoded_at")


def visible_rows_sql(rows: str, tombstones: str, tiebreak: str = "") -> str:
    """A SELECT of the current rows of ``rows`` (any relation with the identity columns) given
    ``tombstones`` (bucket, key, deleted_at). ``tiebreak`` appends ORDER BY terms (", _row") for
    callers that need the pick among exact duplicates to be deterministic."""
    return f"""
        SELECT r.* FROM {rows} AS r
        WHERE NOT EXISTS (
            SELECT 1 FROM {tombstones} AS t
            WHERE t.bucket = r.bucket AND t.key = r.key
              AND (r.last_modified IS NULL OR t.deleted_at >= r.last_modified))
        QUALIFY row_number() OVER (
            PARTITION BY r.bucket, r.key
            ORDER BY r.last_modified DESC NULLS LAST, r.encoded_at DESC, r.etag DESC{tiebreak}) = 1
    """
