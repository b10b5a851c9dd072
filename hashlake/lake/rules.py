"""Which rows are current, written once in SQL: used by the in-memory index (on the rows a change can
affect) and by the ``failures`` view.

A delete row applies to a codes or failures row of its (bucket, key) when
- it names that row's ``version_id`` (one version removed from a versioned bucket: the others stay);
- it names an ``etag`` (the reconciler saw that version vanish from a listing; the row's ``mtime_ns``
  is that version's): to that version, and to every older one;
- it names neither (a delete event or a delete marker) and is not older than the row (``mtime_ns``):
  it hides the versions that existed when it happened, never a later upload, even within the same second.

codes: per (bucket, key) the current row is the newest by ``mtime_ns`` among the rows no delete
applies to (tie: newest ``encoded_at``, then the greatest ``etag``, so the choice never depends on read
order); duplicate rows of one image version collapse to one.

failures: a refusal is current when it is the newest refusal of its key, no delete applies to it,
no code of its model version is as new (the same version, or a newer one, was indexed since), and
it is not ``missing`` (an object gone when read is not a failure of anything that exists).
"""
from __future__ import annotations

IDENTITY_COLUMNS = ("bucket", "key", "etag", "version_id", "mtime_ns", "last_modified", "encoded_at")


def deleted(row: str, deletes: str) -> str:
    """SQL condition: some row of ``deletes`` applies to ``row`` (an alias with bucket, key, etag, version_id,
    mtime_ns)."""
    return f"""EXISTS (
            SELECT 1 FROM {deletes} AS d
            WHERE d.bucket = {row}.bucket AND d.key = {row}.key
              AND CASE WHEN d.version_id IS NOT NULL THEN d.version_id = {row}.version_id
                       WHEN d.etag IS NOT NULL THEN {row}.mtime_ns < d.mtime_ns
                                                    OR ({row}.mtime_ns = d.mtime_ns AND {row}.etag = d.etag)
                       ELSE d.mtime_ns >= {row}.mtime_ns END)"""


def current_codes_sql(rows: str, deletes: str, tiebreak: str = "") -> str:
    """A SELECT of the current rows of ``rows`` (any relation with the identity columns). ``tiebreak``
    appends ORDER BY terms (", _seg, _pos") for callers that need the pick among exact duplicates to be
    deterministic."""
    return f"""
        SELECT r.* FROM {rows} AS r
        WHERE NOT {deleted('r', deletes)}
        QUALIFY row_number() OVER (
            PARTITION BY r.bucket, r.key
            ORDER BY r.mtime_ns DESC, r.encoded_at DESC, r.etag DESC{tiebreak}) = 1
    """


def current_failures_sql(failures: str, codes: str, deletes: str, model_version: str) -> str:
    """A SELECT of the current failures under ``model_version`` (a SQL literal is built here)."""
    version = "'" + model_version.replace("'", "''") + "'"
    return f"""
        SELECT f.bucket, f.key, f.etag, f.version_id, f.reason, f.detail, f.model, f.failed_at
        FROM {failures} AS f
        WHERE f.model = {version} AND f.reason <> 'missing'
          AND NOT {deleted('f', deletes)}
          AND NOT EXISTS (SELECT 1 FROM {codes} AS c
                          WHERE c.model = {version} AND c.bucket = f.bucket AND c.key = f.key
                            AND c.mtime_ns >= f.mtime_ns)
        QUALIFY row_number() OVER (PARTITION BY f.bucket, f.key ORDER BY f.mtime_ns DESC, f.failed_at DESC) = 1
    """
