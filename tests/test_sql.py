"""hashlake.sql against a real lake (PostgreSQL catalog, files on moto_server): the codes/failures views,
search/within/hamming in SQL agreeing with each other and with brute force, hex and BLOB queries,
batches crossing the 2,048-row vector, refresh, time travel, a query connection that cannot write, and
hash_image with a published model."""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from hashing_models.codes import hamming_reference
from hashlake import sql
from hashlake.lake import init_lake
from hashlake.lake.schema import CODES_SCHEMA, DELETES_SCHEMA, FAILURES_SCHEMA, epoch_ns
from hashlake.lake.writer import shared_writer

from conftest import cli_env

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
VERSION = "v1"
N = 2500  # crosses DuckDB's 2,048-row vector


def commit_codes(settings, keys: list[str], codes: np.ndarray, minutes: int = 1, version: str = VERSION,
                 rows: list[dict] | None = None) -> None:
    """Commit codes rows as an encode batch does (``rows`` overrides per-row columns)."""
    when = T0 + timedelta(minutes=minutes)
    table = [{"bucket": "images", "key": k, "etag": f"etag-{k}-{minutes}", "version_id": None, "size": 10,
              "last_modified": when, "mtime_ns": epoch_ns(when), "code": c.tobytes(), "model": version,
              "encoded_at": T0 + timedelta(hours=1), "labels": ["cat"], "batch_id": "b", **(rows[i] if rows else {})}
             for i, (k, c) in enumerate(zip(keys, codes))]
    init_lake(settings)
    shared_writer(settings).commit(pa.Table.from_pylist(table, schema=CODES_SCHEMA), None)


