"""Where the in-memory index reads from: the lake, through a read-only connection of the index's own.

Every read names the lake snapshot it reads at (``AT (VERSION => n)``), so that codes and deletes loaded
together are one consistent state, and a refresh reads exactly the rows inserted between two snapshots
(``ducklake_table_insertions``): no listing, no fingerprints.

The refresh reads insertions, not ``ducklake_table_changes``: the index wants the rows a snapshot range
added ('insert' and 'update_postimage' of the change feed, which are exactly the insertions), and the
change-feed macro (insertions LEFT JOIN deletions UNION ALL deletions LEFT JOIN insertions: four scans,
each reading the catalog's inlined rows) can stop for ever in DuckDB 1.5.5 / DuckLake on a PostgreSQL
catalog: every scheduler thread idle, the catalog connection idle after its COPY, and ``interrupt()``
does not end it. It did so on every try over 100,800 inlined rows on top of 10M rows in one file, and
the same UNION ALL with fewer columns did over 1M, where each of its two joins alone, and the
insertions scan alone, return in under 2 s.

Every read is bounded (``Settings.index_refresh_timeout_s`` for a refresh's reads of the changes,
``index_load_timeout_s`` for a whole-version load): a statement that has not returned by then is
interrupted, and one that still does not return is abandoned with its connection (the next read opens
another) and reported as ``LakeReadStalled``, so that no refresh waits for ever.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

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
# After interrupt() a running statement stops at its next check: this long at most, else it is stuck.
INTERRUPT_GRACE_S = 2.0

log = logging.getLogger(__name__)


class SnapshotGone(LookupError):
    """The snapshot a refresh starts from was expired by compaction: load afresh."""


class LakeReadStalled(TimeoutError):
    """A read of the lake did not return within its bound (``Settings.index_refresh_timeout_s`` or
    ``index_load_timeout_s``)."""


class LakeSource:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()  # one DuckDB connection, one caller at a time

    def describe(self) -> str:
        s = self.settings
        return f"postgresql://{s.pg_host}:{s.pg_port}/{s.pg_database} {s.lake_path}"

    def current_snapshot(self) -> int:
        return self._query("the current snapshot", f"FROM {LAKE}.current_snapshot()", load=False).column(0)[0].as_py()

    def codes(self, model_version: str, at: int) -> pa.Table:
        """Every codes row of ``model_version`` at snapshot ``at``."""
        return self._query(f"the codes of {model_version} at snapshot {int(at)}",
                           f"SELECT {', '.join(CODE_COLUMNS)} FROM {LAKE}.codes AT (VERSION => {int(at)}) "
                           f"WHERE model = $model", {"model": model_version}, load=True)

    def codes_of_keys(self, model_version: str, keys: pa.Table, at: int) -> pa.Table:
        """The codes rows of ``model_version`` at ``at`` whose (bucket, key) is in ``keys``."""
        def read(con: duckdb.DuckDBPyConnection) -> pa.Table:
            con.register("_hashlake_keys", keys)
            try:
                return con.execute(
                    f"SELECT {', '.join(CODE_COLUMNS)} FROM {LAKE}.codes AT (VERSION => {int(at)}) "
                    f"SEMI JOIN _hashlake_keys USING (bucket, key) WHERE model = $model",
                    {"model": model_version}).to_arrow_table()
            finally:
                con.unregister("_hashlake_keys")
        return self._bounded(f"the codes of {keys.num_rows} keys of {model_version} at snapshot {int(at)}", read,
                             load=False)

    def deletes(self, at: int) -> pa.Table:
        return self._query(f"the deletes at snapshot {int(at)}",
                           f"SELECT {', '.join(DELETE_COLUMNS)} FROM {LAKE}.deletes AT (VERSION => {int(at)})", load=True)

    def changes(self, model_version: str, start: int, end: int) -> tuple[pa.Table, pa.Table]:
        """(codes rows of ``model_version``, delete rows) inserted after snapshot ``start`` up to ``end``.
        Raises ``SnapshotGone`` when ``start`` has been expired."""
        def inserted(table: str, columns: tuple[str, ...], where: str = "") -> str:
            return (f"SELECT {', '.join(columns)} FROM ducklake_table_insertions('{LAKE}', 'main', '{table}', "
                    f"{int(start) + 1}, {int(end)}) {where}")
        span = f"snapshots {int(start) + 1}..{int(end)}"
        try:
            codes = self._query(f"the codes of {model_version} inserted in {span}",
                                inserted("codes", CODE_COLUMNS, "WHERE model = $model"), {"model": model_version},
                                load=False)
            deletes = self._query(f"the deletes inserted in {span}", inserted("deletes", DELETE_COLUMNS), load=False)
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

    def _query(self, what: str, sql: str, params: dict | None = None, *, load: bool) -> pa.Table:
        return self._bounded(what, lambda con: con.execute(sql, params or {}).to_arrow_table(), load=load)

    def _bounded(self, what: str, read: Callable[[duckdb.DuckDBPyConnection], pa.Table], *, load: bool) -> pa.Table:
        """``read(connection)`` on a thread of its own, waited for its bound (``index_load_timeout_s`` for
        a whole-version ``load``, else ``index_refresh_timeout_s``); then
        interrupted, and if it still does not return, abandoned: the stuck statement keeps that
        connection (and its thread) and this source opens a new one for the next read."""
        setting = "index_load_timeout_s" if load else "index_refresh_timeout_s"
        bound = getattr(self.settings, setting)
        with self._lock:
            con = self._connection()
            outcome: list = []
            done = threading.Event()

            def run() -> None:
                try:
                    outcome.append(read(con))
                except BaseException as exc:  # handed to the caller below
                    outcome.append(exc)
                finally:
                    done.set()
            threading.Thread(target=run, name="hashlake-lake-read", daemon=True).start()
            if not done.wait(bound):
                con.interrupt()
                if not done.wait(INTERRUPT_GRACE_S):
                    # Not closed: closing waits on the statement. Its thread holds the connection until the
                    # statement returns, if ever (a process that exits while it is still stuck may end
                    # in an abort, when that thread returns into a finalizing interpreter).
                    self._con = None
                    log.error("lake read stalled: %s from %s did not return within %.1f s nor %.1f s after "
                              "an interrupt; its connection is abandoned", what, self.describe(), bound,
                              INTERRUPT_GRACE_S)
                raise LakeReadStalled(f"{what} from {self.describe()} did not return within {bound:g} s "
                                      f"(Settings.{setting})")
        value = outcome[0]
        if isinstance(value, BaseException):
            raise value
        return value

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
