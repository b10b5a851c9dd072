"""Where the in-memory index reads from: the lake, through a read-only connection of the index's own.

Every read names the lake snapshot it reads at (``AT (VERSION => n)``), so that codes and deletes loaded
together are one consistent state, and a refresh reads exactly the changes between two snapshots
(``ducklake_table_changes``): no listing, no fingerprints.
"""
from __future__ import annotations

import threading

import duckdb
import pyarrow as pa

from hashlake.config import Settings
from hashlake.lake.connection import attach_for_queries
from hashlake.lake.schema import LAKE
from hashlake.lake.rules import IDENTITY_COLUMNS

# What the index keeps of each codes row besides the identity: search_rows answers these from memory.
DETAIL_COLUMNS = ("size", "labels")
CODE_COLUMNS = (*IDENTITY_COLUMNS, *DETAIL_COLUMNS, "code")
DELETE_COLUMNS = ("bucket", "key", "version_id", "etag", "mtime_ns")


class SnapshotGone(LookupError):
    """The snapshot a refresh starts from was expired by compaction: load afresh."""


class LakeSource:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()  # one DuckDB connection, one caller at a time

    def describe(self) -> str:
        s = self.settings
        return f"postgresql://{s.pg_host}:{s.pg_port}/{s.pg_database} {s.lake_path}"

    def current_snapshot(self) -> int:
        return self._query(f"FROM {LAKE}.current_snapshot()").column(0)[0].as_py()

    def codes(self, model_version: str, at: int) -> pa.Table:
        """Every codes row of ``model_version`` at snapshot ``at``."""
        return self._query(f"SELECT {', '.join(CODE_COLUMNS)} FROM {LAKE}.codes AT (VERSION => {int(at)}) "
                           f"WHERE model = $model", {"model": model_version})

    def codes_of_keys(self, model_version: str, keys: pa.Table, at: int) -> pa.Table:
        """The codes rows of ``model_version`` at ``at`` whose (bucket, key) is in ``keys``."""
        with self._lock:
            con = self._connection()
            con.register("_hashlake_keys", keys)
            try:
                return con.execute(
                    f"SELECT {', '.join(CODE_COLUMNS)} FROM {LAKE}.codes AT (VERSION => {int(at)}) "
                    f"SEMI JOIN _hashlake_keys USING (bucket, key) WHERE model = $model",
                    {"model": model_version}).to_arrow_table()
            finally:
                con.unregister("_hashlake_keys")

    def deletes(self, at: int) -> pa.Table:
        return self._query(f"SELECT {', '.join(DELETE_COLUMNS)} FROM {LAKE}.deletes AT (VERSION => {int(at)})")

    def changes(self, model_version: str, start: int, end: int) -> tuple[pa.Table, pa.Table]:
        """(codes rows of ``model_version``, delete rows) inserted after snapshot ``start`` up to ``end``.
        Raises ``SnapshotGone`` when ``start`` has been expired."""
        def inserted(table: str, columns: tuple[str, ...], where: str = "") -> str:
            return (f"SELECT {', '.join(columns)} FROM ducklake_table_changes('{LAKE}', 'main', '{table}', "
                    f"{int(start) + 1}, {int(end)}) WHERE change_type IN ('insert', 'update_postimage') {where}")
        try:
            codes = self._query(inserted("codes", CODE_COLUMNS, "AND model = $model"), {"model": model_version})
            deletes = self._query(inserted("deletes", DELETE_COLUMNS))
        except duckdb.InvalidInputException as exc:
            if "snapshot" in str(exc).lower():
                raise SnapshotGone(str(exc)) from None
            raise
        return codes, deletes

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _query(self, sql: str, params: dict | None = None) -> pa.Table:
        with self._lock:
            return self._connection().execute(sql, params or {}).to_arrow_table()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
            try:
                attach_for_queries(con, self.settings)
            except BaseException:
                con.close()
                raise
            self._con = con
        return self._con