def random_codes(n: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (n // 4 + 1, bits // 8), dtype=np.uint8)  # duplicates make ties
    return pool[rng.integers(0, len(pool), n)]


@pytest.fixture
def loaded(settings, store):
    """The lake with two batches of codes (one overwrites key k00001), a delete and a failure."""
    codes = random_codes(N, 64)
    keys = [f"k{i:05d}" for i in range(N)]
    commit_codes(settings, keys[:2000], codes[:2000])
    commit_codes(settings, keys[2000:] + ["k00001"], np.concatenate([codes[2000:], codes[:1]]), 9)
    writer = shared_writer(settings)
    writer.commit_deletes(pa.Table.from_pylist([{"bucket": "images", "key": "k00002", "version_id": None, "etag": None,
                                                 "mtime_ns": epoch_ns(T0 + timedelta(minutes=5)),
                                                 "deleted_at": T0 + timedelta(minutes=5), "batch_id": "d"}],
                                               schema=DELETES_SCHEMA))
    writer.commit(None, pa.Table.from_pylist([{"bucket": "images", "key": "bad.jpg", "etag": "e", "version_id": None,
                                               "mtime_ns": epoch_ns(T0), "reason": "not_an_image",
                                               "detail": "cannot identify image", "model": VERSION, "failed_at": T0,
                                               "batch_id": "f"}], schema=FAILURES_SCHEMA))
    return codes


def test_views_and_functions_over_the_store(settings, loaded):
    con = sql.connect(settings, model_version=VERSION)
    assert con.sql("SELECT count(*) FROM codes").fetchone()[0] == N - 1  # k00002 is deleted
    assert con.sql("SELECT etag FROM codes WHERE key = 'k00001'").fetchone()[0] == "etag-k00001-9"
    assert con.sql("SELECT reason FROM failures").fetchall() == [("not_an_image",)]

    q = loaded[7].tobytes()
    by_sql = con.execute("SELECT bucket, key, etag, hamming(code, ?) AS d FROM codes "
                         "ORDER BY d, bucket, key LIMIT 25", [q]).fetchall()
    assert con.execute("SELECT bucket, key, etag, distance FROM search(?, 25)", [q]).fetchall() == by_sql
    assert con.execute("SELECT bucket, key, etag, distance FROM search(?, 25)", [q.hex()]).fetchall() == by_sql
    assert [tuple(h) for h in sql.search_codes(con, q, 25)] == by_sql

    radius_rows = con.execute("SELECT key, hamming(code, ?) AS d FROM codes WHERE hamming(code, ?) <= 20 "
                              "ORDER BY d, bucket, key", [q, q]).fetchall()
    assert con.execute("SELECT key, distance FROM within(?, 20)", [q]).fetchall() == radius_rows
    joined = con.execute("SELECT s.key, c.labels FROM search(?, 3) s JOIN codes c USING (bucket, key) "
                         "ORDER BY s.distance, s.key", [q]).fetchall()
    assert [r[1] for r in joined] == [["cat"]] * 3

    with pytest.raises(Exception, match="query code has 128 bits but the index .* holds 64-bit codes"):
        con.execute("SELECT * FROM search(?, 3)", [b"\x00" * 16]).fetchall()
    with pytest.raises(Exception, match="different lengths, 64 bits and 16 bits"):
        con.execute("SELECT hamming(code, 'ffff') FROM codes").fetchall()


def test_rows_forms_equal_the_join_to_codes(settings, loaded):
    """search_rows / within_rows apply the view's one-row-per-key rule to the hits' keys only: the same rows
    as joining codes, including a key overwritten by a later shard (k00001) and a deleted one (k00002)."""
    con = sql.connect(settings, model_version=VERSION)
    columns = [name for (name,) in con.sql("SELECT column_name FROM (DESCRIBE codes)").fetchall()]
    select = ", ".join(f"c.{name}" for name in columns)
    for q in (loaded[0], loaded[1], loaded[2], loaded[7]):  # k00001's new code, its old one, k00002's, any
        for rows_form, plain in (("search_rows(?, 12)", "search(?, 12)"), ("within_rows(?, 18)", "within(?, 18)")):
            expected = con.execute(f"SELECT {select}, s.distance FROM {plain} s JOIN codes c USING (bucket, key) "
                                   "ORDER BY s.distance, s.bucket, s.key", [q.tobytes()]).fetchall()
            got = con.execute(f"SELECT * FROM {rows_form}", [q.tobytes().hex()]).fetchall()
            assert got == expected and got
            assert [d[0] for d in con.description] == columns + ["distance"]
    keys = [r[0] for r in con.execute("SELECT key FROM search_rows(?, 3)", [loaded[2].tobytes()]).fetchall()]
    assert "k00002" not in keys
    exact = con.execute("SELECT key, etag FROM within_rows(?, 0)", [loaded[0].tobytes()]).fetchall()
    assert ("k00001", "etag-k00001-9") in exact and ("k00001", "etag-k00001-1") not in exact
    with pytest.raises(Exception, match="query code has 128 bits but the index .* holds 64-bit codes"):
        con.execute("SELECT * FROM search_rows(?, 3)", [b"\x00" * 16]).fetchall()


def test_rows_forms_return_every_value_as_the_view_does(settings, store):
    """Sizes, times (one unknown), and labels that are missing, empty or several, as the join reads them."""
    codes = random_codes(40, 64, seed=3)
    rows = [dict(size=100 + i, last_modified=T0 + timedelta(minutes=i) if i % 5 else None,
                 encoded_at=T0 + timedelta(hours=i), labels=[None, [], ["cat", "small"], ["dog"]][i % 4])
            for i in range(40)]
    commit_codes(settings, [f"r{i:02d}" for i in range(40)], codes, version="v9", rows=rows)
    con = sql.connect(settings, model_version="v9")
    for q in codes[:4]:
        for rows_form, plain in (("search_rows(?, 40)", "search(?, 40)"), ("within_rows(?, 64)", "within(?, 64)")):
            expected = con.execute(f"SELECT c.*, s.distance FROM {plain} s JOIN codes c USING (bucket, key) "
                                   "ORDER BY s.distance, s.bucket, s.key", [q.tobytes()]).fetchall()
            assert con.execute(f"SELECT * FROM {rows_form}", [q.tobytes()]).fetchall() == expected
            assert len(expected) == 40
    labels = dict(con.execute("SELECT key, labels FROM within_rows(?, 64)", [codes[0].tobytes()]).fetchall())
    assert (labels["r00"], labels["r01"], labels["r02"], labels["r03"]) == (None, [], ["cat", "small"], ["dog"])


def test_batch_across_vectors_equals_single_queries(settings, loaded):
    con = sql.connect(settings, model_version=VERSION)
    queries = random_codes(3000, 64, seed=1)
    con.register("queries", pa.table({"qid": np.arange(3000), "code": pa.array([q.tobytes() for q in queries])}))
    batch = con.execute("SELECT qid, distance FROM (SELECT q.qid, unnest(search_list(q.code, 4), recursive := true) "
                        "FROM queries q) ORDER BY qid, distance").fetchall()
    base = np.stack([np.frombuffer(c, np.uint8) for (c,) in con.sql("SELECT code FROM codes").fetchall()])
    expected = np.sort(hamming_reference(queries, base), axis=1)[:, :4]
    got = np.array([d for _, d in batch]).reshape(3000, 4)
    assert (got == expected).all()


def test_hamming_sums_long_codes_without_overflow(settings, loaded):
    con = sql.connect(settings, model_version=VERSION)
    assert con.sql("SELECT hamming(unhex(repeat('ff', 32)), repeat('00', 32))").fetchone()[0] == 256
    assert con.sql("SELECT hamming('0f', unhex('f0'))").fetchone()[0] == 8


def test_refresh_moves_a_connection_to_new_commits(settings, store, loaded):
    first = sql.connect(settings, model_version=VERSION)
    commit_codes(settings, ["new"], loaded[:1], 3)
    second = sql.connect(settings, model_version=VERSION)  # sees the new commit
    assert second.sql("SELECT count(*) FROM codes").fetchone()[0] == N
    assert first.sql("SELECT count(*) FROM codes").fetchone()[0] == N - 1  # pinned to its snapshot
    assert "new" not in {h.key for h in sql.within_codes(first, loaded[0].tobytes(), 0)}
    snapshot = sql.refresh(first)
    assert snapshot.rows == N
    assert "new" in {h.key for h in sql.within_codes(first, loaded[0].tobytes(), 0)}
    assert sql._state(first).index is sql._state(second).index  # one index per process


def test_time_travel_and_the_lake_tables(settings, store, loaded):
    con = sql.connect(settings, model_version=VERSION)
    snapshots = [s for (s,) in con.sql("SELECT snapshot_id FROM ducklake_snapshots('lake') "
                                       "WHERE changes['inlined_insert'] IS NOT NULL OR changes['tables_inserted_into'] "
                                       "IS NOT NULL ORDER BY 1").fetchall()]
    counts = [con.sql(f"SELECT count(*) FROM lake.codes AT (VERSION => {s})").fetchone()[0] for s in snapshots]
    assert 2000 in counts and counts[-1] == N + 1  # after the first batch; every row, overwrites included
    assert con.sql("SELECT key FROM deletes").fetchall() == [("k00002",)]
    assert con.sql("SELECT count(*) FROM failure_history").fetchone()[0] == 1


def test_a_query_connection_cannot_write_load_or_read_other_buckets(settings, store, loaded):
    store.ensure_bucket("elsewhere")
    store.put("elsewhere", "secret.csv", b"a,b\n1,2\n")
    con = sql.connect(settings, model_version=VERSION)
    refused = {
        "INSERT INTO lake.codes SELECT * FROM lake.codes LIMIT 1": "read-only",
        "DELETE FROM lake.deletes": "read-only",
        "CREATE TABLE lake.mine (a INT)": "read-only",
        "SELECT * FROM read_csv('s3://elsewhere/secret.csv')": "disabled by configuration",
        "SELECT * FROM read_csv('/etc/passwd')": "disabled by configuration",
        "LOAD '/tmp/another.duckdb_extension'": "disabled",
        f"ATTACH 'postgres:host=127.0.0.1 port={settings.pg_port} dbname={settings.pg_database}' AS pg": "disabled",
        "SET enable_external_access = true": "locked",
    }
    for statement, why in refused.items():
        with pytest.raises(Exception, match=why):
            con.execute(statement)
    assert con.sql("SELECT count(*) FROM lake.codes").fetchone()[0] == N + 1  # nothing was written
    # the catalog's query role itself may only read
    import psycopg

    with psycopg.connect(host=settings.pg_host, port=settings.pg_port, dbname=settings.pg_database,
                         user=settings.query_pg_user, password=settings.query_pg_password.get_secret_value()) as pg:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg.execute("DELETE FROM ducklake_snapshot")


def test_every_column_comes_back_to_python_and_the_cli(settings, store, monkeypatch):
    """The README's join returns every column of codes, timestamps with time zone included (DuckDB's
    client needs pytz for those: a missing dependency made `hashlake sql "SELECT * FROM codes"` fail)."""
    from rich.console import Console
    from typer.testing import CliRunner

    from hashlake import cli

    codes = random_codes(50, 64)
    commit_codes(settings, [f"k{i}" for i in range(50)], codes, version="only")
    con = sql.connect(settings, model_version="only")
    query = f"SELECT * FROM search('{codes[4].tobytes().hex()}', 3) JOIN codes USING (bucket, key)"
    rows = con.execute(query).fetchall()
    columns = [d[0] for d in con.description]
    first = dict(zip(columns, rows[0]))
    assert first["distance"] == 0 and first["last_modified"] == T0 + timedelta(minutes=1)
    assert first["labels"] == ["cat"] and first["code"] == codes[4].tobytes()

    monkeypatch.setattr(cli.output, "console", Console(width=400))  # one line per row, whatever the terminal
    result = CliRunner().invoke(cli.app, ["sql", query], env={**cli_env(settings), "HASHLAKE_MODEL_VERSION": "only"})
    assert result.exit_code == 0, result.output
    assert "last_modified" in result.output and "2026-11-01 00:01:00+00:00" in result.output
    assert codes[4].tobytes().hex() in result.output


def test_empty_index_answers_nothing(settings, store):
    init_lake(settings)
    con = sql.connect(settings, model_version="empty")
    assert con.sql("SELECT count(*) FROM codes").fetchone()[0] == 0
    assert con.sql("SELECT * FROM search('00ff00ff00ff00ff', 10)").fetchall() == []
    assert con.sql("SELECT * FROM within('00ff', 3)").fetchall() == []


def publish_test_model(settings, store, version: str):
    """Publish and activate an LSH model with random weights at 32 px; return it."""
    from hashing_models.registry import create_model
    from hashlake.catalog import Catalog, ModelCard

    model = create_model("lsh_effnetlite0_64", pretrained=False, img_size=32)
    card = ModelCard(version=version, arch="lsh_effnetlite0_64", method="lsh", backbone="effnetlite0", bits=64,
                     input_size=32, description="random weights, for tests")
    catalog = Catalog(store, settings)
    catalog.publish(card, model.state_dict())
    catalog.activate(version)
    return model


def test_hash_image_uses_the_active_model(settings, store, tmp_path):
    from PIL import Image

    from hashing_models.preprocess import prepare_images

    model = publish_test_model(settings, store, "lsh-test")

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    expected = model.encode(prepare_images([Image.open(io.BytesIO(buf.getvalue()))], model.input_config))[0]
    image_path = tmp_path / "red.png"
    image_path.write_bytes(buf.getvalue())
    commit_codes(settings, ["red.png", "other.png"], np.stack([expected, ~expected]), version="lsh-test")

    con = sql.connect(settings)  # follows the active pointer
    assert con.execute("SELECT hash_image(?)", [buf.getvalue()]).fetchone()[0] == expected.tobytes()
    assert sql.hash_image(con, image_path) == expected.tobytes()
    hits = con.execute("SELECT key, distance FROM search(hash_image(?), 2)", [str(image_path)]).fetchall()
    assert hits == [("red.png", 0), ("other.png", 64)]
    rows = con.execute("SELECT key, distance, labels FROM search_rows(hash_image(?), 2)", [str(image_path)]).fetchall()
    assert rows == [("red.png", 0, ["cat"]), ("other.png", 64, ["cat"])]
    with pytest.raises(Exception, match="is not a file"):
        con.execute("SELECT hash_image('/nonexistent.jpg')").fetchall()


def test_cli_search_prints_the_nearest_with_labels(settings, store, tmp_path, monkeypatch):
    from PIL import Image
    from rich.console import Console
    from typer.testing import CliRunner

    from hashing_models.preprocess import prepare_images
    from hashlake import cli

    model = publish_test_model(settings, store, "lsh-cli")
    image_path = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (20, 30, 200)).save(image_path)
    code = model.encode(prepare_images([Image.open(image_path)], model.input_config))[0]
    commit_codes(settings, ["far.png", "blue.png"], np.stack([~code, code]), version="lsh-cli")
    env = cli_env(settings)
    monkeypatch.setattr(cli.output, "console", Console(width=200))
    result = CliRunner().invoke(cli.app, ["search", str(image_path), "-k", "2"], env=env)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if ".png" in line]
    assert ["blue.png" in lines[0], "far.png" in lines[1]] == [True, True]
    assert "'cat'" in lines[0] and " 0 " in lines[0] and " 64 " in lines[1]

    # a file that is not an image, and SQL that does not parse: DuckDB's message and status 1, no traceback
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    result = CliRunner().invoke(cli.app, ["search", str(notes)], env=env)
    assert result.exit_code == 1 and "not_an_image" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli.app, ["sql", "SELEC key FROM codes"], env=env)
    assert result.exit_code == 1 and "syntax error" in result.output and "Traceback" not in result.output


def test_hash_image_decodes_like_the_workers(settings, store):
    """EXIF orientation, mode conversion and refusals are the encode workers' (hashing_models.decode)."""
    from PIL import Image

    from hashing_models.decode import decode_image
    from hashing_models.preprocess import prepare_images

    model = publish_test_model(settings, store, "lsh-exif")
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    upright = decode_image(buf.getvalue(), settings.max_image_pixels)
    assert upright.size == (20, 40)
    expected = model.encode(prepare_images([upright], model.input_config))[0].tobytes()

    init_lake(settings)
    con = sql.connect(settings)
    assert sql.hash_image(con, buf.getvalue()) == expected
    with pytest.raises(Exception, match="not_an_image"):
        sql.hash_image(con, b"plain text, not an image")
