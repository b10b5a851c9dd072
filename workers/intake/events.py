"""Parse MinIO bucket notifications (webhook bodies, ``notify_redis`` access-format elements) into object events.

Both carriers hold S3-compatible records (``eventVersion`` 2.0). Per record we need the event name,
the bucket, the object key (URL-encoded in the record: ``cats%2Ftabby+01.jpg`` is ``cats/tabby 01.jpg``),
the eTag and size when present (created objects), and the event time (for deletes it becomes the
tombstone's time, so it is required).

Rule for bodies holding several records: every valid record is kept; each malformed one is reported
with its position and what is wrong (``ParsedRecords.errors``). Records of other event types
(``s3:ObjectAccessed:*``, replication, ...) and, after ``keep_bucket``, of other buckets are counted
as ignored, not as errors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote_plus, unquote_plus

from hashlake.lake.schema import epoch_ns
from workers.messages import ObjectRef

CREATED_PREFIX = "s3:ObjectCreated:"  # Put, Post, Copy, CompleteMultipartUpload, ...
REMOVED_PREFIX = "s3:ObjectRemoved:"  # Delete, DeleteMarkerCreated, ...
# In a versioned bucket a DELETE without a version id adds a marker: the key is gone, its versions stay.
# A Delete event with a versionId removed that one version only.
DELETE_MARKER_CREATED = "s3:ObjectRemoved:DeleteMarkerCreated"


class MalformedEvent(ValueError):
    """An event body or record is not what MinIO sends; the message names the field and the position."""


@dataclass(frozen=True)
class ObjectEvent:
    kind: str  # "encode" (object created) | "delete" (object removed): the Batch.kind it feeds
    ref: ObjectRef
    model_version: str | None = None  # encodes only: a staged re-encode's version (Batch.model_version)


@dataclass
class ParsedRecords:
    events: list[ObjectEvent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per malformed record, naming its position
    ignored: int = 0  # records of event types the index does not act on, or of other buckets

    def keep_bucket(self, bucket: str) -> list[str]:
        """Keep only the events of ``bucket`` (the images bucket); the others count as ignored, and their
        bucket names are returned for a warning. Indexing a bucket nobody asked for (worse: the index
        bucket itself, whose shard writes would announce more work) must not follow from a mistyped
        ``mc event add``."""
        foreign = sorted({e.ref.bucket for e in self.events if e.ref.bucket != bucket})
        if foreign:
            kept = [e for e in self.events if e.ref.bucket == bucket]
            self.ignored += len(self.events) - len(kept)
            self.events = kept
        return foreign


def parse_webhook_body(body: bytes) -> ParsedRecords:
    """One POST body of a ``notify_webhook`` target: ``{"EventName", "Key", "Records": [record, ...]}``.

    Raises ``MalformedEvent`` when the body as a whole is unusable (not JSON, no ``Records`` list).
    """
    document = _load_json(body, "webhook body")
    if not isinstance(document, dict):
        raise MalformedEvent(f"webhook body must be a JSON object with a 'Records' list, got {_type(document)}")
    records = document.get("Records")
    if not isinstance(records, list):
        raise MalformedEvent(f"webhook body has no 'Records' list (got {_type(records)}); "
                             f"its keys: {sorted(document)[:10]}")
    return parse_records(records, "Records")


def parse_access_element(element: bytes | str) -> ParsedRecords:
    """One element of a ``notify_redis`` list with ``format=access``: a JSON array of
    ``{"Event": [record, ...], "EventTime": "..."}`` (what MinIO's server code appends with RPUSH).

    Raises ``MalformedEvent`` when the element as a whole is unusable.
    """
    document = _load_json(element, "Redis list element")
    if not isinstance(document, list):
        raise MalformedEvent(f"access-format element must be a JSON array of {{'Event': [...]}} objects, "
                             f"got {_type(document)}")
    parsed = ParsedRecords()
    for i, entry in enumerate(document):
        events = entry.get("Event") if isinstance(entry, dict) else None
        if not isinstance(events, list):
            parsed.errors.append(f"[{i}]: expected an object with an 'Event' list, got {_type(entry)}")
            continue
        part = parse_records(events, f"[{i}].Event")
        parsed.events += part.events
        parsed.errors += part.errors
        parsed.ignored += part.ignored
    return parsed


def parse_records(records: list, where: str) -> ParsedRecords:
    parsed = ParsedRecords()
    for i, record in enumerate(records):
        try:
            event = parse_record(record)
        except MalformedEvent as exc:
            parsed.errors.append(f"{where}[{i}]: {exc}")
            continue
        if event is None:
            parsed.ignored += 1
        else:
            parsed.events.append(event)
    return parsed


def parse_record(record: object) -> ObjectEvent | None:
    """One S3 record → an ObjectEvent, or None for event types we do not act on."""
    if not isinstance(record, dict):
        raise MalformedEvent(f"a record must be a JSON object, got {_type(record)}")
    name = _field(record, ("eventName",), str)
    if name.startswith(CREATED_PREFIX):
        kind = "encode"
    elif name.startswith(REMOVED_PREFIX):
        kind = "delete"
    else:
        return None
    bucket = _field(record, ("s3", "bucket", "name"), str)
    raw_key = _field(record, ("s3", "object", "key"), str)
    event_time = _field(record, ("eventTime",), str)
    if not bucket or not raw_key:
        raise MalformedEvent("s3.bucket.name and s3.object.key must not be empty")
    try:
        key = unquote_plus(raw_key, errors="strict")  # query-escaped by MinIO: '%2F' → '/', '+' → ' '
    except UnicodeDecodeError:
        raise MalformedEvent(f"s3.object.key {raw_key[:100]!r} does not URL-decode to UTF-8") from None
    try:
        datetime.fromisoformat(event_time)
    except ValueError:
        raise MalformedEvent(f"eventTime {event_time[:40]!r} is not an ISO 8601 time") from None
    etag = _field(record, ("s3", "object", "eTag"), str, required=False) or ""
    size = _field(record, ("s3", "object", "size"), int, required=False)
    if size is not None and size < 0:
        raise MalformedEvent(f"s3.object.size must be >= 0, got {size}")
    version_id = _field(record, ("s3", "object", "versionId"), str, required=False) or None
    if version_id == "null":  # S3's name for the version of an unversioned bucket's object
        version_id = None
    if name == DELETE_MARKER_CREATED:
        version_id = None  # the marker's own id: the key is deleted, every older version hidden
    ref = ObjectRef(bucket=bucket, key=key, etag=etag.strip('"'), size=size, event_time=event_time,
                    mtime_ns=_order_ns(record, event_time), version_id=version_id)
    return ObjectEvent(kind, ref)


def _order_ns(record: dict, event_time: str) -> int:
    """The event's place among the key's versions, in ns: MinIO's ``sequencer`` (hex nanoseconds,
    increasing per key), else ``eventTime`` (milliseconds)."""
    sequencer = _field(record, ("s3", "object", "sequencer"), str, required=False)
    if sequencer:
        try:
            return int(sequencer, 16)
        except ValueError:
            raise MalformedEvent(f"s3.object.sequencer {sequencer[:40]!r} is not hexadecimal") from None
    moment = datetime.fromisoformat(event_time.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return epoch_ns(moment)


def _field(record: dict, path: tuple[str, ...], kind: type, *, required: bool = True):
    value: object = record
    for depth, name in enumerate(path):
        if value is None:
            raise MalformedEvent(f"{'.'.join(path[:depth])} is missing")
        if not isinstance(value, dict):
            raise MalformedEvent(f"{'.'.join(path[:depth])} must be an object, got {_type(value)}")
        value = value.get(name)
    dotted = ".".join(path)
    if value is None:
        if required:
            raise MalformedEvent(f"{dotted} is missing")
        return None
    # bool is a subclass of int, but a size of `true` is not a size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedEvent(f"{dotted} must be {kind.__name__}, got {_type(value)}")
    return value


def _load_json(raw: bytes | str, what: str) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"{what} is not JSON ({exc}); starts with {raw[:60]!r}") from None


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


# -- what MinIO sends, for callers that stand in for a MinIO server (tests, the ingest benchmark) --
def minio_record(event_name: str, bucket: str, key: str, *, etag: str | None = None, size: int | None = None,
                 event_time: datetime | None = None, version_id: str | None = None,
                 sequencer_ns: int | None = None) -> dict:
    """One S3-compatible record as MinIO writes it: the key query-escaped (``/`` → ``%2F``, space → ``+``);
    ``eTag`` and ``size`` only for created objects; the sequencer from ``sequencer_ns``, else the time."""
    when = (event_time or datetime.now(timezone.utc)).astimezone(timezone.utc)
    obj: dict = {"key": quote_plus(key), "sequencer": f"{sequencer_ns or epoch_ns(when):X}"}
    if version_id is not None:
        obj["versionId"] = version_id
    if etag is not None:
        obj.update({"eTag": etag, "size": size or 0, "contentType": "image/jpeg"})
    return {"eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "eventName": event_name,
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj}}


def webhook_body(records: list[dict]) -> bytes:
    """The body a ``notify_webhook`` target POSTs."""
    first = records[0]
    key = f"{first['s3']['bucket']['name']}/{unquote_plus(first['s3']['object']['key'])}"
    return json.dumps({"EventName": first["eventName"], "Key": key, "Records": records}).encode()


def redis_access_element(records: list[dict]) -> bytes:
    """The element a ``notify_redis`` target with ``format=access`` RPUSHes."""
    return json.dumps([{"Event": records, "EventTime": records[0]["eventTime"]}]).encode()
