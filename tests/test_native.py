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


# ---- ties, threads and an idle pool ---------------------------------------------------------------

def shuffled_identity(n: int, rng: np.random.Generator, prefix: str = "k", descending: bool = False) -> pa.Table:
    """Identity columns whose (bucket, key) order is not the row order: shuffled, or descending."""
    order = np.arange(n)[::-1] if descending else rng.permutation(n)
    stamp = pa.array(np.zeros(n, np.int64)).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"bucket": pa.array(["a" if i % 3 else "b" for i in order]),
                     "key": pa.array([f"{prefix}{i:07d}" for i in order]), "etag": pa.array(["e"] * n),
                     "last_modified": stamp, "encoded_at": stamp})


def test_knn_over_identical_codes_costs_what_a_random_query_costs():
    """A million identical codes all tie at one distance: the k-NN keeps k of them by their tie rank
    instead of sorting a million by strings, so it answers within 2x a query over random codes
    (a complexity check: the same query on the same machine in the same test, medians of rounds)."""
    import statistics
    import time

    rng = np.random.default_rng(12)
    n = 1_000_000
    ident = shuffled_identity(n, rng)
    same = Snapshot(model_version="v", bits=64, segments=(Segment.build(
        np.tile(rng.integers(0, 256, 8, dtype=np.uint8), (n, 1)), ident),), hidden=(np.zeros(0, np.int64),))
    random = Snapshot(model_version="v", bits=64, segments=(Segment.build(
        rng.integers(0, 256, (n, 8), dtype=np.uint8), ident),), hidden=(np.zeros(0, np.int64),))
    con_same, con_random = loader.connect(), loader.connect()
    loader.pin(con_same, same)
    loader.pin(con_random, random)
    queries = [rng.integers(0, 256, 8, dtype=np.uint8).tobytes() for _ in range(4)] + [bytes(same.segments[0].codes[0])]
    expected = sorted(zip(ident.column("bucket").to_pylist(), ident.column("key").to_pylist()))[:10]
    for q in queries:
        got = con_same.execute("SELECT bucket, key FROM search(?, 10)", [q]).fetchall()
        assert got == expected
    times: dict[str, list[float]] = {"same": [], "random": []}
    for _ in range(10):  # rounds: load drift on this shared machine falls on both alike
        for name, con in (("same", con_same), ("random", con_random)):
            for q in queries:
                t0 = time.perf_counter()
                con.execute("SELECT key, distance FROM search(?, 10)", [q]).fetchall()
                times[name].append(time.perf_counter() - t0)
    same_ms, random_ms = (statistics.median(times[k]) * 1e3 for k in ("same", "random"))
    assert same_ms <= 2 * random_ms, (same_ms, random_ms)


@pytest.mark.parametrize("method", [loader.AUTO, loader.ALWAYS_FLAT, loader.ALWAYS_MIH])
def test_tie_rule_is_exact_with_many_ties_across_segments(method):
    """(distance, bucket, key) across three segments (one large enough for split scans and hash
    tables, one with keys in descending row order, one small), hidden rows, k from 1 to past the
    tie groups, single queries and a batch through the list form."""
    rng = np.random.default_rng(21)
    pool = rng.integers(0, 256, (3, 8), dtype=np.uint8)
    sizes = (200_000, 120_000, 2_000)
    segments, hidden, codes_all, keys_all, buckets_all, visible_all = [], [], [], [], [], []
    for s, n in enumerate(sizes):
        codes = pool[0][None].repeat(n, 0) if s == 0 else pool[rng.integers(0, len(pool), n)]
        ident = shuffled_identity(n, rng, prefix=f"s{s}-", descending=s == 1)
        hide = np.flatnonzero(rng.random(n) < 0.1).astype(np.int64)
        segments.append(Segment.build(codes, ident))
        hidden.append(hide)
        codes_all.append(codes)
        keys_all += ident.column("key").to_pylist()
        buckets_all += ident.column("bucket").to_pylist()
        mask = np.ones(n, bool)
        mask[hide] = False
        visible_all.append(mask)
    snap = Snapshot(model_version="v", bits=64, segments=tuple(segments), hidden=tuple(hidden))
    codes, visible = np.concatenate(codes_all), np.concatenate(visible_all)
    keys, buckets = np.array(keys_all), np.array(buckets_all)
    near = pool[1].copy()
    near[0] ^= 1  # one bit from a pool code: ties at distance 1
    queries = np.stack([pool[0], near, rng.integers(0, 256, 8, dtype=np.uint8)])
    dist = hamming_reference(queries, codes)
    con = loader.connect()
    loader.pin(con, snap)
    loader.force_method(method)
    try:
        for j, q in enumerate(queries):
            rows = np.flatnonzero(visible)
            order = rows[np.lexsort((keys[rows], buckets[rows], dist[j, rows]))]
            for k in (1, 10, 500, 5_000):
                got = con.execute("SELECT bucket, key, distance FROM search(?, ?)", [q.tobytes(), k]).fetchall()
                assert got == [(buckets[i], keys[i], int(dist[j, i])) for i in order[:k]], (j, k)
        lists = con.execute("SELECT hashlake_search_list(q, 50) FROM (SELECT unnest(?) AS q) ORDER BY ALL",
                            [[q.tobytes() for q in queries]]).fetchall()
        batch = con.execute("SELECT q, hashlake_search_list(q, 50) FROM (SELECT unnest(?) AS q)",
                            [[q.tobytes() for q in queries]]).fetchall()
        assert len(lists) == len(queries)
        for q, answer in batch:
            j = [x.tobytes() for x in queries].index(q)
            rows = np.flatnonzero(visible)
            order = rows[np.lexsort((keys[rows], buckets[rows], dist[j, rows]))]
            assert [(a["bucket"], a["key"], a["distance"]) for a in answer] == \
                [(buckets[i], keys[i], int(dist[j, i])) for i in order[:50]]
    finally:
        loader.force_method(loader.AUTO)


