"""The encode side's face of the lake: what a model version already holds, and one transaction per batch.

A batch commits its codes, its failures and its images' backbone features (``features.py``) in one
DuckLake transaction: readers see all of a batch or none of it. Commits of at most ``Settings.lake_inline_rows`` rows are inlined in the catalog (no
Parquet file per batch); compaction writes them out later (``maintenance.py``).

Idempotence: the encode runner asks ``known`` before reading anything and skips the image versions a
model version already holds (a duplicate event, a retried or redelivered batch cost no read and no
forward), and the commit inserts only rows that are not there yet, so a batch committed twice leaves
one row per (bucket, key, etag, model), and one feature row per image version and backbone: the model
versions of one backbone share an image version's feature row.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from hashlake.config import Settings
from hashlake.lake.catalog_db import CatalogUnavailable
from hashlake.lake.connection import open_lake
from hashlake.lake.schema import CODES_SCHEMA, DELETES_SCHEMA, FAILURES_SCHEMA, FEATURES_SCHEMA, LAKE

log = logging.getLogger(__name__)


class LakeUnavailable(RuntimeError):
    """The catalog or the data files could not be reached: transient, retry the batch later."""


_VERSIONS_SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("etag", pa.string()),
                              ("mtime_ns", pa.int64())])


# A refusal that says the version is settled: not ``missing`` (nothing was there to decide about).
SETTLED = {"codes": "TRUE", "failures": "o.reason <> 'missing'"}


def same_version_or_newer(held: str, new: str) -> str:
    """SQL condition: the row ``held`` is of the image version ``new`` names, or of a newer upload of the
    same bytes. Orders from a listing have millisecond precision and the same version's event sequencer
    nanoseconds, so the new order is compared at its millisecond; an upload of identical bytes after a
    delete (same etag, later order) is a new version and is encoded again."""
    return (f"{held}.bucket = {new}.bucket AND {held}.key = {new}.key AND {held}.etag IS NOT DISTINCT FROM {new}.etag "
            f"AND ({new}.mtime_ns IS NULL OR {ordered_at_or_after(held, new)})")


def ordered_at_or_after(held: str, new: str) -> str:
    """SQL condition: the row ``held`` has an order at or above ``new``'s, compared at ``new``'s millisecond."""
    return f"{held}.mtime_ns >= {new}.mtime_ns - {new}.mtime_ns % 1000000"


def order_floor(mtime_ns: pa.Array | pa.ChunkedArray) -> str:
    """SQL condition on a held row ``o``: its order is at or above the lowest millisecond of ``mtime_ns``
    (the new rows' orders). ``same_version_or_newer`` implies it for every new row, so adding it changes
    no answer; as a constant, the catalog prunes with it every data file whose largest order is older
    (a batch of new uploads reads the inlined rows and the newest files, not the whole table). TRUE when
    an order is missing (such a row matches any held order)."""
    if mtime_ns.null_count or not len(mtime_ns):
        return "TRUE"
    low = pc.min(mtime_ns).as_py()
    return f"o.mtime_ns >= {int(low - low % 1_000_000)}"


class LakeWriter:
    """One per process (a DuckDB connection is used by one thread at a time: calls are serialized)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()

    def known(self, model_version: str, versions: Iterable, *,
              tables: tuple[str, ...] = ("codes", "failures")) -> set[tuple[str, str, str]]:
        """The (bucket, key, etag) among ``versions`` (objects with bucket, key, etag, mtime_ns attributes)
        whose image version already has a code or a refusal (other than ``missing``) under ``model_version``.
        Each table read costs the catalog's round trips (~20 ms on a busy 2-core machine) and the data
        files that can hold rows at or above the versions' lowest order (``order_floor``): ``tables``
        narrows it."""
        refs = pa.Table.from_pylist([{"bucket": v.bucket, "key": v.key, "etag": v.etag, "mtime_ns": v.mtime_ns}
                                     for v in versions], schema=_VERSIONS_SCHEMA)
        if not refs.num_rows:
            return set()
        floor = order_floor(refs.column("mtime_ns"))
        query = " UNION ".join(f"""
            SELECT n.bucket, n.key, n.etag FROM _hashlake_refs AS n
            WHERE EXISTS (SELECT 1 FROM {LAKE}.{table} AS o
                          WHERE o.model = $model AND {SETTLED[table]} AND {floor}
                            AND {same_version_or_newer('o', 'n')})"""
            for table in tables)
        with self._session() as con:
            con.register("_hashlake_refs", refs)
            try:
                return {tuple(r) for r in con.execute(query, {"model": model_version}).fetchall()}
            finally:
                con.unregister("_hashlake_refs")

    def commit(self, codes: pa.Table | None, failures: pa.Table | None, features: pa.Table | None = None) -> None:
        """Insert a batch's codes, failures and features (tables of CODES_SCHEMA / FAILURES_SCHEMA /
        FEATURES_SCHEMA) in one transaction, skipping code and failure rows whose image version the model
        version already holds, and feature rows whose image version and backbone are already stored
        (by this batch's first delivery, or by another model version on the same backbone).

        Each check is folded into its INSERT (… WHERE NOT EXISTS): it reads the table once more inside the
        transaction (it makes a redelivered batch whose first delivery committed after its ``known`` query
        add nothing) and costs no extra round trip; it names the batch's lowest order as a constant
        (``order_floor``) and the features' check its backbone, so it reads the files that can hold them
        only. A feature row is one per image version (an upload of the same bytes after a delete, a
        later order, adds one; readers take one per current code). Two deliveries committing at the
        same instant can still both insert, and the current-rows rule (and the features readers, ``features.py``) collapses such
        exact duplicates. Feature rows are never deleted: they are read joined to current codes."""
        parts = [(name, table.cast(schema)) for name, table, schema in
                 (("codes", codes, CODES_SCHEMA), ("failures", failures, FAILURES_SCHEMA),
                  ("features", features, FEATURES_SCHEMA))
                 if table is not None and table.num_rows]
        if not parts:
            return
        with self._session() as con:
            for name, table in parts:
                con.register(f"_hashlake_new_{name}", table)
            try:
                con.execute("BEGIN")
                for name, table in parts:
                    if name == "features":
                        for backbone in pc.unique(table["backbone"]).to_pylist():  # one per batch
                            con.execute(f"""
                                INSERT INTO {LAKE}.features SELECT n.* FROM _hashlake_new_features AS n
                                WHERE n.backbone = $backbone
                                  AND NOT EXISTS (SELECT 1 FROM {LAKE}.features AS o
                                                  WHERE o.backbone = $backbone AND {order_floor(table["mtime_ns"])}
                                                    AND o.bucket = n.bucket AND o.key = n.key AND o.etag = n.etag
                                                    AND {ordered_at_or_after('o', 'n')})""",
                                        {"backbone": backbone})
                        continue
                    con.execute(f"""
                        INSERT INTO {LAKE}.{name} SELECT n.* FROM _hashlake_new_{name} AS n
                        WHERE NOT EXISTS (SELECT 1 FROM {LAKE}.{name} AS o
                                          WHERE o.model = n.model AND {SETTLED[name]}
                                            AND {order_floor(table["mtime_ns"])}
                                            AND {same_version_or_newer('o', 'n')})""")
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            finally:
                for name, _ in parts:
                    con.unregister(f"_hashlake_new_{name}")

    def commit_deletes(self, deletes: pa.Table) -> None:
        """Insert delete rows (DELETES_SCHEMA) in one transaction. A repeated delete changes nothing that
        the first did not, so duplicates are harmless and not checked."""
        if not deletes.num_rows:
            return
        with self._session() as con:
            con.register("_hashlake_new_deletes", deletes.cast(DELETES_SCHEMA))
            try:
                con.execute(f"INSERT INTO {LAKE}.deletes SELECT * FROM _hashlake_new_deletes")
            finally:
                con.unregister("_hashlake_new_deletes")

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _session(self):
        return _Session(self)


_SHARED: dict[tuple, LakeWriter] = {}
_SHARED_LOCK = threading.Lock()


def shared_writer(settings: Settings) -> LakeWriter:
    """The process's writer for the lake ``settings`` name (one connection per process and lake; keyed by
    pid too, since a connection made before a fork must not be used by the child)."""
    ident = (os.getpid(), settings.pg_host, settings.pg_port, settings.pg_database, settings.lake_path)
    with _SHARED_LOCK:
        if ident not in _SHARED:
            _SHARED[ident] = LakeWriter(settings)
        return _SHARED[ident]


class _Session:
    """Serializes use of the writer's connection and turns connection trouble into ``LakeUnavailable``
    (after which the connection is reopened on next use: it may be broken)."""

    def __init__(self, writer: LakeWriter):
        self.writer = writer

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        self.writer._lock.acquire()
        try:
            if self.writer._con is None:
                self.writer._con = open_lake(self.writer.settings)
            return self.writer._con
        except CatalogUnavailable as exc:
            self.writer._lock.release()
            raise LakeUnavailable(str(exc)) from None
        except duckdb.Error as exc:
            self.writer._lock.release()
            raise LakeUnavailable(f"cannot open the lake: {exc}") from None

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is not None and _transient(exc):
                con, self.writer._con = self.writer._con, None
                if con is not None:
                    con.close()
                raise LakeUnavailable(f"the lake did not answer ({kind.__name__}): {str(exc).strip()[:500]}") from exc
            return False
        finally:
            self.writer._lock.release()


def _transient(exc: BaseException) -> bool:
    # IO: the data files' store; Connection/Transaction: the catalog, or a commit that kept conflicting.
    return isinstance(exc, (duckdb.IOException, duckdb.ConnectionException, duckdb.TransactionException,
                            duckdb.HTTPException))


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # no transaction open (BEGIN failed), or the connection is gone
