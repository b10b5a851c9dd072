"""The one typed settings object: environment variables ``HASHLAKE_*`` over an optional TOML file.

Precedence (highest first): keyword arguments, environment, the TOML file named by
``HASHLAKE_CONFIG``, the defaults below. Secrets are ``SecretStr``: they print as ``**********``
and are only ever read through ``.get_secret_value()`` where a client needs them.

``load_settings()`` (and its process-wide copy ``get_settings()``) is how the faces read them: the CLI,
``hashlake.sql.connect()`` and the workers. With ``HASHLAKE_CONFIG`` unset it also reads the local
stack's ``<HASHLAKE_STACK_DIR or .hashlake>/stack.toml`` when there is one, so that, in a folder where
``hashlake stack up`` ran, both the commands and Python code talk to that stack without further setup.
A plain ``Settings(...)`` never looks for a stack.
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


STACK_CONFIG_FILE = "stack.toml"  # what `hashlake stack up` writes into its stack_dir
DEFAULT_STACK_DIR = Path(".hashlake")
# The stack file found by load_settings(), read by the Settings being built in that call only.
_stack_config: ContextVar[Path | None] = ContextVar("hashlake_stack_config", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HASHLAKE_", extra="forbid", frozen=True)

    # --- object store (MinIO in production, moto_server locally) -------------------------------
    s3_endpoint: str = Field("http://127.0.0.1:9000", description="S3 endpoint URL, scheme included")
    s3_access_key: SecretStr = SecretStr("minioadmin")
    s3_secret_key: SecretStr = SecretStr("minioadmin")
    s3_region: str = "us-east-1"
    images_bucket: str = Field("images", description="the bucket users upload to")
    index_bucket: str = Field("hashlake", description="the lake's data files (lake/) and model versions (models/)")

    # --- the lake: DuckLake tables, catalog in PostgreSQL, data files in the index bucket ---------
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_database: str = Field("hashlake", description="the PostgreSQL database holding the lake's catalog")
    pg_user: str = Field("hashlake", description="catalog role of the services that write the lake")
    pg_password: SecretStr = SecretStr("hashlake-local")
    lake_data_path: str | None = Field(None, description="where the lake's Parquet files go; None: "
                                                         "s3://<index_bucket>/lake/")
    lake_inline_rows: int = Field(1000, ge=0, description="commits of at most this many rows stay in the "
                                                          "catalog (no Parquet file) until compaction flushes them")
    lake_compact_interval_s: float = Field(600.0, gt=0, description="how often the stack compacts the lake")
    lake_retention_s: float = Field(86_400.0, ge=0, description="snapshots older than this are expired by "
                                                                "compaction: time travel reaches this far back")

    # --- query connections (hashlake sql, hashlake.sql.connect): read-only credentials ---------
    query_pg_user: str = Field("hashlake_query", description="catalog role with SELECT only")
    query_pg_password: SecretStr = SecretStr("hashlake-query-local")
    query_s3_access_key: SecretStr | None = Field(None, description="a read-only S3 key; None: the service's")
    query_s3_secret_key: SecretStr | None = None
    index_refresh_timeout_s: float = Field(60.0, gt=0, description="a refresh's read of the lake's changes "
                                           "that has not returned after this long is interrupted and "
                                           "abandoned, and the index loads afresh")
    index_load_timeout_s: float = Field(1800.0, gt=0, description="a whole-version load of the in-memory "
                                        "index (10M rows: ~1 min) that has not returned after this long is "
                                        "abandoned: the refresh raises and the index keeps the snapshot it had")
    query_metrics_port: int | None = Field(None, ge=1, le=65535, description="a process that opens a query "
                                           "connection serves its query metrics (hashlake.query_metrics) on "
                                           "this port, on every interface; None: not served. Deployments use "
                                           "9110, the port the hashlake-query scrape job reads")

    # --- broker and events ---------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    events_key: str = Field("minio-events", description="Redis list a MinIO notify_redis target appends to")
    webhook_token: SecretStr = Field(SecretStr("change-me"), description="bearer token MinIO's webhook sends; "
                                     "the intake refuses the default and any under 16 characters")
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8080

    # --- batching: a Celery task is sent at batch_size keys or batch_window_ms after the first --
    batch_size: int = Field(32, ge=1, le=4096)
    batch_window_ms: int = Field(500, ge=1)
    reconcile_interval_s: float = Field(30.0, gt=0)
    reconcile_requeue_s: float = Field(120.0, gt=0, description="an object the reconciler queued that is still "
                                                                "missing this long after is queued again")
    reconcile_max_per_pass: int = Field(50_000, ge=1, description="objects one reconciler pass queues at most")
    broker_visibility_timeout_s: float = Field(
        900.0, gt=0, description="Redis redelivers a dead worker node's unacked batch after this long; must "
                                 "exceed the longest batch and the longest retry countdown (300 s)")

    # --- encoding ------------------------------------------------------------------------------
    model_version: str | None = Field(None, description="pin a model version; None follows the active pointer")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker; None = torch default")
    download_concurrency: int = Field(8, ge=1, le=256)
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images are refused as decompression bombs")
    max_object_bytes: int = Field(50 * 1024 * 1024, ge=1, description="larger objects are refused unread")
    keep_features: bool = Field(True, description="store every encoded image's pooled backbone features "
                                                  "(float16) in the lake's features table, for a head-only "
                                                  "retraining and re-encode that read no image; False: none")

    # --- local stack -----------------------------------------------------------------------------
    stack_dir: Path = Field(DEFAULT_STACK_DIR, description="pids, logs, ports and data of `hashlake stack`")
    metrics_port: int = Field(9108, description="first port of the Prometheus exporters")

    # --- retraining (Ray) ----------------------------------------------------------------------
    ray_address: str = Field("http://127.0.0.1:8265", description="the Ray Jobs API (dashboard) URL")
    retrain_cron: str = Field("0 2 * * *", description="when the nightly retraining runs: 5 cron fields, UTC")
    retrain_mode: str = Field("head", description="the nightly run's mode: head (a new hash head on the stored "
                                                  "features) or finetune (backbone and head end to end on the "
                                                  "images, on GPU workers where the Ray cluster has them)")
    pushgateway_url: str | None = Field(None, description="a Prometheus Pushgateway (host:port or URL) the "
                                                          "retraining job pushes its metrics to; None: none")
    retrain_method: str = Field("hashnet", description="hashing method a head-mode retraining trains "
                                                       "(any trainable one of hashing_models.methods)")
    retrain_epochs: int = Field(40, ge=1, description="passes over the training split per retraining")
    retrain_tolerance: float = Field(0.01, ge=0, description="the gate promotes a candidate whose evaluation "
                                                             "mAP@ALL is at most this far below the active's")
    reencode_block_rows: int = Field(50_000, ge=1, description="rows per block (and per lake commit) of a "
                                                               "head-mode re-encode: ~2.5 KB of features each")
    retrain_min_images: int = Field(50, ge=2, description="labelled images (train split) a retraining needs")
    finetune_epochs: int = Field(10, ge=1, description="fine-tune mode: passes over the train split's images, "
                                                       "after a head fit on the stored features")
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tune mode: peak learning rate of the head (the "
                                                       "backbone's is a tenth of it), cosine decay")
    finetune_batch_size: int = Field(64, ge=2, description="fine-tune mode: images per training step")
    finetune_block_images: int = Field(512, ge=1, description="fine-tune mode: images per re-encode actor call "
                                                              "and per lake commit")
    finetune_reencode_actors: int = Field(1, ge=1, description="fine-tune mode: re-encode actors where the Ray "
                                                               "cluster has no GPU (with GPUs: one per GPU)")

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_scheme(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"s3_endpoint must look like http://host:port, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _inline_rows_cover_a_batch(self) -> "Settings":
        if self.lake_inline_rows and self.lake_inline_rows < self.batch_size:
            raise ValueError(f"lake_inline_rows ({self.lake_inline_rows}) must be 0 or at least batch_size "
                             f"({self.batch_size}): a batch is inlined in the catalog whole, or written as a file")
        return self

    @property
    def lake_path(self) -> str:
        """The lake's data folder (always ending in '/')."""
        return (self.lake_data_path or f"s3://{self.index_bucket}/lake/").rstrip("/") + "/"

    @property
    def s3_secure(self) -> bool:
        return urlparse(self.s3_endpoint).scheme == "https"

    @property
    def s3_netloc(self) -> str:
        return urlparse(self.s3_endpoint).netloc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("HASHLAKE_CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(f"HASHLAKE_CONFIG points to {toml_path!r}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        elif _stack_config.get() is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_stack_config.get()))
        return tuple(sources)


def stack_config_file() -> Path | None:
    """The local stack's settings file, ``<HASHLAKE_STACK_DIR or .hashlake>/stack.toml`` (relative to the
    current folder), when it exists."""
    path = Path(os.environ.get("HASHLAKE_STACK_DIR", DEFAULT_STACK_DIR)) / STACK_CONFIG_FILE
    return path if path.is_file() else None


def load_settings() -> Settings:
    """Settings as the faces read them: environment over the TOML file ``HASHLAKE_CONFIG`` names or, when
    it is unset, over the local stack's ``stack.toml`` (``stack_config_file``), over the defaults."""
    token = _stack_config.set(None if "HASHLAKE_CONFIG" in os.environ else stack_config_file())
    try:
        return Settings()
    finally:
        _stack_config.reset(token)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """``load_settings()``, read once per process; tests build their own ``Settings(...)`` instead."""
    return load_settings()
