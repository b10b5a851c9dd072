"""The hashlake_hamming extension: its build, snapshot lifetime, SQL argument handling, and exactness
on segments large enough that a single query's scan is split into parts run on several threads."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pyarrow as pa
import pytest

from hashing_models.codes import hamming_reference
from hashlake.index.snapshot import Segment, Snapshot
from hashlake.native import build, loader


def identity(n: int, prefix: str = "k") -> pa.Table:
    stamp = pa.array(np.zeros(n, np.int64)).cast(pa.timestamp("us", tz="UTC"))
    keys = pa.array([f"{prefix}{i:07d}" for i in range(n)])
    buckets = pa.array(["b" if i % 3 else "a" for i in range(n)])
    return pa.table({"bucket": buckets, "key": keys, "etag": pa.array(["e"] * n), "last_modified": stamp,
                     "encoded_at": stamp})


def snapshot_of(codes: np.ndarray, hidden: np.ndarray | None = None) -> Snapshot:
    seg = Segment.build(codes, identity(codes.shape[0]))
    return Snapshot(model_version="v", bits=codes.shape[1] * 8, segments=(seg,),
                    hidden=(np.zeros(0, np.int64) if hidden is None else hidden,))


def test_footer_layout():
    footer = build.footer("linux_amd64")
    assert len(footer) == 512
    fields = [footer[i * 32:(i + 1) * 32].rstrip(b"\0").decode() for i in range(8)][::-1]
    assert fields[:5] == ["4", "linux_amd64", build.C_API_VERSION, build.EXTENSION_VERSION, "C_STRUCT"]
    assert footer[256:] == b"\0" * 256
    with pytest.raises(build.BuildError, match="longer than 32 bytes"):
        build.footer("x" * 33)


def test_search_and_within_arguments():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (50, 8), dtype=np.uint8)
    snap = snapshot_of(codes)
    con = loader.connect()
    loader.pin(con, snap)
    q = codes[7]
    as_blob = con.execute("SELECT key, distance FROM search(?, 1)", [q.tobytes()]).fetchall()
    as_hex = con.execute(f"SELECT key, distance FROM search('0x{q.tobytes().hex().upper()}', 1)").fetchall()
    assert as_blob == as_hex == [("k0000007", 0)]
    assert con.execute("SELECT * FROM search(NULL, 3)").fetchall() == []
    assert con.execute("SELECT * FROM within(?, NULL)", [q.tobytes()]).fetchall() == []
    with pytest.raises(Exception, match="not a hex code: 'zz'"):
        con.execute("SELECT * FROM search('zz', 3)")
    with pytest.raises(Exception, match="must be a code given as a BLOB or as hex text"):
        con.execute("SELECT * FROM search(42, 3)")
    with pytest.raises(Exception, match="query code has 16 bits but the index of model version 'v' holds 64-bit"):
        con.execute("SELECT * FROM within('00ff', 3)")
    with pytest.raises(Exception, match="k must be at least 1, got 0"):
        con.execute("SELECT * FROM search(?, 0)", [q.tobytes()])
    with pytest.raises(Exception, match="radius must be at least 0, got -1"):
        con.execute("SELECT hashlake_within_list(?, -1)", [q.tobytes()])


def test_connection_without_snapshot_says_so():
    con = loader.connect()
    with pytest.raises(Exception, match="this connection has no index snapshot"):
        con.execute("SELECT * FROM search('00', 1)")


def test_forgotten_snapshot_is_released_and_other_pins_survive():
    rng = np.random.default_rng(1)
    kept = snapshot_of(rng.integers(0, 256, (20, 8), dtype=np.uint8))
    con = loader.connect()
    loader.pin(con, kept)
    dropped = snapshot_of(rng.integers(0, 256, (20, 8), dtype=np.uint8))
    dropped_id = loader.publish(dropped)
    del dropped
    gc.collect()
    loader.publish(kept)  # a publish sweeps what was retired
    assert loader._library().hashlake_forget(dropped_id) == -1  # already gone
    assert len(con.execute("SELECT * FROM search(?, 5)", [bytes(8)]).fetchall()) == 5


@pytest.mark.parametrize("method", [loader.AUTO, loader.ALWAYS_FLAT, loader.ALWAYS_MIH])
@pytest.mark.parametrize("nbytes", [6, 8, 32])
def test_split_scans_are_exact_with_ties_and_hidden_rows(method, nbytes):
    """300k rows: a single query's flat scan runs as several parts on the pool's threads. Codes from a
    small pool make thousands of ties at each distance, so the cut and the tie rule cross parts."""
    rng = np.random.default_rng(nbytes)
    n = 300_000
    pool = rng.integers(0, 256, (40, nbytes), dtype=np.uint8)
    codes = pool[rng.integers(0, len(pool), n)]
    hidden = np.flatnonzero(rng.random(n) < 0.1).astype(np.int64)
    snap = snapshot_of(codes, hidden)
    ident = snap.segments[0].columns
    queries = np.stack([pool[3], rng.integers(0, 256, nbytes, dtype=np.uint8)])
    dist = hamming_reference(queries, codes)
    visible = np.setdiff1d(np.arange(n), hidden)
    buckets, keys = ident.column("bucket").to_numpy(zero_copy_only=False), ident.column("key").to_numpy(zero_copy_only=False)
    con = loader.connect()
    loader.pin(con, snap)
    loader.force_method(method)
    try:
        for j, q in enumerate(queries):
            order = sorted(visible, key=lambda i: (dist[j, i], buckets[i], keys[i]))
            got = con.execute("SELECT key, distance FROM search(?, 25)", [q.tobytes()]).fetchall()
            assert got == [(keys[i], int(dist[j, i])) for i in order[:25]]
            radius = int(dist[j, order[0]])
            got = con.execute("SELECT key FROM within(?, ?)", [q.tobytes(), radius]).fetchall()
            assert [k for (k,) in got] == [keys[i] for i in order if dist[j, i] <= radius]
    finally:
        loader.force_method(loader.AUTO)


def test_concurrent_queries_and_publishes():
    """Queries on several threads while new snapshots are published and pinned: no crash, every
    answer exact for the snapshot its connection was pinned to."""
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (200_000, 8), dtype=np.uint8)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            local = np.random.default_rng(seed)
            con = loader.connect()
            for _ in range(6):
                rows = int(local.integers(150_000, 200_000))
                snap = snapshot_of(base[:rows])
                loader.pin(con, snap)
                q = base[int(local.integers(0, rows))]
                got = [d for (d,) in con.execute("SELECT distance FROM search(?, 10)", [q.tobytes()]).fetchall()]
                assert got == sorted(hamming_reference(q[None], base[:rows])[0])[:10]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
