"""The MinIO webhook receiver: authenticated POSTs of bucket events, answered 2xx only once queued in Redis.

``POST /minio/events`` with ``Authorization: Bearer <Settings.webhook_token>``:

- 200 ``{"queued": n, "ignored": k}``: every record's event is in the pending list (one RPUSH: atomic,
  in Redis when Redis answered). The batcher takes it from there. Ignored: other event types, and
  events of buckets other than ``Settings.images_bucket``.
- 400 ``{"detail", "queued", "errors"}``: the body, or some records, are malformed. Valid records of
  the same body ARE queued first (so one bad record does not hold back the others); ``errors`` names
  each refused record by position and field. MinIO retries non-2xx answers, so a retried body queues
  its valid records again: duplicates, harmless (batch ids are content-derived, the encoder dedups).
- 401: no or wrong bearer token. 503 (``Retry-After``): Redis did not take the events; MinIO keeps them
  in its queue_dir and retries, so nothing is lost.

``HEAD /minio/events`` answers 200 (MinIO probes the endpoint when the target is configured);
``GET /healthz`` is 200 when Redis answers.
"""
from __future__ import annotations

import hmac
import logging

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from hashlake.config import Settings
from workers.intake import metrics
from workers.intake.events import MalformedEvent, parse_webhook_body
from workers.intake.pending import IntakeKeys, push_pending

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/minio/events"
SOURCE = "webhook"
MAX_BODY_BYTES = 4 * 1024 * 1024  # MinIO posts one event (~1 KiB) per request; 4 MiB is generous
RETRY_AFTER_S = "5"


# A bearer token shorter than this is refused at start: 16 url-safe characters are ~96 bits, beyond
# guessing over HTTP; an empty one (compose passes an unset variable as "") would open the door.
MIN_TOKEN_CHARS = 16
DEFAULT_TOKEN = "change-me"  # Settings.webhook_token's default: known to everyone who read the code


class WeakWebhookToken(ValueError):
    """``Settings.webhook_token`` is empty, the default or too short; the message says how to set one."""


def check_webhook_token(settings: Settings) -> None:
    """Refuse a token that would let anyone post events: empty, the default or under ``MIN_TOKEN_CHARS``."""
    token = settings.webhook_token.get_secret_value()
    if token == DEFAULT_TOKEN:
        problem = f"is the default {DEFAULT_TOKEN!r}"
    elif len(token.strip()) < MIN_TOKEN_CHARS:
        problem = "is empty" if not token.strip() else f"has {len(token.strip())} characters"
    else:
        return
    raise WeakWebhookToken(
        f"the webhook token (HASHLAKE_WEBHOOK_TOKEN) {problem}; the intake needs one of at least {MIN_TOKEN_CHARS} "
        f"characters: set HASHLAKE_WEBHOOK_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))') "
        f"(or webhook_token in the HASHLAKE_CONFIG file), and give MinIO the same one as its webhook auth_token")


def create_webhook_app(settings: Settings, client: redis.Redis, keys: IntakeKeys) -> FastAPI:
    """The webhook's routes; refuses to build (``WeakWebhookToken``) with a token anyone could guess."""
    check_webhook_token(settings)
    app = FastAPI(title="hashlake intake", docs_url=None, redoc_url=None, openapi_url=None)
    expected = settings.webhook_token.get_secret_value().strip().encode()

    @app.post(WEBHOOK_PATH)
    async def minio_events(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: the answer's timing must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            what = "no Authorization header" if not header else "wrong bearer token"
            return JSONResponse({"detail": f"{what}: send 'Authorization: Bearer <HASHLAKE_WEBHOOK_TOKEN>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            metrics.MALFORMED.labels(SOURCE).inc()
            return JSONResponse({"detail": f"body of {len(body)} bytes is over {MAX_BODY_BYTES}"}, status_code=413)
        try:
            parsed = parse_webhook_body(body)
        except MalformedEvent as exc:
            metrics.MALFORMED.labels(SOURCE).inc()
            log.warning("webhook: refused body: %s", exc)
            return JSONResponse({"detail": str(exc), "queued": 0, "errors": [str(exc)]}, status_code=400)
        foreign = parsed.keep_bucket(settings.images_bucket)
        if foreign:
            log.warning("webhook: ignored events of bucket(s) %s: this intake indexes %r", foreign,
                        settings.images_bucket)
        try:
            await run_in_threadpool(push_pending, client, keys, parsed.events, SOURCE)
        except redis.RedisError as exc:
            metrics.BROKER_ERRORS.labels(SOURCE).inc()
            log.warning("webhook: Redis did not take %d events (%s); answered 503", len(parsed.events), exc)
            return JSONResponse({"detail": f"broker unavailable ({exc.__class__.__name__}); retry later"},
                                status_code=503, headers={"Retry-After": RETRY_AFTER_S})
        for event in parsed.events:
            metrics.EVENTS.labels(SOURCE, "created" if event.kind == "encode" else "removed").inc()
        if parsed.ignored:
            metrics.EVENTS.labels(SOURCE, "ignored").inc(parsed.ignored)
        if parsed.errors:
            metrics.MALFORMED.labels(SOURCE).inc(len(parsed.errors))
            log.warning("webhook: %d malformed records refused: %s", len(parsed.errors), "; ".join(parsed.errors))
            return JSONResponse({"detail": f"{len(parsed.errors)} malformed record(s) refused; the "
                                           f"{len(parsed.events)} valid ones were queued",
                                 "queued": len(parsed.events), "errors": parsed.errors}, status_code=400)
        return JSONResponse({"queued": len(parsed.events), "ignored": parsed.ignored})

    @app.head(WEBHOOK_PATH)
    async def probe() -> Response:
        return Response(status_code=200)

    @app.get("/healthz")
    async def healthz() -> Response:
        try:
            await run_in_threadpool(client.ping)
        except redis.RedisError as exc:
            return JSONResponse({"redis": f"unavailable ({exc.__class__.__name__})"}, status_code=503)
        return JSONResponse({"redis": "ok"})

    return app
