"""DuckDB over the lake: views ``codes``, ``failures``, ``failure_history``, ``deletes``; functions ``hamming``,
``search``, ``within``, ``search_rows``, ``within_rows``, ``hash_image``; the lake itself attached read-only as
``lake`` (its tables ``lake.codes``, ``lake.failures``, ``lake.deletes``, with time travel).

    con = connect(settings)
    con.sql("SELECT key, distance, labels FROM search_rows(hash_image('cat.jpg'), 10)")  # every codes column
    con.sql("SELECT key, distance FROM search('8f3a…', 10)")
    con.sql("SELECT * FROM within(hash_image('cat.jpg'), 4)")
    con.sql("SELECT key FROM codes WHERE hamming(code, $q) <= 3")

A connection sees one lake snapshot of one model version: the ``codes`` view (the current rows, held in
the process's in-memory index, ``hashlake.index``), ``search``/``within`` (answered from that index) and
``failures``/``deletes`` (read from the lake at the same snapshot) agree row for row. ``refresh(con)``
loads what the lake committed since and moves the connection to the new snapshot.

``search`` and ``within`` return (bucket, key, etag, distance) in the order (distance, bucket,
key): ties in distance are broken by bucket, then key (after a join, ORDER BY those again).
``search_rows`` and ``within_rows`` return the hits' rows of ``codes`` with their distance, in that
order: what a join to ``codes`` gives, without reading ``codes`` at all.
``query`` is hex text, a BLOB, or ``hash_image(...)``: a constant (a table function's arguments are
evaluated once, before the scan); a code of the wrong length is an error naming both lengths. For a
query per row (a batch, a code from a subquery) use the list forms, one call per 2,048 rows spread
over every core:

    SELECT q.id, unnest(search_list(q.code, 10), recursive := true) FROM queries q

A query connection cannot write: the lake is attached READ_ONLY with the catalog's SELECT-only role and
the query S3 key, and the connection is then locked (no other file or bucket, no ATTACH, no LOAD, no
SET; ``hashlake.lake.connection``).

``search``, ``within`` and the list forms run in the ``hashlake_hamming`` extension (compiled C,
``hashlake/native``), which reads the in-memory index's buffers in place: the connection's snapshot
is published to it and pinned to the connection's database.

The process's search latency, index size and refresh times are Prometheus metrics
(``hashlake.query_metrics``); with ``query_metrics_port`` set, ``connect()`` serves them on that port.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa

from hashlake import query_metrics
from hashlake.catalog import Catalog
from hashlake.config import Settings, get_settings
from hashlake.index.code_index import CodeIndex, shared_index
from hashlake.index.lake_source import LakeSource
from hashlake.index.snapshot import Snapshot
from hashlake.lake.connection import attach_for_queries
from hashlake.lake.rules import current_failures_sql
from hashlake.lake.schema import LAKE
from hashlake.native import loader as native
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
    source: LakeSource
    settings: Settings
    snapshot: Snapshot
    hasher: "_ImageHasher"
    follows_active: bool  # opened on the active version (none given or pinned): refresh follows the pointer
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATES: "weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _ConnectionState]" = weakref.WeakKeyDictionary()


def connect(settings: Settings | None = None, *, model_version: str | None = None) -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection over the lake, on the active (or given) model version.

    The process's in-memory index for that version is created or refreshed first (from the lake's
    change feed), and the connection is pinned to its current snapshot.
    """
    settings = settings or get_settings()
    pinned = model_version or settings.model_version
    version = pinned or Catalog(ObjectStore(settings), settings).active()
    source = shared_source(settings)
    index = shared_index(source, version)
    snapshot = index.refresh()
    con = native.connect({"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    state = _ConnectionState(index=index, source=source, settings=settings, snapshot=snapshot,
                             hasher=_ImageHasher(settings, version), follows_active=not pinned)
    _STATES[con] = state
    _register_functions(con, state)
    attach_for_queries(con, settings)  # last: it locks the connection's configuration
    _pin(con, state, snapshot)
    query_metrics.serve_configured(settings)
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> Snapshot:
    """Load what the lake committed since this connection's snapshot and move the connection (its views
    and its search functions) to the new snapshot. Other connections move when they refresh.

    A connection opened on the active version follows the active pointer: after a promotion
    (``hashlake model promote``) its refresh moves it to the new version's index, and ``hash_image``
    to the new version's model.

    No read waits for ever: one that passes its bound (``Settings.index_refresh_timeout_s``,
    ``index_load_timeout_s``) is abandoned; a stalled
    change read is replaced by a fresh load, and if that stalls too ``LakeReadStalled`` is raised and the
    connection stays on the snapshot it had."""
    state = _state(con)
    if state.follows_active:
        active = Catalog(ObjectStore(state.settings), state.settings).active()
        if active != state.index.model_version:
            with state.lock:
                state.index = shared_index(state.source, active)
                state.hasher = _ImageHasher(state.settings, active)
    snapshot = state.index.refresh()
    _pin(con, state, snapshot)
    return snapshot


_SOURCES: dict[str, LakeSource] = {}
_SOURCES_LOCK = threading.Lock()


def shared_source(settings: Settings) -> LakeSource:
    """The process's one reader of the lake ``settings`` names (the indexes' connection)."""
    source = LakeSource(settings)
    with _SOURCES_LOCK:
        return _SOURCES.setdefault(source.describe(), source)


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
    # search()/within() and search_rows()/within_rows() are the extension's table functions (one constant
    # query; the rows forms return `search(q, k) JOIN codes USING (bucket, key)` from the index's own copy
    # of the columns, with no macro around them: one cost ~0.1 ms of binding per query). These list forms
    # answer a query per row, for batches:  SELECT q.id, unnest(search_list(q.code, 10), recursive := true) …
    con.execute("CREATE MACRO search_list(query, k) AS hashlake_search_list(hashlake_code(query), k)")
    con.execute("CREATE MACRO within_list(query, radius) AS hashlake_within_list(hashlake_code(query), radius)")


def _hash_image_udf(state: _ConnectionState):
    def hash_image(images: pa.Array) -> pa.Array:
        return pa.array([None if v is None else state.hasher.code(v) for v in images.to_pylist()], pa.binary())
    return hash_image


# -- views ---------------------------------------------------------------------------------------
def _pin(con: duckdb.DuckDBPyConnection, state: _ConnectionState, snapshot: Snapshot) -> None:
    """Point the connection's views and functions at ``snapshot``: ``codes`` from the index's memory, the
    lake's tables at the same lake snapshot."""
    with state.lock:
        version = snapshot.model_version
        at = f"AT (VERSION => {int(snapshot.lake_snapshot or 0)})"
        con.register("_hashlake_codes", snapshot.visible_rows)
        con.execute(f"""CREATE OR REPLACE TEMP VIEW codes AS
            SELECT key, bucket, etag, size, last_modified, code, {_sql_str(version)} AS model,
                   encoded_at, labels
            FROM _hashlake_codes""")
        if snapshot.lake_snapshot is None:  # nothing loaded: an empty lake
            at = ""
        con.execute(f"CREATE OR REPLACE TEMP VIEW failure_history AS SELECT * FROM {LAKE}.failures {at}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW deletes AS SELECT * FROM {LAKE}.deletes {at}")
        con.execute("CREATE OR REPLACE TEMP VIEW failures AS " + current_failures_sql(
            *(f"(SELECT * FROM {LAKE}.{table} {at})" for table in ("failures", "codes", "deletes")), version))
        native.pin(con, snapshot)
        state.snapshot = snapshot  # holds the snapshot, so its published buffers, while pinned


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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
                from hashlake.model_versions import load_version

                self._model = load_version(Catalog(ObjectStore(self.settings), self.settings), self.model_version)
            return self._model


def _describe(image: bytes | str | Path) -> str:
    return f"{len(image)} bytes" if isinstance(image, bytes) else repr(str(image))
