"""Object store access through the ``minio`` SDK: the same code talks to MinIO and to moto_server.

Errors are split in two kinds, because the pipeline treats them differently:
``ObjectMissing`` (the object is gone: record a failure, move on) and ``StoreUnavailable``
(the server did not answer: retry later with backoff, never record a failure).
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import urllib3
from minio import Minio
from minio.error import S3Error

from hashlake.config import Settings


class StoreError(RuntimeError):
    """Base of the object store errors below."""


class ObjectMissing(StoreError):
    """The object (or its bucket) does not exist: a permanent condition for this (key, etag)."""


class StoreUnavailable(StoreError):
    """The server could not be reached or answered 5xx: transient, retry with backoff."""


class ObjectRefused(StoreError):
    """The server refuses this object (AccessDenied, InvalidObjectState, ...): permanent until
    someone changes its permissions or state, so it is recorded, not retried."""


class ObjectExists(StoreError):
    """A conditional create (``ObjectStore.create``) found the key already taken by other bytes."""


_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NoSuchVersion"}
# A conditional write that lost: 412 when the key exists, 409 when S3 saw a concurrent conditional
# write to it still in progress (AWS documents both for PutObject with If-None-Match).
_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    etag: str  # without quotes, as MinIO's events carry it
    size: int
    last_modified: datetime | None  # a GET's header: whole seconds; a listing's: milliseconds
    metadata: dict[str, str]
    version_id: str | None = None  # in a versioned bucket, the version read; None elsewhere


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


class ObjectStore:
    """A thin, typed face over ``minio.Minio`` with the error split above."""

    def __init__(self, settings: Settings, *, timeout_s: float = 10.0, retries: int = 2):
        # Short timeouts and few urllib3 retries: the callers (Celery, the reconciler) own the
        # longer backoff, so a dead server surfaces as StoreUnavailable within seconds.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s * 3),
            maxsize=64,
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self.settings = settings
        self.client = Minio(
            settings.s3_netloc,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )

    # -- buckets --------------------------------------------------------------------------------
    def ensure_bucket(self, bucket: str) -> None:
        with self._errors(bucket, ""):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)

    # -- objects --------------------------------------------------------------------------------
    def get(self, bucket: str, key: str, *, max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
        """Read a whole object; raise ``ObjectMissing`` / ``StoreUnavailable`` / ``ObjectTooLarge``."""
        with self._errors(bucket, key):
            resp = self.client.get_object(bucket, key)
            try:
                info = ObjectInfo(
                    bucket=bucket,
                    key=key,
                    etag=_strip_etag(resp.headers.get("ETag")),
                    size=int(resp.headers.get("Content-Length", 0)),
                    last_modified=_parse_http_date(resp.headers.get("Last-Modified")),
                    metadata=_user_metadata(resp.headers),
                    version_id=_version_id(resp.headers.get("x-amz-version-id")),
                )
                if max_bytes is not None and info.size > max_bytes:
                    raise ObjectTooLarge(f"s3://{bucket}/{key} is {info.size} bytes, over the limit of {max_bytes}")
                body = resp.read()
            except BaseException:
                resp.close()  # the body is left unread: this connection cannot carry another request
                raise
            finally:
                # Back to the pool: a server that keeps connections alive (MinIO) takes the next request
                # on it. Closing it after every read, as the SDK's examples do, costs a TCP connection per
                # GET there. (moto_server closes every connection itself, so locally it makes no difference.)
                resp.release_conn()
        return body, info

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        with self._errors(bucket, key):
            st = self.client.stat_object(bucket, key)
        return ObjectInfo(bucket, key, _strip_etag(st.etag), st.size or 0, st.last_modified,
                          _user_metadata(st.metadata or {}), _version_id(st.version_id))

    def put(self, bucket: str, key: str, body: bytes, *, content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> str:
        """Write an object whole; return its etag.

        One PUT is all-or-nothing on S3, MinIO and moto: a reader (a listing included) sees the
        previous object or the new one, never part of it, and a writer that dies mid-upload leaves
        nothing behind (above the SDK's multipart threshold, an incomplete upload that no listing
        shows). So model files are written with this too; no temporary name is needed."""
        with self._errors(bucket, key):
            res = self.client.put_object(bucket, key, io.BytesIO(body), len(body),
                                         content_type=content_type, metadata=metadata)
        return _strip_etag(res.etag)

    def create(self, bucket: str, key: str, body: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Write an object only if ``key`` does not exist yet, atomically (``If-None-Match: *``); return
        its etag, or raise ``ObjectExists``. Of concurrent creates of one key, exactly one succeeds.

        The server decides, in one request: MinIO, AWS S3 and moto_server (5.2.5, ``put_object`` in
        ``moto/s3/responses.py``) all answer 412 PreconditionFailed to a PUT with ``If-None-Match: *``
        over an existing key. The minio SDK's ``put_object`` turns unknown headers into user metadata,
        so this sends the single PutObject through its ``_put_object`` with the header as is (one PUT,
        up to S3's 5 GiB single-PUT limit). A transport-level retry of a create that did succeed finds
        its own bytes: that counts as success (a single PUT's etag is the body's MD5)."""
        headers = {"Content-Type": content_type, "If-None-Match": "*"}
        try:
            with self._errors(bucket, key):
                res = self.client._put_object(bucket, key, body, headers=headers)
        except ObjectRefused as exc:
            if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in _EXISTS_CODES:
                raise
            existing = self.stat(bucket, key)
            if existing.etag == hashlib.md5(body).hexdigest():
                return existing.etag
            raise ObjectExists(f"s3://{bucket}/{key} already exists (etag {existing.etag})") from None
        return _strip_etag(res.etag)

    def delete(self, bucket: str, key: str) -> None:
        with self._errors(bucket, key):
            self.client.remove_object(bucket, key)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects under ``prefix`` (recursive), as ``ObjectInfo`` without user metadata."""
        with self._errors(bucket, prefix):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if obj.is_dir:
                    continue
                yield ObjectInfo(bucket, obj.object_name, _strip_etag(obj.etag), obj.size or 0, obj.last_modified, {})

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.stat(bucket, key)
        except ObjectMissing:
            return False
        return True

    # -- error mapping --------------------------------------------------------------------------
    class _errors:
        """Context manager mapping SDK and transport errors onto ObjectMissing / StoreUnavailable."""

        def __init__(self, bucket: str, key: str):
            self.where = f"s3://{bucket}/{key}"

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc is None or isinstance(exc, StoreError):
                return False
            if isinstance(exc, S3Error):
                if exc.code in _MISSING_CODES:
                    raise ObjectMissing(f"{self.where}: {exc.code}") from exc
                if exc.code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                    raise StoreUnavailable(f"{self.where}: {exc.code}") from exc
                raise ObjectRefused(f"{self.where}: {exc.code}: {exc.message}") from exc
            if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
                # urllib3's MaxRetryError repeats the URL around its reason: name the reason only
                cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
                raise StoreUnavailable(f"{self.where}: object store unreachable "
                                       f"({cause.__class__.__name__}: {cause})") from exc
            return False


class ObjectTooLarge(StoreError):
    """The object is larger than the configured limit; it is refused unread."""


def _user_metadata(headers) -> dict[str, str]:
    prefix = "x-amz-meta-"
    return {k[len(prefix):].lower(): v for k, v in dict(headers).items() if k.lower().startswith(prefix)}


def _version_id(value: str | None) -> str | None:
    """S3 says "null" for an object written before versioning was enabled, MinIO may say "": no id."""
    return None if value in (None, "", "null") else value


def _parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    from email.utils import parsedate_to_datetime

    return parsedate_to_datetime(value)
