"""Ingest throughput and PUT-to-queryable latency of the local stack, beside the bare model forward.

Starts a private stack (redis-server, moto_server, PostgreSQL, intake, Celery workers) in a temporary
folder and measures in the same run:

  (a) pipeline throughput: N images PUT as fast as possible, from the first PUT until every row
      is committed to the lake (what the SQL layer reads, so "committed" = queryable);
  (b) the bare forward throughput of the same model version, batch size and torch thread count,
      on already-decoded tensors (no I/O, no decode);
  (c) PUT-to-queryable latency, uploading at a steady rate (default 20 images/s).

moto_server sends no bucket notifications, so this script posts for each PUT the MinIO webhook event a
MinIO server would send (same schema, bearer token) to the intake. Before the RESULT lines (last) it
prints where the CPU went during (a) and (b): seconds per stack process, this script, other
processes on the machine ("elsewhere") and idle; the cores are shared, so read a run's figures with
those lines. It also prints the CPU per image of the bare forward, the encode workers and the S3 server,
and the ratio the workers' and the S3 server's CPU alone would allow on these cores.

    .venv/bin/python benchmarks/ingest.py [--images 2000] [--rate 20] [--seconds 30]

2,000 images by default (about 18 s of pipeline on 2 cores): a 600-image run lasts 6 s, in which the
first batch's wait for uploads and the tail (the last batch on one model process while the other has
none left) weigh more; three runs of each on 2026-11-23 gave 101–107 img/s for 600, 105–110 for 2,000.
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# The bare forward runs under the same OpenMP wait policy as the workers (workers/tasks.py), so
# that the ratio compares pipelines, not threading settings; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashlake.local import stack  # noqa: E402
from hashlake.catalog import Catalog  # noqa: E402
from hashlake.config import Settings  # noqa: E402
from hashlake.image_sources import SAMPLE, iter_images  # noqa: E402
from hashlake.index.lake_source import LakeSource  # noqa: E402
from hashlake.store import ObjectStore  # noqa: E402
from hashlake.upload import upload_one  # noqa: E402
from workers.intake.events import minio_record, webhook_body  # noqa: E402
from workers.intake.webhook import WEBHOOK_PATH  # noqa: E402

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10.parquet"


class Uploader:
    """PUT + the MinIO webhook event, as a MinIO server would notify: one POST per event, over a
    kept-alive connection (MinIO's HTTP client keeps its connections to a webhook target open)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = ObjectStore(settings)
        self.headers = {"Content-Type": "application/json",
                        "Authorization": f"Bearer {settings.webhook_token.get_secret_value()}"}
        self.local = threading.local()  # one connection per uploading thread

    def put(self, image) -> tuple[str, str, float]:
        t0 = time.time()
        etag = upload_one(self.store, self.settings.images_bucket, image)
        body = webhook_body([minio_record("s3:ObjectCreated:Put", self.settings.images_bucket, image.name,
                                          etag=etag, size=len(image.body))])
        status = self._post(body)
        if status >= 300:
            raise RuntimeError(f"webhook answered {status}")
        return image.name, etag, t0

    def _post(self, body: bytes) -> int:
        try:
            return self._post_once(body)
        except (http.client.HTTPException, ConnectionError):
            # The intake closed an idle connection (uvicorn keeps them 5 s): post again on a new one.
            # At worst the event is queued twice, which the intake and the workers deduplicate.
            self.local.conn.close()
            self.local.conn = None
            return self._post_once(body)

    def _post_once(self, body: bytes) -> int:
        if getattr(self.local, "conn", None) is None:
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.settings.webhook_port, timeout=10)
        self.local.conn.request("POST", WEBHOOK_PATH, body=body, headers=self.headers)
        resp = self.local.conn.getresponse()
        resp.read()
        return resp.status


