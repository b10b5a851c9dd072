"""Start and stop the local back-end processes (redis-server, moto_server, PostgreSQL, Ray, Prometheus) on free ports.

Used by ``hashlake stack`` and by the tests alike, so both exercise the same start-up code.
Each service is a child process with its log in a file; ``stop()`` terminates it (SIGTERM, then
SIGKILL after a grace period).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServiceError(RuntimeError):
    """A back-end process is missing, did not start, or did not become healthy in time."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``check`` every 50 ms; raise ``ServiceError`` naming ``what`` (with the log tail) on timeout
    or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} before it was ready{_tail(log)}")
        try:
            if check():
                return
        except Exception:  # the service is still starting; any error means "not yet"
            pass
        time.sleep(0.05)
    raise ServiceError(f"{what} was not ready after {timeout_s:.0f} s{_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- last lines of " + str(log) + " ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    port: int | None
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def wait_ready(svc: Service, check: Callable[[], bool], timeout_s: float, what: str) -> Service:
    """Wait for ``check``; a service that does not become ready is stopped, never left running."""
    try:
        wait_until(check, timeout_s, what, svc.proc, svc.log)
    except BaseException:
        svc.stop()
        raise
    return svc


def spawn(name: str, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
          port: int | None = None, cwd: Path | None = None) -> Service:
    """Start ``argv`` in its own process group with stdout+stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    return Service(name, proc, port, log)


def find_executable(name: str, hint: str) -> str:
    # Prefer the one beside this interpreter (the project's venv), then PATH.
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found; {hint}")
    return found


def start_redis(port: int, workdir: Path, log: Path | None = None) -> Service:
    exe = find_executable("redis-server", "install it with `make setup` (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    # Append-only file with fsync every second: a restarted broker keeps queued tasks.
    svc = spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                          "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                log or workdir / "redis.log", port=port)
    return wait_ready(svc, lambda: _redis_ping(port), 20, f"redis-server on port {port}")


def _redis_ping(port: int) -> bool:
    import redis

    return bool(redis.Redis(port=port, socket_timeout=0.5).ping())


def start_moto(port: int, workdir: Path, log: Path | None = None) -> Service:
    """moto_server: a real S3 HTTP endpoint that keeps its data in memory (``hashlake.local.s3_server``
    runs it without two of its per-request costs). ``ServiceError`` at once when moto is not installed
    (the ``local`` extra)."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("moto") is None
    except ImportError:
        missing = True
    if missing:
        raise ServiceError("the local stack's S3 server needs moto, which is not installed: "
                           "pip install 'hashlake[local]'")
    svc = spawn("s3", [sys.executable, "-m", "hashlake.local.s3_server", "-H", "127.0.0.1", "-p", str(port)],
                log or workdir / "s3.log", port=port,
                env={"MOTO_ALLOW_NONEXISTENT_REGION": "true"})
    return wait_ready(svc, lambda: _http_ok(f"http://127.0.0.1:{port}/"), 30, f"moto_server on port {port}")


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=0.5) as resp:
        return resp.status < 500


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (``postgres``, ``initdb``): Debian keeps them under
    /usr/lib/postgresql/<major>/bin, off PATH; the newest major installed wins."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    exe = shutil.which(name)
    if not exe:
        raise ServiceError(f"PostgreSQL's {name} not found; install it with `make setup` (apt-get install postgresql)")
    return exe


# The system user that owns a cluster started by root: PostgreSQL refuses to run as root, and
# Debian's postgresql package creates this user.
POSTGRES_OS_USER = "postgres"


def start_postgres(port: int, data_dir: Path, *, superuser: str, password: str, log: Path | None = None,
                   durable: bool = True) -> Service:
    """A PostgreSQL server on 127.0.0.1:``port`` with its cluster in ``data_dir`` (``initdb`` on first
    start), TCP only, password (SCRAM) authentication for ``superuser``.

    Run as root, the cluster belongs to the ``postgres`` system user, so ``data_dir``'s parents must be
    traversable by it. ``durable=False`` turns fsync off: for tests, whose data is thrown away."""
    user = POSTGRES_OS_USER if os.geteuid() == 0 else None
    data_dir = Path(data_dir).resolve()
    log = log or data_dir.parent / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, superuser, password, user)
    options = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"]
    if not durable:
        options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    with open(log, "ab") as out:
        proc = subprocess.Popen([postgres_bin("postgres"), "-D", str(data_dir), "-p", str(port), *options],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, user=user)
    svc = Service("postgres", proc, port, log)
    return wait_ready(svc, lambda: _postgres_ready(port, superuser, password), 30, f"PostgreSQL on port {port}")


