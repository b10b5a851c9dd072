"""The MinIO webhook receiver: authenticated POSTs of bucket events, answered 2xx once queued (or dead-lettered) in Redis.

``POST /minio/events`` with ``Authorization: Bearer <Settings.webhook_token>``:

- 200 ``{"queued": n, "ignored": k}``: every record's event is in the pending list (one RPUSH: atomic,
  in Redis when Redis answered). The batcher takes it from there. Ignored: other event types, and
  events of buckets other than ``Settings.images_bucket``.
- 200 ``{"queued", "ignored", "dead_lettered", "errors"}``: the body, or some of its records, are
  malformed. The valid records ARE queued, and the body goes to the dead-letter list
  (``<events_key>:dead``, with the errors naming each refused record by position and field; read it
  with ``hashlake intake dead-letters``), in the same MULTI/EXEC. Never a 4xx: MinIO retries every
  non-2xx answer for ever from its queue_dir, which would re-queue the valid records each time and
  never get past the bad one. A body over ``MAX_BODY_BYTES`` is dead-lettered the same way (its head).
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
from workers.intake.events import MalformedEvent, ParsedRecords, parse_webhook_body
from workers.intake.pending import IntakeKeys, dead_letter, encode_entry

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/minio/events"
SOURCE = "webhook"
MAX_BODY_BYTES = 4 * 1024 * 1024  # MinIO posts one event (~1 KiB) per request; 4 MiB is generous
DEAD_BODY_BYTES = 64 * 1024  # what the dead-letter list keeps of a body over MAX_BODY_BYTES
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


def _queue(client: redis.Redis, keys: IntakeKeys, parsed: ParsedRecords, body: bytes) -> None:
    """The body's valid events to the pending list and, when some records were refused, the body with
    the refusals to the dead-letter list: one MULTI/EXEC, so both are in Redis or neither is."""
    pipe = client.pipeline(transaction=True)
    if parsed.events:
        pipe.rpush(keys.pending, *(encode_entry(e, SOURCE) for e in parsed.events))
    if parsed.errors:
        queued = f" ({len(parsed.events)} valid records were queued)" if parsed.events else ""
        dead_letter(pipe, keys, SOURCE, body, "; ".join(parsed.errors) + queued)
    if parsed.events or parsed.errors:
        pipe.execute()


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
            parsed = ParsedRecords(errors=[f"body of {len(body)} bytes is over {MAX_BODY_BYTES}; its first "
                                           f"{DEAD_BODY_BYTES} bytes are kept"])
            body = body[:DEAD_BODY_BYTES]
        else:
            try:
                parsed = parse_webhook_body(body)
            except MalformedEvent as exc:
                parsed = ParsedRecords(errors=[str(exc)])
        foreign = parsed.keep_bucket(settings.images_bucket)
        if foreign:
            log.warning("webhook: ignored events of bucket(s) %s: this intake indexes %r", foreign,
                        settings.images_bucket)
        try:
            await run_in_threadpool(_queue, client, keys, parsed, body)
        except redis.RedisError as exc:
            metrics.BROKER_ERRORS.labels(SOURCE).inc()
            log.warning("webhook: Redis did not take %d events (%s); answered 503", len(parsed.events), exc)
            return JSONResponse({"detail": f"broker unavailable ({exc.__class__.__name__}); retry later"},
                                status_code=503, headers={"Retry-After": RETRY_AFTER_S})
        for event in parsed.events:
            metrics.EVENTS.labels(SOURCE, "created" if event.kind == "encode" else "removed").inc()
        if parsed.ignored:
            metrics.EVENTS.labels(SOURCE, "ignored").inc(parsed.ignored)
        answer = {"queued": len(parsed.events), "ignored": parsed.ignored}
        if parsed.errors:
            metrics.MALFORMED.labels(SOURCE).inc(len(parsed.errors))
            metrics.DEAD_LETTERED.labels(SOURCE).inc()
            log.error("webhook: %d malformed record(s) refused, the body kept in %s: %s", len(parsed.errors),
                      keys.dead, "; ".join(parsed.errors))
            answer.update(dead_lettered=len(parsed.errors), errors=parsed.errors)
        return JSONResponse(answer)

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
