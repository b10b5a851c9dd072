"""A lake of a benchmark's own: PostgreSQL (the catalog) and moto_server (the data files, in the index
bucket as the product keeps them) on free ports in a temporary folder, stopped and removed afterwards."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hashlake.config import Settings
from hashlake.lake import init_lake
from hashlake.lake.catalog_db import ensure_catalog
from hashlake.local.services import free_port, start_moto, start_postgres
from hashlake.store import ObjectStore


@contextmanager
def private_lake(prefix: str) -> Iterator[tuple[Settings, ObjectStore]]:
    """(settings, store) of an empty lake with its buckets, catalog database and tables created."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # run as root, PostgreSQL runs as the postgres user and must enter it
        pg = start_postgres(free_port(), root / "pg", superuser="hashlake", password="bench")
        s3 = start_moto(free_port(), root / "s3")
        try:
            settings = Settings(s3_endpoint=f"http://127.0.0.1:{s3.port}", s3_access_key="bench", s3_secret_key="bench",
                                images_bucket="images", index_bucket="hashlake", pg_port=pg.port, pg_password="bench",
                                stack_dir=root / "stack")
            store = ObjectStore(settings)
            store.ensure_bucket(settings.images_bucket)
            store.ensure_bucket(settings.index_bucket)
            ensure_catalog(settings)
            init_lake(settings)
            yield settings, store
        finally:
            s3.stop()
            pg.stop()