def _initdb(data_dir: Path, superuser: str, password: str, user: str | None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / f".{data_dir.name}.pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    try:
        if user is not None:
            shutil.chown(data_dir, user)
            shutil.chown(pwfile, user)
            _check_traversable(data_dir, user)
        result = subprocess.run(
            [postgres_bin("initdb"), "-D", str(data_dir), "-U", superuser, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"],
            capture_output=True, text=True, user=user)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise ServiceError(f"initdb of {data_dir} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def postgres_can_enter(path: Path) -> bool:
    """Whether a cluster under ``path`` can be run: always as a user, as root only when the postgres
    system user can enter every folder above it."""
    if os.geteuid() != 0:
        return True
    try:
        _check_traversable(Path(path).resolve() / "cluster", POSTGRES_OS_USER)
    except (ServiceError, KeyError):
        return False
    return True


def _check_traversable(path: Path, user: str) -> None:
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for parent in path.parents:
        if not parent.exists():
            continue
        st = parent.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise ServiceError(f"PostgreSQL runs as the system user {user!r}, which cannot enter {parent} "
                               f"(mode {oct(st.st_mode & 0o777)}); put the cluster elsewhere or `chmod o+x {parent}`")


def _postgres_ready(port: int, user: str, password: str) -> bool:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres",
                         connect_timeout=1):
        return True


def ray_temp_dir(root: Path) -> Path:
    """A short folder for a Ray head's sessions: Ray puts unix sockets in it, whose paths may not exceed
    107 bytes, so a deep stack folder cannot hold them; named by a hash of ``root``, one per stack."""
    import hashlib

    return Path("/tmp") / f"hl-ray-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"


def start_ray(dashboard_port: int, root: Path, *, num_cpus: int | None = None, env: dict[str, str] | None = None,
              log: Path | None = None, timeout_s: float = 120.0) -> Service:
    """A Ray head (``ray start --head --block``) with its Jobs API on ``dashboard_port``.

    Every port it listens on is a free one (the defaults, e.g. the dashboard agent's 52365, would collide
    with any other Ray cluster on the machine), the node and its dashboard listen on 127.0.0.1 only, and its sessions
    live in ``ray_temp_dir(root)``. ``--block`` keeps ``ray start`` in the foreground as the parent of
    the head's processes, in its own process group: stopping the Service (SIGTERM to the group) stops
    this head and no other cluster (``ray stop`` would stop every Ray process of the machine).
    Token authentication is off: the Jobs API is reachable from this machine only. Ready once the Jobs
    API accepts work (its agent is up), not merely when the dashboard answers."""
    exe = find_executable("ray", "install the project's dependencies with `make setup`")
    ports = {name: free_port() for name in ("port", "ray-client-server-port", "node-manager-port",
                                            "object-manager-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port")}
    argv = [exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", f"--temp-dir={ray_temp_dir(root)}", "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items())]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    # A job's entrypoint (`python -m scheduler.retrain`) finds `python` on the head's PATH: this interpreter's.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    svc = spawn("ray", argv, log or root / "ray.log", env={"RAY_AUTH_MODE": "disabled", "PATH": path, **(env or {})},
                port=dashboard_port)
    return wait_ready(svc, lambda: _ray_jobs_ready(dashboard_port), timeout_s, f"the Ray head on port {dashboard_port}")


def _ray_jobs_ready(port: int) -> bool:
    """The Jobs API answers and its agent is registered (a submit before that fails with HTTP 500)."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v0/nodes?detail=1", timeout=2) as resp:
            nodes = json.load(resp)["data"]["result"]["result"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=2) as resp:
            resp.read()
    except (OSError, ValueError, KeyError):
        return False
    return any(node.get("state") == "ALIVE" for node in nodes)


def start_prometheus(port: int, config: Path, tsdb: Path, log: Path) -> Service:
    """Prometheus on 127.0.0.1:``port`` with ``config``, ready once ``/-/ready`` answers 200: its port opens
    before the TSDB is loaded, and until then every API call answers 503."""
    exe = find_executable("prometheus", "install it with `make setup` (apt-get install prometheus)")
    svc = spawn("prometheus", [exe, f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
                               f"--web.listen-address=127.0.0.1:{port}"], log, port=port)
    return wait_ready(svc, lambda: _http_ok(f"http://127.0.0.1:{port}/-/ready"), 60, f"prometheus on port {port}")


def start_pushgateway(port: int, log: Path) -> Service:
    """A Prometheus Pushgateway (Debian's prometheus-pushgateway) on 127.0.0.1:``port``, in memory only."""
    exe = find_executable("prometheus-pushgateway", "install it with `make setup` (apt-get install prometheus-pushgateway)")
    svc = spawn("pushgateway", [exe, f"--web.listen-address=127.0.0.1:{port}"], log, port=port)
    return wait_ready(svc, lambda: port_open(port), 30, "the Pushgateway")
