"""Chaos: uploads and their MinIO events under faults, then the index compared with a listing of the bucket.

Starts a private local stack (redis-server, moto_server, intake, one Celery worker) in a temporary
folder, then, as a new user's bucket would see it:

  1. uploads N images under awkward keys (spaces, unicode, ``+``, ``%``), with a few bad inputs (zero
     bytes, text, a truncated JPEG, a decompression bomb, a DDS file Pillow's plugin cannot decode) and
     unusual good ones (CMYK, 16-bit, palette with alpha, animated GIF, WebP, grey, 1×1, 4000×30);
  2. posts each upload's MinIO webhook event as MinIO would (one event per POST, kept and retried until a
     2xx), shuffled and 10% sent twice;
  3. meanwhile: SIGKILLs the worker's pool children three times, kills redis-server (SIGKILL) and restarts
     it on its append-only file, kills the intake and restarts it, and stalls the S3 server (SIGSTOP for
     ``--stall-s``, then SIGCONT);
  4. then overwrites 1% of the objects with other images and deletes 1%, with their events;
  5. waits until the index settles, and compares it with a listing of the bucket, only through
     ``hashlake.sql.connect()`` and its ``codes`` and ``failures`` views.

Last lines, each target 0:

  RESULT chaos_lost             listed objects (current etag) with neither a codes row nor a failure row
  RESULT chaos_duplicates       codes rows beyond one per (bucket, key)
  RESULT chaos_stale            codes rows of a deleted key or of an etag the bucket no longer holds
  RESULT chaos_wrong_failures   failure rows (current etag) of an object that is indexed or should be, or
                                with another reason than its bad input's

moto_server sends no bucket notifications: this script is the MinIO server's notification side. The
stack runs with a broker visibility timeout of ``--visibility-s`` (production: 900 s), the time after
which the reconciler queues again what it queued once and never saw indexed, so that a run ends in
minutes rather than a quarter of an hour.

    .venv/bin/python benchmarks/chaos.py [--uploads 10000] [--stall-s 10] [--settle-s 900] [--visibility-s 30]
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashlake.local import stack  # noqa: E402
from hashlake.config import Settings  # noqa: E402
from hashlake.image_sources import SAMPLE, iter_images  # noqa: E402
from hashlake.local.services import Service, spawn, start_redis, wait_ready, port_open  # noqa: E402
from hashlake.store import ObjectStore, StoreError  # noqa: E402
from workers.intake.events import minio_record, webhook_body  # noqa: E402
from workers.intake.webhook import WEBHOOK_PATH  # noqa: E402

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10.parquet"
# Key shapes a new user's bucket holds; MinIO query-escapes them in its events.
KEY_SHAPES = ("plain/{i:05d}.jpg", "with space/{i:05d} copy.jpg", "unicodé/ü{i:05d}.jpg", "plus+sign/{i:05d}+1.jpg",
              "percent%/{i:05d}%20.jpg")


@dataclass(frozen=True)
class ChaosConfig:
    uploads: int = 10_000  # good images uploaded (bad and unusual inputs come on top)
    duplicate_fraction: float = 0.10  # events sent twice
    overwrite_fraction: float = 0.01  # objects PUT again with another image, after the uploads
    delete_fraction: float = 0.01  # objects deleted, after the uploads
    stall_s: float = 10.0  # how long the S3 server is stopped
    outage_s: float = 2.0  # how long redis-server and the intake stay dead before their restart
    settle_s: float = 900.0  # longest wait for the index to settle after the last event
    reconcile_interval_s: float = 5.0
    visibility_s: float = 30.0  # the broker's visibility timeout for this run (see the module docstring)
    upload_threads: int = 8
    seed: int = 0


@dataclass
class ChaosResult:
    lost: int
    duplicates: int
    stale: int
    wrong_failures: int
    listed: int  # objects in the bucket at the end
    indexed: int  # codes rows
    failed: int  # failure rows of current objects
    faults: list[str] = field(default_factory=list)  # what was done, with when (s since the first upload)
    seconds: float = 0.0  # first upload until the index settled
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few keys per non-zero figure


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """key → (bytes, the failure reason the index must give it)."""
    from PIL import Image

    def saved(image, fmt, **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    jpeg = saved(Image.linear_gradient("L").resize((64, 48)).convert("RGB"), "JPEG")
    dds = bytearray(saved(Image.new("RGBA", (24, 20), (9, 99, 199, 255)), "DDS"))
    dds[80:84] = (0).to_bytes(4, "little")  # DDS pixel-format flags Pillow does not implement
    return {"bad/empty.jpg": (b"", "empty"), "bad/notes.txt": (b"a shopping list, not an image", "not_an_image"),
            "bad/truncated.jpg": (jpeg[:300], "truncated"),
            "bad/bomb.png": (saved(Image.new("1", (8000, 6000)), "PNG"), "too_many_pixels"),
            "bad/pixel-format.dds": (bytes(dds), "corrupt")}


def unusual_inputs() -> dict[str, bytes]:
    """Legal images of the modes and shapes a real bucket holds: each must be indexed."""
    from PIL import Image

    def saved(image, fmt, **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    base = Image.linear_gradient("L").resize((60, 40))
    rgb = Image.merge("RGB", (base, base.rotate(90, expand=False), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    frames = [rgb.rotate(a) for a in (0, 30, 60)]
    return {"odd/cmyk.jpg": saved(rgb.convert("CMYK"), "JPEG"),
            "odd/sixteen-bit.png": saved(base.convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"),
            "odd/palette-alpha.png": saved(palette, "PNG"),
            "odd/animated.gif": saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
            "odd/photo.webp": saved(rgb, "WEBP"), "odd/grey.png": saved(base, "PNG"),
            "odd/one-pixel.png": saved(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"),
            "odd/banner.jpg": saved(rgb.resize((4000, 30)), "JPEG")}


def _replacement(key: str) -> bytes:
    """Another image for an overwrite: a JPEG whose colour derives from the key (a new etag)."""
    import hashlib

    from PIL import Image

    r, g, b = hashlib.sha256(key.encode()).digest()[:3]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (r, g, b)).save(buf, "JPEG")
    return buf.getvalue()


def good_bodies(n: int) -> list[bytes]:
    source = CIFAR if CIFAR.exists() else SAMPLE
    bodies = [image.body for image in iter_images(source, limit=min(n, 60_000))]
    return [bodies[i % len(bodies)] for i in range(n)]


class EventSender:
    """The MinIO side of notify_webhook: every event is kept until the intake answered 2xx (MinIO's
    queue_dir), posted one per request over kept-alive connections; refused or unanswered ones wait
    ``retry_s`` and go again, whatever the intake or Redis are going through."""

    def __init__(self, settings: Settings, threads: int = 4, retry_s: float = 0.5):
        self.settings = settings
        self.retry_s = retry_s
        self.queue: deque[bytes] = deque()
        self.lock = threading.Condition()
        self.outstanding = 0  # queued or in flight
        self.refusals = 0  # non-2xx answers and failed connections, retried
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def send(self, records: list[dict]) -> None:
        with self.lock:
            for record in records:
                self.queue.append(webhook_body([record]))
            self.outstanding += len(records)
            self.lock.notify_all()

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self.outstanding and time.monotonic() < deadline:
                self.lock.wait(0.5)
            if self.outstanding:
                raise TimeoutError(f"{self.outstanding} events still not taken by the intake after {timeout_s} s")

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
        for t in self.threads:
            t.join(5)

    def _run(self) -> None:
        conn = None
        headers = {"Content-Type": "application/json",
                   "Authorization": f"Bearer {self.settings.webhook_token.get_secret_value()}"}
        while not self.stop.is_set():
            with self.lock:
                while not self.queue and not self.stop.is_set():
                    self.lock.wait(0.5)
                if self.stop.is_set():
                    return
                body = self.queue.popleft()
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.settings.webhook_port, timeout=10)
                conn.request("POST", WEBHOOK_PATH, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = 200 <= response.status < 300
            except (OSError, http.client.HTTPException):
                ok, conn = False, None
            with self.lock:
                if ok:
                    self.outstanding -= 1
                    self.lock.notify_all()
                    continue
                self.refusals += 1
            time.sleep(self.retry_s)
            with self.lock:
                self.queue.append(body)
                self.lock.notify_all()


class Faults:
    """Kills and stalls the stack's processes; restarts what it killed (and stops it at the end)."""

    def __init__(self, base: Settings, settings: Settings, started_at: float):
        self.base = base
        self.settings = settings
        self.started_at = started_at
        self.records = {r.name: r for r in stack.read_state(base)}
        self.restarted: dict[str, Service] = {}
        self.log: list[str] = []

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.started_at:6.1f} s  {text}")
        print(f"chaos: {self.log[-1]}", flush=True)

    def kill_pool_children(self) -> None:
        worker = self.records["worker0"].pid
        children = _children(worker)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        self.note(f"SIGKILL of the worker's pool children {children}")

    def restart_redis(self, outage_s: float) -> None:
        record = self.records["redis"]
        self._kill("redis", record.pid)
        time.sleep(outage_s)
        root = stack.stack_dir(self.base)
        self.restarted["redis"] = start_redis(record.port, root / "data", root / "logs" / "redis-restarted.log")
        self.note(f"redis-server restarted on port {record.port} after {outage_s} s (append-only file kept)")

    def restart_intake(self, outage_s: float) -> None:
        self._kill("intake", self.restarted["intake"].pid if "intake" in self.restarted else self.records["intake"].pid)
        time.sleep(outage_s)
        root = stack.stack_dir(self.base)
        svc = spawn("intake", [sys.executable, "-m", "hashlake.cli", "intake"], root / "logs" / "intake-restarted.log",
                    env={"HASHLAKE_CONFIG": str(root / stack.CONFIG_FILE)}, port=self.settings.webhook_port)
        self.restarted["intake"] = wait_ready(svc, lambda: port_open(self.settings.webhook_port), 60, "the intake")
        self.note(f"intake restarted after {outage_s} s")

    def stall_s3(self, stall_s: float) -> None:
        pid = self.records["s3"].pid
        os.kill(pid, signal.SIGSTOP)
        self.note(f"S3 server stopped (SIGSTOP) for {stall_s} s")
        try:
            time.sleep(stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.note("S3 server continued (SIGCONT)")

    def stop(self, name: str) -> None:
        if name in self.restarted:
            self.restarted.pop(name).stop()

    def _kill(self, name: str, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)  # the whole process group, as a node failure would
        while stack.pid_alive(pid):
            time.sleep(0.05)
        self.note(f"SIGKILL of {name} (pid {pid})")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/<pid>/stat: the parent's pid
            found.append(int(stat.parent.name))
    return found


def compare(settings: Settings, expected_failures: dict[str, str]) -> ChaosResult:
    """The index against a listing of the bucket, through ``hashlake.sql.connect()``'s views only."""
    from hashlake.sql import connect

    store = ObjectStore(settings)
    listing = {o.key: o.etag for o in store.list(settings.images_bucket)}
    con = connect(settings)
    bucket = settings.images_bucket
    codes = [(k, e) for b, k, e in con.sql("SELECT bucket, key, etag FROM codes").fetchall() if b == bucket]
    failures = [(k, e, r) for b, k, e, r in con.sql("SELECT bucket, key, etag, reason FROM failures").fetchall()
                if b == bucket]
    con.close()
    indexed = set(codes)
    failed = {(k, e): r for k, e, r in failures if listing.get(k) == e}  # failures of the current versions
    lost = [k for k, e in listing.items() if (k, e) not in indexed and (k, e) not in failed]
    seen: set[str] = set()
    duplicates = []
    for k, _ in codes:
        if k in seen:
            duplicates.append(k)
        seen.add(k)
    stale = [k for k, e in codes if listing.get(k) != e]
    wrong = [k for (k, e), reason in failed.items()
             if (k, e) in indexed or expected_failures.get(k) != reason]
    examples = {name: keys[:5] for name, keys in
                (("lost", lost), ("duplicates", duplicates), ("stale", stale), ("wrong_failures", wrong)) if keys}
    return ChaosResult(len(lost), len(duplicates), len(stale), len(wrong), len(listing), len(codes), len(failed),
                       examples=examples)


def run_chaos(config: ChaosConfig, root: Path, log: Callable[[str], None] = print) -> ChaosResult:
    """The whole run in ``root`` (a private stack there, stopped at the end); returns the comparison."""
    rng = random.Random(config.seed)
    os.environ["HASHLAKE_BROKER_VISIBILITY_TIMEOUT_S"] = str(config.visibility_s)  # the stack's processes inherit it
    base = Settings(stack_dir=root)
    settings = stack.up(base, stack.StackOptions(workers=1, prometheus=False,
                                                 reconcile_interval_s=config.reconcile_interval_s),
                        log=lambda *_: None)
    store = ObjectStore(settings)
    sender = EventSender(settings)
    started = time.monotonic()
    faults = Faults(base, settings, started)
    try:
        bad = bad_inputs()
        objects = [(key, body) for key, (body, _) in bad.items()] + list(unusual_inputs().items())
        bodies = good_bodies(config.uploads)
        objects += [(KEY_SHAPES[i % len(KEY_SHAPES)].format(i=i), body) for i, body in enumerate(bodies)]
        rng.shuffle(objects)
        schedule = [(0.15, faults.kill_pool_children), (0.30, lambda: faults.restart_redis(config.outage_s)),
                    (0.45, faults.kill_pool_children), (0.60, lambda: faults.restart_intake(config.outage_s)),
                    (0.75, lambda: faults.stall_s3(config.stall_s)), (0.90, faults.kill_pool_children)]
        uploaded = 0
        fault_thread: threading.Thread | None = None
        chunk = max(20, len(objects) // 50)

        def put(item: tuple[str, bytes]) -> dict:
            key, body = item
            while True:  # a stalled or restarting store: the uploader waits, as a user's client retries
                try:
                    etag = store.put(settings.images_bucket, key, body)
                    return minio_record("s3:ObjectCreated:Put", settings.images_bucket, key, etag=etag,
                                        size=len(body))
                except StoreError:
                    time.sleep(0.5)

        with ThreadPoolExecutor(config.upload_threads) as pool:
            for start in range(0, len(objects), chunk):
                records = list(pool.map(put, objects[start:start + chunk]))
                records += rng.sample(records, int(len(records) * config.duplicate_fraction))  # sent twice
                rng.shuffle(records)
                sender.send(records)
                uploaded += len(records)
                progress = (start + chunk) / len(objects)
                while schedule and progress >= schedule[0][0] and (fault_thread is None or not fault_thread.is_alive()):
                    _, action = schedule.pop(0)
                    fault_thread = threading.Thread(target=action, daemon=True)
                    fault_thread.start()
            for _, action in schedule:  # a small run may end before the last faults were due
                if fault_thread is not None:
                    fault_thread.join()
                fault_thread = threading.Thread(target=action, daemon=True)
                fault_thread.start()
            if fault_thread is not None:
                fault_thread.join()
            log(f"chaos: {len(objects)} objects uploaded, {uploaded} events queued for the intake")

            # Overwrites with other images, and deletes, of objects that are not bad inputs.
            good_keys = [key for key, _ in objects if key not in bad]
            changed = rng.sample(good_keys, int(len(good_keys) * (config.overwrite_fraction + config.delete_fraction)))
            overwrites = changed[:int(len(good_keys) * config.overwrite_fraction)]
            deletes = changed[len(overwrites):]
            sender.send(list(pool.map(put, [(key, _replacement(key)) for key in overwrites])))
            for key in deletes:
                store.delete(settings.images_bucket, key)
            sender.send([minio_record("s3:ObjectRemoved:Delete", settings.images_bucket, key) for key in deletes])
            log(f"chaos: {len(overwrites)} overwrites and {len(deletes)} deletes sent")
        sender.drain(config.settle_s)

        expected = {key: reason for key, (_, reason) in bad.items()}
        deadline = time.monotonic() + config.settle_s
        while True:
            result = compare(settings, expected)
            if (result.lost == result.stale == 0) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        result.seconds = time.monotonic() - started
        result.faults = faults.log + [f"{sender.refusals} event posts refused or unanswered, and retried"]
        return result
    finally:
        sender.close()
        faults.stop("intake")  # what this run restarted is not in the stack's records
        stack.down(base, log=lambda *_: None)
        faults.stop("redis")  # last: the workers' shutdown talks to it
        os.environ.pop("HASHLAKE_BROKER_VISIBILITY_TIMEOUT_S", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=ChaosConfig.uploads)
    parser.add_argument("--stall-s", type=float, default=ChaosConfig.stall_s)
    parser.add_argument("--settle-s", type=float, default=ChaosConfig.settle_s)
    parser.add_argument("--visibility-s", type=float, default=ChaosConfig.visibility_s)
    parser.add_argument("--reconcile-s", type=float, default=ChaosConfig.reconcile_interval_s)
    parser.add_argument("--seed", type=int, default=ChaosConfig.seed)
    args = parser.parse_args()
    config = ChaosConfig(uploads=args.uploads, stall_s=args.stall_s, settle_s=args.settle_s, seed=args.seed,
                         visibility_s=args.visibility_s, reconcile_interval_s=args.reconcile_s)
    with tempfile.TemporaryDirectory(prefix="hashlake-chaos-") as tmp:
        result = run_chaos(config, Path(tmp))
    for line in result.faults:
        print(f"fault: {line}")
    print(f"listed {result.listed} objects; {result.indexed} codes rows, {result.failed} failure rows; "
          f"settled {result.seconds:.0f} s after the first upload")
    for name, keys in result.examples.items():
        print(f"examples of {name}: {keys}")
    print(f"RESULT chaos_lost {result.lost}")
    print(f"RESULT chaos_duplicates {result.duplicates}")
    print(f"RESULT chaos_stale {result.stale}")
    print(f"RESULT chaos_wrong_failures {result.wrong_failures}")


if __name__ == "__main__":
    main()
