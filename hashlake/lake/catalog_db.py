"""The PostgreSQL database that holds the lake's catalog, and its two roles.

The services' role (``Settings.pg_user``) owns the catalog tables DuckLake creates; the query role
(``Settings.query_pg_user``) may only read them: SELECT on every table of the schema, present and
future (DuckLake creates a table per inlined-data schema version as it goes). ``ensure_catalog`` is
idempotent: the stack, the tests and ``hashlake lake init`` run it before the lake is first attached.
"""
from __future__ import annotations

import psycopg
from psycopg import sql

from hashlake.config import Settings


class CatalogUnavailable(RuntimeError):
    """PostgreSQL did not answer or refused the credentials; the message says which server and role."""


def connect_catalog(settings: Settings, database: str | None = None) -> psycopg.Connection:
    try:
        return psycopg.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                               password=settings.pg_password.get_secret_value(),
                               dbname=database or settings.pg_database, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        raise CatalogUnavailable(f"the lake's catalog at postgresql://{settings.pg_user}@{settings.pg_host}:"
                                 f"{settings.pg_port}/{database or settings.pg_database} did not answer: "
                                 f"{str(exc).strip().splitlines()[0]}") from None


def ensure_catalog(settings: Settings) -> None:
    """Create the catalog database and the read-only query role when missing; (re)grant its reads."""
    with connect_catalog(settings, "postgres") as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [settings.pg_database]).fetchone()
        if not exists:
            try:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.pg_database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it a moment ago
        role, password = settings.query_pg_user, settings.query_pg_password.get_secret_value()
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            try:
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                                 sql.Literal(password)))
            except psycopg.errors.DuplicateObject:
                pass
        else:
            admin.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    with connect_catalog(settings) as db:
        ident = sql.Identifier(settings.query_pg_user)
        owner = sql.Identifier(settings.pg_user)
        db.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(settings.pg_database), ident))
        db.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        db.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(ident))
        db.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT SELECT ON TABLES TO {}")
                   .format(owner, ident))
