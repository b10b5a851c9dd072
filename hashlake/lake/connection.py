"""DuckDB connections with the lake attached as ``lake``.

Services (encode workers, the reconciler, compaction) use ``open_lake``: the catalog's read-write role
and the service's S3 key. Query connections (``hashlake.sql.connect``) use ``attach_for_queries`` on a
connection of their own: the lake attached READ_ONLY with the query role (SELECT only, enforced by
PostgreSQL) and the query S3 key, then the connection locked: no file or network access outside the
images bucket and the lake's data path, no other database attached, no extension loaded, no setting
changed (DuckDB's ``enable_external_access``, ``allowed_directories``, ``lock_configuration``).

Credentials travel as temporary secrets (memory only), never in the ATTACH string, so that no error
message or query log carries them.
"""
from __future__ import annotations

import threading

import duckdb

from hashlake.config import Settings
from hashlake.lake import extensions
from hashlake.lake.catalog_db import CatalogUnavailable
from hashlake.lake.schema import LAKE, TABLES, create_statements

# DuckLake retries a commit that conflicts with a concurrent one (two writers appending to the same
# table do not conflict; compaction and a writer can): this many times, backing off from 50 ms.
COMMIT_RETRIES = 20


def open_lake(settings: Settings) -> duckdb.DuckDBPyConnection:
    """A new read-write connection with the lake attached and its tables created when missing."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        extensions.load(con)
        _s3_secret(con, settings, settings.s3_access_key.get_secret_value(), settings.s3_secret_key.get_secret_value())
        _pg_secret(con, settings, settings.pg_user, settings.pg_password.get_secret_value())
        _attach(con, settings, read_only=False)
        con.execute(f"SET ducklake_max_retry_count = {COMMIT_RETRIES}")
        _ensure_tables(con, settings)
    except BaseException:
        con.close()
        raise
    return con


def attach_for_queries(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Attach the lake read-only on ``con`` with the query credentials, then lock ``con`` down.
    Everything the connection needs (extensions, functions) must be loaded before this call."""
    extensions.load(con)
    key = settings.query_s3_access_key or settings.s3_access_key
    secret = settings.query_s3_secret_key or settings.s3_secret_key
    _s3_secret(con, settings, key.get_secret_value(), secret.get_secret_value())
    _pg_secret(con, settings, settings.query_pg_user, settings.query_pg_password.get_secret_value())
    _attach(con, settings, read_only=True)
    allowed = [settings.lake_path, f"s3://{settings.images_bucket}/"]
    con.execute("SET allowed_directories = " + "[" + ", ".join(_sql_str(p) for p in allowed) + "]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _attach(con: duckdb.DuckDBPyConnection, settings: Settings, *, read_only: bool) -> None:
    # host, port and database name are not secret; the role and its password come from the secret
    target = f"ducklake:postgres:host={settings.pg_host} port={settings.pg_port} dbname={settings.pg_database}"
    options = ["READ_ONLY"] if read_only else [
        f"DATA_PATH {_sql_str(settings.lake_path)}", f"DATA_INLINING_ROW_LIMIT {settings.lake_inline_rows}"]
    try:
        con.execute(f"ATTACH {_sql_str(target)} AS {LAKE} ({', '.join(options)})")
    except duckdb.Error as exc:
        text = str(exc)
        if "creating a new DuckLake is explicitly disabled" in text:
            raise CatalogUnavailable(
                f"no lake in postgresql://{settings.pg_host}:{settings.pg_port}/{settings.pg_database} yet: "
                f"`hashlake lake init` creates it (the stack and the workers do so when they start)") from None
        if "connection" in text.lower() or "password" in text.lower() or "does not exist" in text:
            role = settings.query_pg_user if read_only else settings.pg_user
            raise CatalogUnavailable(
                f"cannot attach the lake's catalog postgresql://{role}@{settings.pg_host}:{settings.pg_port}/"
                f"{settings.pg_database}: {text.strip().splitlines()[0]} (is the stack up? `hashlake stack status`)"
            ) from None
        raise


_READY: set[tuple] = set()  # (catalog, data path) whose tables this process saw created
_READY_LOCK = threading.Lock()


def _ensure_tables(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    ident = (settings.pg_host, settings.pg_port, settings.pg_database)
    with _READY_LOCK:
        if ident in _READY:
            return
    present = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [LAKE]).fetchall()}
    if not set(TABLES) <= present:
        for attempt in range(COMMIT_RETRIES):
            try:
                con.execute("BEGIN")
                for statement in create_statements(present):
                    con.execute(statement)
                con.execute("COMMIT")
                break
            except duckdb.TransactionException:
                con.execute("ROLLBACK")  # another process created them at the same moment: look again
                present = {r[0] for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [LAKE]).fetchall()}
                if set(TABLES) <= present:
                    break
    with _READY_LOCK:
        _READY.add(ident)


def _s3_secret(con: duckdb.DuckDBPyConnection, settings: Settings, key: str, secret: str) -> None:
    con.execute(
        f"CREATE OR REPLACE TEMPORARY SECRET hashlake_store (TYPE s3, KEY_ID {_sql_str(key)}, SECRET {_sql_str(secret)}, "
        f"REGION {_sql_str(settings.s3_region)}, ENDPOINT {_sql_str(settings.s3_netloc)}, URL_STYLE 'path', "
        f"USE_SSL {'true' if settings.s3_secure else 'false'})")


def _pg_secret(con: duckdb.DuckDBPyConnection, settings: Settings, user: str, password: str) -> None:
    # unnamed: the postgres extension uses the default secret for connection parameters the ATTACH omits
    con.execute(f"CREATE OR REPLACE TEMPORARY SECRET (TYPE postgres, USER {_sql_str(user)}, "
                f"PASSWORD {_sql_str(password)})")


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