class CpuMeter:
    """CPU seconds (user + system) per stack process group, of this script, of everything else on the
    machine ("elsewhere": other users of the shared cores) and idle, from /proc: where the cores went
    during a phase. Every stack process leads its own group (``services.spawn``), so a group's CPU
    includes its children (the Celery pool processes)."""

    def __init__(self, records: list[stack.ProcessRecord]):
        self.names = {r.pid: r.name for r in records}
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        cpu = dict.fromkeys([*self.names.values(), "benchmark"], 0.0)
        me = os.getpid()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            except OSError:
                continue  # the process ended while listing
            pid, pgid = int(stat.parent.name), int(fields[2])
            name = "benchmark" if pid == me else self.names.get(pgid)
            if name:
                cpu[name] += (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        # /proc/stat "cpu": user nice system idle iowait irq softirq steal ... (ticks, all cores)
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = (ticks[3] + ticks[4]) / self.tick
        cpu["elsewhere"] = (sum(ticks) / self.tick - idle) - sum(cpu.values())
        cpu["idle"] = idle
        return cpu

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> str:
        return ", ".join(f"{name} {after[name] - before[name]:.1f}" for name in after)


class LakeWatcher(threading.Thread):
    """Reads the lake's change feed every 100 ms and records when each (key, etag) is first committed."""

    def __init__(self, settings: Settings, version: str):
        super().__init__(daemon=True)
        self.source = LakeSource(settings)
        self.version = version
        self.seen_at: dict[tuple[str, str], float] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        at = self.source.current_snapshot()
        while not self.stop_flag.is_set():
            now_at = self.source.current_snapshot()
            if now_at != at:
                now = time.time()
                codes, _ = self.source.changes(self.version, at, now_at)
                for key, etag in zip(codes["key"].to_pylist(), codes["etag"].to_pylist()):
                    self.seen_at.setdefault((key, etag), now)
                at = now_at
            time.sleep(0.1)

    def wait_for(self, wanted: set[tuple[str, str]], timeout_s: float) -> float:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if wanted <= self.seen_at.keys():
                return max(self.seen_at[w] for w in wanted)
            time.sleep(0.05)
        missing = len(wanted - self.seen_at.keys())
        raise TimeoutError(f"{missing} of {len(wanted)} images not queryable after {timeout_s} s")


def bare_forward(settings: Settings, version: str, images, batch_size: int, threads: int) -> tuple[float, float]:
    """Forward throughput of the same model on decoded, preprocessed tensors (median of batches), and
    the CPU seconds the forward took per image (this process's user + system time over the timed loop)."""
    import io
    import resource

    import torch
    from PIL import Image

    from hashing_models.preprocess import prepare_images
    from hashlake.model_versions import load_version

    model = load_version(Catalog(ObjectStore(settings), settings), version)  # as the workers build it
    torch.set_num_threads(threads)
    pil = [Image.open(io.BytesIO(im.body)).convert("RGB") for im in images]
    batches = [prepare_images(pil[i:i + batch_size], model.input_config) for i in range(0, len(pil), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches
    model.encode(batches[0])  # warm-up
    per_batch = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for batch in batches:
        t0 = time.perf_counter()
        model.encode(batch)
        per_batch.append(len(batch) / (time.perf_counter() - t0))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return statistics.median(per_batch), cpu_s / sum(len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images for the throughput run")
    parser.add_argument("--rate", type=float, default=20.0, help="uploads per second for the latency run")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the latency run")
    parser.add_argument("--workers", type=int, default=1, help="worker nodes")
    parser.add_argument("--processes", type=int, default=None,
                        help="model processes per node (default: the stack's, one per core on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per model process (default: the stack's)")
    parser.add_argument("--dataset", type=Path, default=CIFAR if CIFAR.exists() else SAMPLE)
    args = parser.parse_args()

    n_latency = int(args.rate * args.seconds)
    images = list(iter_images(args.dataset, limit=args.images + n_latency))
    throughput_set, latency_set = images[:args.images], images[args.images:]

    with tempfile.TemporaryDirectory(prefix="hashlake-bench-") as tmp:
        Path(tmp).chmod(0o755)  # run as root, the stack's PostgreSQL (the postgres user) must enter it
        base = Settings(stack_dir=Path(tmp), reconcile_interval_s=3600)
        options = stack.StackOptions(workers=args.workers, pool_processes=args.processes, torch_threads=args.threads,
                                     prometheus=False, reconcile_interval_s=3600)
        settings = stack.up(base, options, log=print)
        try:
            version = Catalog(ObjectStore(settings), settings).active()
            watcher = LakeWatcher(settings, version)
            watcher.start()
            uploader = Uploader(settings)
            from concurrent.futures import ThreadPoolExecutor

            meter = CpuMeter(stack.read_state(base))

            # (a) throughput: everything at once, 8 uploaders in parallel.
            cpu0 = meter.sample()
            t0 = time.time()
            with ThreadPoolExecutor(8) as pool:
                sent = list(pool.map(uploader.put, throughput_set))
            t_done = watcher.wait_for({(k, e) for k, e, _ in sent}, timeout_s=1800)
            pipeline_rate = len(sent) / (t_done - t0)
            cpu1 = meter.sample()
            cpu_throughput = CpuMeter.spent(cpu0, cpu1)
            s3_cpu_s = cpu1["s3"] - cpu0["s3"]
            worker_cpu_s = sum(cpu1[name] - cpu0[name] for name in cpu1 if name.startswith("worker"))

            # (c) latency at a steady rate.
            put_times: dict[tuple[str, str], float] = {}
            interval = 1.0 / args.rate
            start = time.time()
            with ThreadPoolExecutor(4) as pool:
                futures = []
                for i, image in enumerate(latency_set):
                    time.sleep(max(0.0, start + i * interval - time.time()))
                    futures.append(pool.submit(uploader.put, image))
                for f in futures:
                    key, etag, t_put = f.result()
                    put_times[(key, etag)] = t_put
            watcher.wait_for(set(put_times), timeout_s=600)
            watcher.stop_flag.set()
            latencies = np.array([watcher.seen_at[k] - t for k, t in put_times.items()])

            # The bare forward gets every thread the pipeline's model processes had together, up to one
            # per core: a lone forward with more threads than cores only runs slower, which would flatter
            # a pipeline that runs more model processes than cores.
            threads = min(stack.model_threads(settings, options), os.cpu_count() or 1)
            cpu0 = meter.sample()
            bare_rate, forward_cpu_per_image = bare_forward(settings, version, throughput_set, settings.batch_size,
                                                            threads)
            cpu_bare = CpuMeter.spent(cpu0, meter.sample())
        finally:
            stack.down(base, log=lambda *_: None)

    print(f"cpu s during the throughput run ({len(throughput_set) / pipeline_rate:.1f} s wall): {cpu_throughput}")
    print(f"cpu s during the bare forward (model load and decoding included): {cpu_bare}")
    print(f"pipeline: {len(throughput_set)} images in {len(throughput_set) / pipeline_rate:.1f} s; "
          f"bare forward: {bare_rate:.1f} img/s (batch {settings.batch_size}, {threads} threads); "
          f"latency at {args.rate}/s over {len(latencies)} images: p50 {np.percentile(latencies, 50):.2f} s")
    # What the ratio could reach on these cores if the intake, the uploads and idle time cost nothing:
    # the encode workers' and the S3 server's CPU of this run still have to fit on os.cpu_count() cores.
    n, cores = len(throughput_set), os.cpu_count() or 1
    ceiling = (n / bare_rate) / ((worker_cpu_s + s3_cpu_s) / cores)
    print(f"CPU per image: bare forward {forward_cpu_per_image * 1e3:.1f} ms ({threads} threads); in the pipeline, "
          f"encode workers {worker_cpu_s / n * 1e3:.1f} ms (read, decode, forward, write), S3 server "
          f"{s3_cpu_s / n * 1e3:.1f} ms; with intake, uploads and idle free the ratio could reach {ceiling:.2f}")
    print(f"RESULT ingest_images_per_s {pipeline_rate:.2f}")
    print(f"RESULT bare_forward_images_per_s {bare_rate:.2f}")
    print(f"RESULT ingest_vs_bare_forward_ratio {pipeline_rate / bare_rate:.3f}")
    print(f"RESULT put_to_query_p50_s {np.percentile(latencies, 50):.3f}")
    print(f"RESULT put_to_query_p95_s {np.percentile(latencies, 95):.3f}")


if __name__ == "__main__":
    main()
