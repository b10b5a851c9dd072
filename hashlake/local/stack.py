"""`hashlake stack up|down|status`: the local stack as background processes under one folder.

    <stack_dir>/stack.json    what runs: name, pid, port, log of every process
    <stack_dir>/stack.toml    the settings every process (and every later CLI call) reads
    <stack_dir>/logs/*.log    one log per process
    <stack_dir>/data/         redis append-only file, the lake catalog's PostgreSQL cluster, Prometheus data

Order: redis-server, the S3 server (moto_server: MinIO cannot be installed here, and nothing in the
code depends on which S3 server answers) and PostgreSQL (the lake's catalog, with its read-only query
role), buckets, the lake's tables and an initial model version, the intake (which also compacts the
lake every ``lake_compact_interval_s``), N Celery workers, Prometheus. Each start waits for a health
check. moto_server keeps its objects in memory, so each ``up`` starts with an empty bucket, and the
catalog is made anew with it (a catalog that names files the S3 server no longer has is no lake).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hashlake.config import STACK_CONFIG_FILE, Settings
from hashlake.local.services import (ServiceError, Service, find_executable, free_port, port_open, postgres_can_enter,
                               spawn, start_moto, start_postgres, start_prometheus, start_pushgateway, start_ray, start_redis,
                               wait_ready)

STATE_FILE = "stack.json"
CONFIG_FILE = STACK_CONFIG_FILE
# The catalog's roles in the local stack (the query role's password is Settings' default): local-only
# secrets, like the S3 keys below; a deployment sets its own through HASHLAKE_PG_PASSWORD.
LOCAL_PG_USER = "hashlake"
LOCAL_PG_PASSWORD = "hashlake-local"


@dataclass
class ProcessRecord:
    name: str
    pid: int
    port: int | None
    log: str


@dataclass(frozen=True)
class StackOptions:
    workers: int | None = None  # Celery worker nodes, each one prefork child with the model; None = one per GPU, or 1
    pool_processes: int | None = None  # model processes per worker node; None: 1 on a GPU, else one per core
    torch_threads: int | None = None  # per model process; None splits the cores evenly
    prometheus: bool = True  # start Prometheus when it is installed
    reconcile_interval_s: float = 2.0  # moto sends no bucket events: the reconciler is the live source


def stack_dir(settings: Settings) -> Path:
    return settings.stack_dir.resolve()


def read_state(settings: Settings) -> list[ProcessRecord]:
    path = stack_dir(settings) / STATE_FILE
    if not path.exists():
        return []
    return [ProcessRecord(**r) for r in json.loads(path.read_text())]


def _write_state(settings: Settings, records: list[ProcessRecord]) -> None:
    path = stack_dir(settings) / STATE_FILE
    path.write_text(json.dumps([asdict(r) for r in records], indent=2))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, values: dict) -> None:
    """Write ``values`` as TOML, readable by this user only: it holds the stack's secrets."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))


