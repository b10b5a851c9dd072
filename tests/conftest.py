"""Shared fixtures: real redis-server, moto_server and PostgreSQL processes on free ports, one per test session.

Tests isolate themselves by bucket names, Redis keys and catalog databases (``settings`` gives each
test fresh buckets and a lake of its own), not by mocking anything.
"""
from __future__ import annotations

import io
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from hashlake.config import Settings
from hashlake.lake.catalog_db import ensure_catalog
from hashlake.local.services import free_port, start_moto, start_postgres, start_ray, start_redis
from hashlake.store import ObjectStore

PG_SUPERUSER, PG_PASSWORD = "hashlake", "hashlake-test-pw"

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10.parquet"
# The intake refuses tokens under 16 characters (workers.intake.webhook.MIN_TOKEN_CHARS).
WEBHOOK_TOKEN = "test-webhook-token-0123456789"


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_service(services_dir):
    svc = start_redis(free_port(), services_dir / "redis")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def s3_service(services_dir):
    svc = start_moto(free_port(), services_dir / "s3")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def pg_service():
    # Not under pytest's tmp folder: run as root, the cluster belongs to the postgres system user,
    # which cannot enter pytest's 0700 folders.
    root = Path(tempfile.mkdtemp(prefix="hashlake-test-pg-"))
    root.chmod(0o755)
    svc = start_postgres(free_port(), root / "data", superuser=PG_SUPERUSER, password=PG_PASSWORD, durable=False)
    yield svc
    svc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(services_dir):
    """A Ray head as the stack starts one (free ports, its own session folder); its Jobs API URL is
    ``ray_head.port``'s. Its job drivers read a test's settings from the HASHLAKE_CONFIG the submitter
    passes (scheduler.submit's runtime env)."""
    svc = start_ray(free_port(), services_dir / "ray", num_cpus=2)
    yield svc
    svc.stop()


@pytest.fixture
def settings(redis_service, s3_service, pg_service, tmp_path) -> Settings:
    """Settings pointing at the session's services, with buckets, Redis keys and a lake of this test's own."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        s3_endpoint=f"http://127.0.0.1:{s3_service.port}",
        s3_access_key="testing",
        s3_secret_key="testing",
        images_bucket=f"images-{suffix}",
        index_bucket=f"hashlake-{suffix}",
        redis_url=f"redis://127.0.0.1:{redis_service.port}/0",
        events_key=f"minio-events-{suffix}",
        webhook_token=WEBHOOK_TOKEN,
        stack_dir=tmp_path / "stack",
        pg_port=pg_service.port,
        pg_user=PG_SUPERUSER,
        pg_password=PG_PASSWORD,
        pg_database=f"lake_{suffix}",
    )
    ensure_catalog(settings)
    return settings


@pytest.fixture
def store(settings) -> ObjectStore:
    s = ObjectStore(settings)
    s.ensure_bucket(settings.images_bucket)
    s.ensure_bucket(settings.index_bucket)
    return s


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small CPU tensors gain little from threads and the machine is shared: one torch thread for the
    module, the previous setting restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[tuple[str, int, bytes]]:
    """A few hundred real CIFAR-10 JPEGs as (path, label, bytes); skips when the dataset is absent."""
    if not CIFAR10.exists():
        pytest.skip(f"CIFAR-10 parquet not found at {CIFAR10} (it lives in ../shared/datasets)")
    import pyarrow.parquet as pq

    table = pq.read_table(CIFAR10, columns=["path", "label", "jpeg"]).slice(0, 5000)
    rows = table.to_pylist()[::25]  # 200 images over several classes
    return [(r["path"], int(r["label"]), r["jpeg"]) for r in rows]


def jpeg_bytes(color=(200, 30, 30), size=(48, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def cli_env(settings: Settings) -> dict[str, str]:
    """The HASHLAKE_* variables that point the `hashlake` command at a test's services and buckets."""
    return {"HASHLAKE_S3_ENDPOINT": settings.s3_endpoint,
            "HASHLAKE_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
            "HASHLAKE_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
            "HASHLAKE_IMAGES_BUCKET": settings.images_bucket,
            "HASHLAKE_INDEX_BUCKET": settings.index_bucket,
            "HASHLAKE_REDIS_URL": settings.redis_url,
            "HASHLAKE_EVENTS_KEY": settings.events_key,
            "HASHLAKE_PG_HOST": settings.pg_host,
            "HASHLAKE_PG_PORT": str(settings.pg_port),
            "HASHLAKE_PG_DATABASE": settings.pg_database,
            "HASHLAKE_PG_USER": settings.pg_user,
            "HASHLAKE_PG_PASSWORD": settings.pg_password.get_secret_value()}


def lake_rows(settings: Settings, table: str, where: str = "") -> list[dict]:
    """Every row of the lake's ``table`` (codes, failures, deletes), read through a fresh connection."""
    from hashlake.lake.connection import open_lake

    con = open_lake(settings)
    try:
        return con.execute(f"SELECT * FROM lake.{table} {where}").to_arrow_table().to_pylist()
    finally:
        con.close()