def test_threads_follow_the_cpu_affinity():
    import os
    import subprocess
    import sys

    here = loader._library().hashlake_threads()
    quota = loader.cgroup_cpus("")
    affinity = len(os.sched_getaffinity(0))
    assert here == (affinity if not quota else min(affinity, -int(-quota // 1)))
    script = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from hashlake.native import loader; print(loader._library().hashlake_threads())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_quota_v2_and_v1(tmp_path):
    """A fake /proc and /sys tree: the tightest quota along the cgroup's ancestors, in cpus."""
    v2 = tmp_path / "v2"
    _write(v2 / "proc/self/cgroup", "0::/app/worker\n")
    _write(v2 / "proc/self/mountinfo", "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n")
    _write(v2 / "sys/fs/cgroup/app/worker/cpu.max", "max 100000\n")
    _write(v2 / "sys/fs/cgroup/app/cpu.max", "150000 100000\n")
    assert loader.cgroup_cpus(str(v2)) == pytest.approx(1.5)

    v1 = tmp_path / "v1"
    _write(v1 / "proc/self/cgroup", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    _write(v1 / "proc/self/mountinfo",
           "25 1 0:21 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
           "26 1 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
    cpu = v1 / "sys/fs/cgroup/cpu,cpuacct"
    _write(cpu / "docker/abc/cpu.cfs_quota_us", "400000\n")
    _write(cpu / "docker/abc/cpu.cfs_period_us", "100000\n")
    _write(cpu / "docker/cpu.cfs_quota_us", "-1\n")
    _write(cpu / "docker/cpu.cfs_period_us", "100000\n")
    assert loader.cgroup_cpus(str(v1)) == pytest.approx(4.0)

    none = tmp_path / "none"
    _write(none / "proc/self/cgroup", "0::/\n")
    _write(none / "proc/self/mountinfo", "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    _write(none / "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert loader.cgroup_cpus(str(none)) == 0


def test_idle_pool_does_not_spin():
    """Pool threads spin for the next query only right after one; with no query coming they sleep:
    no spin starts while idle, and lone queries far apart cost little CPU beyond their own work."""
    import time

    rng = np.random.default_rng(5)
    snap = snapshot_of(rng.integers(0, 256, (300_000, 8), dtype=np.uint8))
    con = loader.connect()
    loader.pin(con, snap)
    lib = loader._library()
    loader.force_method(loader.ALWAYS_FLAT)  # several parts: the pool's threads take some
    try:
        for _ in range(20):
            con.execute("SELECT * FROM search(?, 10)", [rng.integers(0, 256, 8, dtype=np.uint8).tobytes()]).fetchall()
        time.sleep(0.05)  # longer than any spin window
        spins = lib.hashlake_pool_spins()
        cpu0 = time.process_time()
        time.sleep(0.3)
        assert lib.hashlake_pool_spins() == spins
        assert time.process_time() - cpu0 < 0.05
        # lone queries 20 ms apart: a pool thread spins ~0.1 ms after each, not 3 ms
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(25):
            time.sleep(0.02)
            con.execute("SELECT * FROM search(?, 10)", [rng.integers(0, 256, 8, dtype=np.uint8).tobytes()]).fetchall()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        assert cpu < 0.15 * wall, (cpu, wall)
    finally:
        loader.force_method(loader.AUTO)
