"""DuckDB over the index: views ``codes``, ``failures``, ``tombstones``; functions ``hamming``, ``search``,
``within``, ``search_rows``, ``within_rows``, ``hash_image``.

    con = connect(settings)                  # or connect(local_dir=Path("dump/"))
    con.sql("SELECT key, distance FROM search('8f3a…', 10)")
    con.sql("SELECT key, distance, labels FROM search_rows(hash_image('cat.jpg'), 10)")  # every codes column
    con.sql("SELECT * FROM within(hash_image('cat.jpg'), 4)")
    con.sql("SELECT key FROM codes WHERE hamming(code, $q) <= 3")

A connection sees one snapshot of the model version's shards: the ``codes`` view (read straight
from the Parquet shards, through httpfs or from the folder) and ``search``/``within`` (answered
from the process's in-memory index, ``hashlake.index``) agree row for row. ``refresh(con)`` loads
shards that arrived since and moves the connection to the new snapshot.

``search`` and ``within`` return (bucket, key, etag, distance) in the order (distance, bucket,
key): ties in distance are broken by bucket, then key (after a join, ORDER BY those again).
``search_rows`` and ``within_rows`` return the hits' rows of ``codes`` with their distance, in that
order: what a join to ``codes`` gives, without applying the view's rule to every row first.
``query`` is hex text, a BLOB, or ``hash_image(...)``: a constant (a table function's arguments are
evaluated once, before the scan); a code of the wrong length is an error naming both lengths. For a
query per row (a batch, a code from a subquery) use the list forms, one call per 2,048 rows spread
over every core:

    SELECT q.id, unnest(search_list(q.code, 10), recursive := true) FROM queries q

``search``, ``within`` and the list forms run in the ``hashlake_hamming`` extension (compiled C,
``hashlake/native``), which reads the in-memory index's buffers in place: the connection's snapshot
is published to it and pinned to the connection's database.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa

from hashlake.config import Settings, get_settings
from hashlake.index.code_index import CodeIndex, shared_index
from hashlake.index.snapshot import Snapshot
from hashlake.index.source import FolderSource, ShardSource, StoreSource
from hashlake.index.visibility import visible_rows_sql
from hashlake.native import loader as native
from hashlake.shards import CODES_PREFIX, FAILURES_PREFIX, FAILURES_SCHEMA, TOMBSTONES_SCHEMA, codes_schema
from hashlake.store import ObjectStore

IMAGE_TYPE = "UNION(path VARCHAR, image BLOB)"  # what hash_image accepts: a path (or s3:// URL) or bytes


class Hit(NamedTuple):
    bucket: str
    key: str
    etag: str
    distance: int


@dataclass
class _ConnectionState:
    """What one connection is pinned to; the registered functions read it on every call."""

    index: CodeIndex
    source: ShardSource
    settings: Settings
    snapshot: Snapshot
    hasher: "_ImageHasher"
    follows_active: bool  # opened on the active version (none given or pinned): refresh follows the pointer
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATES: "weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _ConnectionState]" = weakref.WeakKeyDictionary()


def connect(settings: Settings | None = None, *, local_dir: Path | None = None,
            model_version: str | None = None) -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection over the active (or given) model version's shards.

    Shards come from ``settings.index_bucket`` (httpfs, loaded from the pip package, no download), or
    from ``local_dir`` laid out like that bucket. The process's in-memory index for that version is
    created or refreshed first, and the connection is pinned to its current snapshot.
    """
    settings = settings or get_settings()
    if local_dir is not None:
        source: ShardSource = FolderSource(Path(local_dir))
        version = model_version or settings.model_version or _folder_model_version(Path(local_dir))
    else:
        store = ObjectStore(settings)
        source = StoreSource(store, settings)
        if model_version or settings.model_version:
            version = model_version or settings.model_version
        else:
            from hashlake.catalog import Catalog

            version = Catalog(store, settings).active()
    index = shared_index(source, version)
    snapshot = index.refresh()
    con = native.connect({"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if isinstance(source, StoreSource):
        _configure_httpfs(con, settings)
    follows_active = isinstance(source, StoreSource) and not (model_version or settings.model_version)
    state = _ConnectionState(index=index, source=source, settings=settings, snapshot=snapshot,
                             hasher=_ImageHasher(settings, version), follows_active=follows_active)
    _STATES[con] = state
    _register_functions(con, state)
    _pin(con, state, snapshot)
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> Snapshot:
    """Load shards that arrived since this connection's snapshot and move the connection (its views
    and its search functions) to the new snapshot. Other connections move when they refresh.

    A connection opened on the active version follows the active pointer: after a promotion
    (``hashlake model promote``) its refresh moves it to the new version's index, and ``hash_image``
    to the new version's model."""
    state = _state(con)
    if state.follows_active:
        from hashlake.catalog import Catalog

        active = Catalog(state.source.store, state.settings).active()
        if active != state.index.model_version:
            with state.lock:
                state.index = shared_index(state.source, active)
                state.hasher = _ImageHasher(state.settings, active)
    snapshot = state.index.refresh()
    _pin(con, state, snapshot)
    return snapshot


def search_codes(con: duckdb.DuckDBPyConnection, query: bytes | str, k: int) -> list[Hit]:
    """The k nearest visible codes to ``query`` (packed bytes or hex) on this connection's snapshot,
    in (distance, bucket, key) order: ``SELECT * FROM search(query, k)``."""
    _state(con)
    return [Hit(*row) for row in con.execute("SELECT bucket, key, etag, distance FROM search(?, ?)",
                                             [query, k]).fetchall()]


def within_codes(con: duckdb.DuckDBPyConnection, query: bytes | str, radius: int) -> list[Hit]:
    """Every visible code within ``radius`` of ``query``: ``SELECT * FROM within(query, radius)``."""
    _state(con)
    return [Hit(*row) for row in con.execute("SELECT bucket, key, etag, distance FROM within(?, ?)",
                                             [query, radius]).fetchall()]


def hash_image(con: duckdb.DuckDBPyConnection, image: bytes | str | Path) -> bytes:
    """The active model's packed code of one image (bytes, a local path, or ``s3://bucket/key``)."""
    return _state(con).hasher.code(image)


# -- registration: every SQL function of hashlake, in one place, with explicit types --------------
def _register_functions(con: duckdb.DuckDBPyConnection, state: _ConnectionState) -> None:
    con.create_function("hash_image", _hash_image_udf(state), [duckdb.sqltype(IMAGE_TYPE)],
                        duckdb.sqltype("BLOB"), type="arrow", side_effects=False)
    # hex text → BLOB, so every function takes either; the CASE is folded at bind time, so
    # hamming() over a column runs as native DuckDB code
    con.execute("CREATE MACRO hashlake_code(c) AS "
                "CASE WHEN typeof(c) = 'VARCHAR' THEN unhex(c::VARCHAR) ELSE c::BLOB END")
    # bit_count returns TINYINT: cast before any sum; xor() (not ^, which is power) works on BIT strings
    con.execute("""
        CREATE MACRO hamming(a, b) AS (
            CASE WHEN octet_length(hashlake_code(a)) = octet_length(hashlake_code(b))
                 THEN bit_count(xor(hashlake_code(a)::BIT, hashlake_code(b)::BIT))::INTEGER
                 ELSE error(format('hamming: the codes have different lengths, {} bits and {} bits',
                                   octet_length(hashlake_code(a)) * 8, octet_length(hashlake_code(b)) * 8))
            END)""")
    # search()/within() are the extension's table functions (one constant query); these list forms
    # answer a query per row, for batches:  SELECT q.id, unnest(search_list(q.code, 10), recursive := true) …
    con.execute("CREATE MACRO search_list(query, k) AS hashlake_search_list(hashlake_code(query), k)")
    con.execute("CREATE MACRO within_list(query, radius) AS hashlake_within_list(hashlake_code(query), radius)")
    # search_rows / within_rows: the hits' rows of codes with their distance, answered by the extension
    # from the index's own copy of the columns (no shard is read): the rows of
    # `search(q, k) JOIN codes USING (bucket, key)`, in the tie-rule order.
    for name, native_function in (("search_rows", "hashlake_search_rows"), ("within_rows", "hashlake_within_rows")):
        con.execute(f"CREATE MACRO {name}(query, n) AS TABLE SELECT * FROM {native_function}(query, n)")


def _hash_image_udf(state: _ConnectionState):
    def hash_image(images: pa.Array) -> pa.Array:
        return pa.array([None if v is None else state.hasher.code(v) for v in images.to_pylist()], pa.binary())
    return hash_image


# -- views --------------------------------------------------------------------------------------
def _pin(con: duckdb.DuckDBPyConnection, state: _ConnectionState, snapshot: Snapshot) -> None:
    """Point the connection's views and functions at ``snapshot``."""
    with state.lock:
        source = state.source
        con.register("_hashlake_empty_codes", codes_schema(snapshot.bits or 64).empty_table())
        con.register("_hashlake_empty_failures", FAILURES_SCHEMA.empty_table())
        con.register("_hashlake_empty_tombstones", TOMBSTONES_SCHEMA.empty_table())
        code_rows = _parquet_or_empty([source.url(f.name) for f in snapshot.code_files], "_hashlake_empty_codes")
        tombstones = _parquet_or_empty([source.url(f.name) for f in snapshot.tombstone_files],
                                       "_hashlake_empty_tombstones")
        failures = source.list(f"{FAILURES_PREFIX}{snapshot.model_version}/")
        con.execute(f"CREATE OR REPLACE VIEW tombstones AS {tombstones}")
        con.execute(f"CREATE OR REPLACE VIEW _hashlake_code_rows AS {code_rows}")
        con.execute(f"CREATE OR REPLACE VIEW codes AS {visible_rows_sql('_hashlake_code_rows', 'tombstones')}")
        con.execute("CREATE OR REPLACE VIEW failures AS "
                    + _parquet_or_empty([source.url(f.name) for f in failures], "_hashlake_empty_failures"))
        native.pin(con, snapshot)
        state.snapshot = snapshot  # holds the snapshot, so its published buffers, while pinned


def _parquet_or_empty(urls: list[str], empty: str) -> str:
    if not urls:
        return f"SELECT * FROM {empty}"
    listed = ", ".join("'" + u.replace("'", "''") + "'" for u in urls)
    return f"SELECT * FROM read_parquet([{listed}], union_by_name = true)"


def _configure_httpfs(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Load httpfs from the ``duckdb-extension-httpfs`` wheel (DuckDB cannot download it here) and
    give it the store's credentials as a temporary (in-memory, never written) secret."""
    import duckdb_extension_httpfs

    path = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    if not path.is_file():
        raise FileNotFoundError(f"httpfs extension not found at {path}: install duckdb-extension-httpfs=={duckdb.__version__}")
    con.execute(f"LOAD '{path}'")
    con.execute(
        "CREATE OR REPLACE TEMPORARY SECRET hashlake_store (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, "
        "URL_STYLE 'path', USE_SSL ?)".replace("?", "{}").format(
            _sql_str(settings.s3_access_key.get_secret_value()), _sql_str(settings.s3_secret_key.get_secret_value()),
            _sql_str(settings.s3_region), _sql_str(settings.s3_netloc), "true" if settings.s3_secure else "false"))


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _folder_model_version(root: Path) -> str:
    """The model version of a shard folder: its models/ACTIVE pointer, else its only codes/ subfolder."""
    active = root / "models" / "ACTIVE"
    if active.is_file():
        return json.loads(active.read_text())["version"]
    versions = sorted(p.name for p in (root / CODES_PREFIX).glob("*") if p.is_dir())
    if len(versions) == 1:
        return versions[0]
    raise ValueError(f"cannot tell which model version to read in {root}: no models/ACTIVE and "
                     f"codes/ holds {versions or 'nothing'}; pass model_version=")


def _state(con: duckdb.DuckDBPyConnection) -> _ConnectionState:
    try:
        return _STATES[con]
    except KeyError:
        raise ValueError("this DuckDB connection was not made by hashlake.sql.connect()") from None


# -- hash_image ---------------------------------------------------------------------------------
class _ImageHasher:
    """Encodes images with the model version's weights, loaded from the catalog on first use."""

    def __init__(self, settings: Settings, model_version: str):
        self.settings = settings
        self.model_version = model_version
        self._model = None
        self._lock = threading.Lock()

    def code(self, image: bytes | str | Path) -> bytes:
        from hashing_models.decode import decode_image
        from hashing_models.preprocess import prepare_images

        body = self._read(image)
        # The workers' decoder (EXIF orientation, RGB, pixel limit): a query gets its stored copy's code.
        picture = decode_image(body, self.settings.max_image_pixels, name=f"hash_image: {_describe(image)}")
        model = self._load()
        return model.encode(prepare_images([picture], model.input_config))[0].tobytes()

    def _read(self, image: bytes | str | Path) -> bytes:
        if isinstance(image, bytes):
            return image
        text = str(image)
        if text.startswith("s3://"):
            bucket, _, key = text[len("s3://"):].partition("/")
            return ObjectStore(self.settings).get(bucket, key, max_bytes=self.settings.max_object_bytes)[0]
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"hash_image: {text!r} is not a file (give a local path, s3://bucket/key, or bytes)")
        return path.read_bytes()

    def _load(self):
        with self._lock:
            if self._model is None:
                from hashlake.catalog import Catalog
                from hashlake.models import build_model

                self._model = build_model(Catalog(ObjectStore(self.settings), self.settings), self.model_version)
            return self._model


def _describe(image: bytes | str | Path) -> str:
    return f"{len(image)} bytes" if isinstance(image, bytes) else repr(str(image))