def up(settings: Settings, options: StackOptions = StackOptions(), log=print) -> Settings:
    """Start the whole stack; return the settings its processes use. Refuses to start twice."""
    root = stack_dir(settings)
    if any(pid_alive(r.pid) for r in read_state(settings)):
        raise ServiceError(f"a stack is already running from {root}; run `hashlake stack down` first")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    records: list[ProcessRecord] = []
    started: list[Service] = []

    def keep(svc: Service) -> None:
        started.append(svc)
        records.append(ProcessRecord(svc.name, svc.pid, svc.port, str(svc.log)))
        _write_state(settings, records)
        log(f"  {svc.name:<10} pid {svc.pid:<7} port {svc.port or '-':<6} log {svc.log}")

    try:
        keep(start_redis(free_port(), root / "data", root / "logs" / "redis.log"))
        keep(start_moto(free_port(), root / "data", root / "logs" / "s3.log"))
        catalog_dir = _catalog_dir(root)
        shutil.rmtree(catalog_dir, ignore_errors=True)  # the S3 server's objects are gone: so is the lake
        keep(start_postgres(free_port(), catalog_dir, superuser=LOCAL_PG_USER, password=LOCAL_PG_PASSWORD,
                            log=root / "logs" / "postgres.log"))
        ray_port = free_port()  # the Ray head's dashboard and Jobs API
        pushgateway = shutil.which("prometheus-pushgateway") if options.prometheus else None
        pushgateway_port = free_port() if pushgateway else None
        gpus, workers, processes = worker_layout(options)
        threads = options.torch_threads or max(1, (os.cpu_count() or 1) // (workers * processes))
        values = {
            "s3_endpoint": f"http://127.0.0.1:{started[1].port}",
            "s3_access_key": "hashlake-local",
            "s3_secret_key": "hashlake-local-secret",
            "webhook_token": secrets.token_urlsafe(24),
            "redis_url": f"redis://127.0.0.1:{started[0].port}/0",
            "pg_port": started[2].port,
            "pg_user": LOCAL_PG_USER,
            "pg_password": LOCAL_PG_PASSWORD,
            "webhook_port": free_port(),
            "metrics_port": free_port(),
            "reconcile_interval_s": options.reconcile_interval_s,
            "torch_threads": threads,
            "stack_dir": str(root),
            "images_bucket": settings.images_bucket,
            "index_bucket": settings.index_bucket,
            "batch_size": settings.batch_size,
            "batch_window_ms": settings.batch_window_ms,
            "ray_address": f"http://127.0.0.1:{ray_port}",
        }
        if pushgateway_port:
            values["pushgateway_url"] = f"127.0.0.1:{pushgateway_port}"
        config_path = root / CONFIG_FILE
        write_config(config_path, values)
        env = {"HASHLAKE_CONFIG": str(config_path)}
        stack_settings = load_stack_settings(config_path)
        _prepare_store(stack_settings, log)

        # the retraining jobs' drivers run on the head and read the stack's settings from its environment
        keep(start_ray(ray_port, root, env=env, log=root / "logs" / "ray.log"))
        if pushgateway_port:
            keep(start_pushgateway(pushgateway_port, root / "logs" / "pushgateway.log"))

        python = sys.executable
        intake = spawn("intake", [python, "-m", "hashlake.cli", "intake"], root / "logs" / "intake.log",
                       env=env, port=stack_settings.webhook_port)
        keep(wait_ready(intake, lambda: port_open(stack_settings.webhook_port), 60, "the intake webhook"))
        worker_ports = [free_port() for _ in range(workers)]  # each node's /metrics
        for i, port in enumerate(worker_ports):
            # One worker node per GPU, each pinned to its own device.
            device = {"HASHLAKE_DEVICE": f"cuda:{i % gpus}"} if gpus else {}
            keep(_start_worker(i, processes, port, {**env, **device}, root))
        if options.prometheus and shutil.which("prometheus"):
            keep(_start_prometheus(f"127.0.0.1:{stack_settings.metrics_port}",
                                   [f"127.0.0.1:{p}" for p in worker_ports], root,
                                   stack_settings.pushgateway_url))
    except BaseException:
        for svc in reversed(started):
            svc.stop()
        (root / STATE_FILE).unlink(missing_ok=True)
        raise
    return stack_settings


def _catalog_dir(root: Path) -> Path:
    """Where the stack's PostgreSQL keeps its cluster: under data/, unless the stack runs as root from a
    folder the postgres system user cannot enter (a 0700 temporary folder): then in a folder of its own
    under the system's temporary folder, named after the stack's."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    if postgres_can_enter(root / "data"):
        return root / "data" / "postgres"
    import hashlib
    import tempfile

    own = Path(tempfile.gettempdir()) / f"hashlake-catalog-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}"
    own.mkdir(mode=0o755, exist_ok=True)
    own.chmod(0o755)
    return own / "postgres"


def load_stack_settings(config_path: Path) -> Settings:
    previous = os.environ.get("HASHLAKE_CONFIG")
    os.environ["HASHLAKE_CONFIG"] = str(config_path)
    try:
        return Settings()
    finally:
        if previous is None:
            os.environ.pop("HASHLAKE_CONFIG")
        else:
            os.environ["HASHLAKE_CONFIG"] = previous


def _prepare_store(settings: Settings, log) -> None:
    from hashlake.catalog import Catalog, ModelNotFound
    from hashlake.lake import init_lake
    from hashlake.model_versions import init_model
    from hashlake.store import ObjectStore

    store = ObjectStore(settings)
    store.ensure_bucket(settings.images_bucket)
    store.ensure_bucket(settings.index_bucket)
    init_lake(settings)
    log(f"  lake       postgresql://{settings.pg_host}:{settings.pg_port}/{settings.pg_database}, "
        f"files under {settings.lake_path}")
    try:
        log(f"  model      {Catalog(store, settings).active()} (active)")
    except ModelNotFound:
        card = init_model(settings)
        log(f"  model      {card.version} created and activated ({card.description})")


def worker_layout(options: StackOptions) -> tuple[int, int, int]:
    """(GPUs, worker nodes, model processes per node). One node per GPU with one process; on CPU, one
    single-threaded model process per core: while one waits on its downloads, another computes."""
    gpus = cuda_device_count()
    workers = options.workers or max(1, gpus)
    processes = options.pool_processes or (1 if gpus else max(1, (os.cpu_count() or 1) // workers))
    return gpus, workers, processes


def model_threads(settings: Settings, options: StackOptions) -> int:
    """Torch threads of all the stack's model processes together (what a fair comparison gets)."""
    _, workers, processes = worker_layout(options)
    return workers * processes * (settings.torch_threads or 1)


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver lists (without importing torch in the launcher); 0 when there is none."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _start_worker(index: int, processes: int, port: int, env: dict, root: Path) -> Service:
    celery = find_executable("celery", "install the project with `make setup`")
    multiproc = root / "data" / f"metrics-worker{index}"
    shutil.rmtree(multiproc, ignore_errors=True)
    multiproc.mkdir(parents=True)
    svc = spawn(f"worker{index}",
                [celery, "-A", "workers.celery_app", "worker", "--pool", "prefork", "--concurrency", str(processes),
                 "--hostname", f"worker{index}@%h", "--loglevel", "INFO"],
                root / "logs" / f"worker{index}.log",
                env={**env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc), "HASHLAKE_WORKER_METRICS_PORT": str(port)},
                port=port)
    # Ready = the pool child logged "ready with model" (workers/tasks.py) and the node's main process
    # serves its metrics (it starts the exporter at Celery's worker_ready, which may come later).
    return wait_ready(svc, lambda: "ready with model" in svc.log.read_text(errors="replace") and port_open(port),
                      240, f"celery worker{index}")


def _start_prometheus(intake: str, workers: list[str], root: Path, pushgateway: str | None = None) -> Service:
    """Prometheus scraping the intake's and each worker node's /metrics, and the Pushgateway."""
    from hashlake.local.prometheus_config import render_local_config

    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(render_local_config(intake, workers, pushgateway=pushgateway))
    return start_prometheus(port, config, root / "data" / "prometheus", root / "logs" / "prometheus.log")


def down(settings: Settings, log=print, grace_s: float = 15.0) -> None:
    """Stop every recorded process (SIGTERM to its process group, SIGKILL after ``grace_s``)."""
    records = read_state(settings)
    for r in reversed(records):
        if pid_alive(r.pid):
            try:
                os.killpg(r.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for r in reversed(records):
        while pid_alive(r.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(r.pid):
            os.killpg(r.pid, signal.SIGKILL)
        log(f"  stopped {r.name} (pid {r.pid})")
    (stack_dir(settings) / STATE_FILE).unlink(missing_ok=True)


def status(settings: Settings) -> list[tuple[ProcessRecord, bool]]:
    return [(r, pid_alive(r.pid) and (r.port is None or port_open(r.port))) for r in read_state(settings)]
