"""The lake: codes, failures and deletes as DuckLake tables (catalog in PostgreSQL, Parquet data files in
the index bucket), read and written through DuckDB.

    extensions.py  DuckDB extensions (httpfs, postgres_scanner, ducklake) loaded from their PyPI packages
    catalog_db.py  the PostgreSQL database behind the catalog: created once, with a read-only query role
    connection.py  a DuckDB connection with the lake attached: read-write for services, locked for queries
    schema.py      the tables, their columns and the Arrow schemas rows are built in
    rules.py       which rows are current: the `codes` rule and the current-failures rule, in SQL
    writer.py      one transaction per encode batch or delete batch; what a version already holds
    maintenance.py compaction: flush inlined rows, merge small files, expire snapshots, delete old files
    features.py    the ``features`` table: each encoded image version's pooled backbone features
"""


def init_lake(settings) -> None:
    """Create the catalog database, its query role and the lake's tables when missing (idempotent)."""
    from hashlake.lake.catalog_db import ensure_catalog
    from hashlake.lake.connection import open_lake

    ensure_catalog(settings)
    open_lake(settings).close()
