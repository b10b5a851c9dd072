"""The long-running intake process: webhook server, Redis-list consumer, batcher, periodic reconciler and
lake compaction.

Five threads in one process around one Redis client pool; the main thread waits for a stop signal
(SIGTERM/SIGINT, or ``stop`` set by a caller) or for a component that died, then stops them all: the
batcher sends its open batches, the webhook finishes its requests. A component that dies makes
``run_intake`` raise, so a supervisor (compose, systemd, ``hashlake stack``) restarts the process.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack

import uvicorn
from prometheus_client import REGISTRY, start_http_server

from hashlake.config import Settings
from hashlake.lake.maintenance import compact_periodically
from hashlake.store import ObjectStore
from workers.intake.batcher import Batcher
from workers.intake.metrics import ListLengthCollector
from workers.intake.pending import IntakeKeys, intake_redis
from workers.intake.reconciler import Reconciler, run_periodic
from workers.intake.redis_source import RedisListConsumer
from workers.intake.sender import BatchSender, task_queue_names
from workers.intake.webhook import WEBHOOK_PATH, check_webhook_token, create_webhook_app

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 15.0  # a last batch publish (~3 s on a dead broker) plus a webhook request in flight


class IntakeStopped(RuntimeError):
    """A component of the intake stopped unexpectedly; the message names it."""


def run_intake(settings: Settings, *, stop: threading.Event | None = None, metrics_port: int | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Webhook on ``settings.webhook_host:webhook_port``,
    Prometheus metrics on ``metrics_port`` (default ``settings.metrics_port``; 0 = none). Raises
    ``WeakWebhookToken`` at once when the webhook token is empty, the default or short."""
    check_webhook_token(settings)  # WeakWebhookToken before anything starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = stop or threading.Event()
    keys = IntakeKeys.for_settings(settings)
    with ExitStack() as cleanup:  # whatever was set up is torn down, also when a later step fails
        client = intake_redis(settings)
        cleanup.callback(client.close)
        sender = BatchSender(settings)
        cleanup.callback(sender.close)
        webhook_socket = _bind(settings.webhook_host, settings.webhook_port)
        cleanup.callback(webhook_socket.close)
        queues = task_queue_names(settings, sender.app)
        collector = ListLengthCollector(client, keys, queues)
        REGISTRY.register(collector)
        cleanup.callback(REGISTRY.unregister, collector)
        port = settings.metrics_port if metrics_port is None else metrics_port
        if port:
            metrics_server, _ = start_http_server(port, addr=settings.webhook_host)
            cleanup.callback(metrics_server.server_close)
            cleanup.callback(metrics_server.shutdown)

        server = uvicorn.Server(uvicorn.Config(create_webhook_app(settings, client, keys), log_level="warning",
                                               lifespan="off", timeout_graceful_shutdown=5))
        batcher = Batcher(client, keys, sender, batch_size=settings.batch_size, window_ms=settings.batch_window_ms)
        consumer = RedisListConsumer(client, keys, settings.images_bucket)
        reconciler = Reconciler(settings, ObjectStore(settings), client, keys, queues)
        components: dict[str, Callable[[], None]] = {
            "webhook": lambda: server.run(sockets=[webhook_socket]),
            "batcher": lambda: batcher.run(stop),
            "redis consumer": lambda: consumer.run(stop),
            "reconciler": lambda: run_periodic(reconciler, settings.reconcile_interval_s, stop),
            "compactor": lambda: compact_periodically(settings, stop),
        }
        threads = {name: threading.Thread(target=_logged(name, target), name=f"intake-{name}", daemon=True)
                   for name, target in components.items()}
        cleanup.callback(_on_signals(stop))
        log.info("intake: webhook on http://%s:%d%s, metrics on :%s, events list %r, batches of %d objects or "
                 "%d ms", settings.webhook_host, settings.webhook_port, WEBHOOK_PATH, port or "-", keys.events,
                 settings.batch_size, settings.batch_window_ms)
        for thread in threads.values():
            thread.start()
        died = None
        try:
            while not stop.wait(0.2):
                died = next((name for name, t in threads.items() if not t.is_alive()), None)
                if died:
                    break
        finally:
            stop.set()
            server.should_exit = True
            for thread in threads.values():
                thread.join(JOIN_TIMEOUT_S)
    if died:
        raise IntakeStopped(f"intake {died} stopped unexpectedly; the log above says why")
    log.info("intake: stopped")


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and
    # accepted sockets inherit the listener's protocol. With Nagle on, a response written in two parts
    # (uvicorn: head, then body) waits for the client's delayed ACK: +40 ms per POST on a kept-alive
    # connection, which is how MinIO posts its events.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"webhook cannot listen on {host}:{port} ({exc}); set HASHLAKE_WEBHOOK_HOST/PORT") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _logged(name: str, target: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except BaseException:  # the thread ends either way; the main thread sees it dead and stops
            log.exception("intake %s failed", name)
            raise
    return run


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop`` (only possible from the main thread); returns a function restoring
    the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore
