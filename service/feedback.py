"""Feedback streams: product events in, preference pairs stored, snapshots out as datasets.

A client posts batches of events to a named stream. Three kinds are understood:

- a pair: ``{"id", "prompt", "chosen", "rejected"}`` (any row form datasets accept);
- a rating: ``{"id", "prompt", "response", "rating": "up" | "down"}``. It waits until the same
  prompt gets the opposite rating on a different response; the two then make one pair (the
  "up" response chosen). Ratings wait in a per-prompt queue, oldest first;
- an edit: ``{"id", "prompt", "response", "edited"}``: the user's edit is chosen, the original
  rejected.

Events are checked with the dataset row checks (:func:`service.datasets.normalize_row`); a
batch with any bad event stores nothing. Every event carries an id and a repeated id is
ignored, so clients can retry a batch. One stream holds one format (standard or
conversational), fixed by its first event, because a dataset does.

Redis layout per stream (``{tenant}`` and ``{stream}`` never contain the separators that
follow them): ``ftune:fb:{tenant}:{stream}:meta`` (the :class:`FeedbackStream` record),
``:pairs`` (append-only list of :class:`PairRecord`), ``:seen`` (set of event ids),
``:pending`` (hash: prompt digest -> waiting ratings), ``:snapshots`` (list, newest first).
An ingest writes all of them in one MULTI, watched on ``:meta``, which every ingest changes.

A snapshot freezes the first N pairs (the list only grows, so "pairs 0..N" names exactly what
went in) into a normal content-addressed dataset, validated like an upload.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from redis.exceptions import WatchError

from service.blobs import BlobStore
from service.datasets import (
    FieldMapping,
    InvalidDataset,
    Limits,
    RowInvalid,
    normalize_row,
    row_format,
)
from service.ingest import store_dataset
from service.specs import DatasetRef
from service.store import Conflict, NotFound, P, Store

__all__ = [
    "MAX_BATCH",
    "STREAM_NAME",
    "EventError",
    "FeedbackBatch",
    "FeedbackReceipt",
    "FeedbackSnapshot",
    "FeedbackStream",
    "FeedbackStreamList",
    "InvalidFeedback",
    "PairList",
    "PairRecord",
    "ParsedEvent",
    "Pending",
    "apply_events",
    "get_stream",
    "ingest",
    "list_snapshots",
    "list_streams",
    "pair_count",
    "parse_events",
    "prompt_key",
    "read_pairs",
    "read_pairs_at",
    "snapshot",
]

STREAM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""Stream (and policy) names: also part of Redis keys, so no ':'."""
MAX_BATCH = 1000
"""Events in one POST."""
MAX_EVENT_ID = 200
_READ_CHUNK = 1000
"""Pairs read from Redis per LRANGE when snapshotting."""

Format = Literal["standard", "conversational"]
Kind = Literal["pair", "rating", "edit"]
Selection = Literal["all", "train", "held_out"]

# The checks of a rated response are the dataset row checks with the response in the place
# of "chosen"; the place of "rejected" holds a stand-in that always passes.
_STAND_IN = "\x00stand-in\x00"
_RATING_FIELDS = FieldMapping(
    prompt_field="prompt", chosen_field="response", rejected_field=_STAND_IN
)
_EDIT_FIELDS = FieldMapping(prompt_field="prompt", chosen_field="edited", rejected_field="response")


# --------------------------------------------------------------------------- API shapes


class FeedbackBatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    events: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(
            min_length=1,
            max_length=MAX_BATCH,
            description=(
                "Each event has a unique `id` and is one of: a pair (`prompt`, `chosen`, "
                "`rejected`); a rating (`prompt`, `response`, `rating`: up|down), paired with "
                "an opposite rating of the same prompt; an edit (`prompt`, `response`, "
                "`edited`: the edit is chosen, the original rejected). Texts are strings, or "
                "lists of {role, content} messages as in conversational datasets."
            ),
            examples=[
                [
                    {"id": "e1", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
                    {"id": "e2", "prompt": "Hi?", "response": "Hello!", "rating": "up"},
                    {"id": "e3", "prompt": "Hi?", "response": "Hey", "edited": "Hey there!"},
                ]
            ],
        ),
    ]


class FeedbackReceipt(msgspec.Struct, kw_only=True):
    stream: str
    received: int
    """Events in the batch."""
    accepted: int
    """Events stored now (new ids)."""
    duplicates: int
    """Events ignored because their id was seen before (a retry) or earlier in the batch."""
    pairs_added: int
    ratings_waiting: int
    """Ratings of this batch still waiting for an opposite rating of their prompt."""
    pairs_total: int


class FeedbackStream(msgspec.Struct, kw_only=True):
    name: str
    tenant: str
    format: Format | None = None
    """Fixed by the first event: a dataset holds one format."""
    events: int = 0
    """Distinct events stored."""
    duplicates: int = 0
    """Events ignored as repeats of a stored id."""
    pairs: int = 0
    pending_ratings: int = 0
    """Ratings waiting for an opposite rating of the same prompt."""
    snapshots: int = 0
    created_at: float
    updated_at: float
    recent_snapshots: list[FeedbackSnapshot] = []
    """The newest snapshots (filled in when read through the API)."""


class FeedbackStreamList(msgspec.Struct, kw_only=True):
    items: list[FeedbackStream]
    next_cursor: str | None = None


class PairRecord(msgspec.Struct, kw_only=True):
    row: dict[str, Any]
    """The canonical dataset row (prompt, chosen, rejected)."""
    kind: Kind
    events: list[str]
    """Ids of the events that made it (two for a pair of ratings)."""
    at: float


class PairList(msgspec.Struct, kw_only=True):
    stream: str
    offset: int
    total: int
    items: list[PairRecord]


class FeedbackSnapshot(msgspec.Struct, kw_only=True):
    stream: str
    version: int
    dataset: DatasetRef
    selection: Selection
    """`all` pairs; `train`: all but a policy's held-out pairs; `held_out`: only those."""
    pairs_end: int
    """The snapshot considered pairs 0 .. pairs_end-1 of the stream (it only grows)."""
    excluded: int
    """Pairs among those left out by the selection."""
    by: str
    """Who asked: `api`, or `policy <name> run <n>`."""
    created_at: float


class EventError(msgspec.Struct, kw_only=True):
    index: int
    """0-based position of the event in the batch."""
    field: str | None
    msg: str


class InvalidFeedback(Exception):
    """The batch was refused: the first errors (in batch order) and how many there were."""

    def __init__(self, errors: list[EventError], total: int) -> None:
        self.errors = errors
        self.total = total
        first = errors[0]
        where = f"events[{first.index}]" + (f".{first.field}" if first.field else "")
        super().__init__(
            f"{total} invalid event{'s' if total != 1 else ''} in the batch; nothing was "
            f"stored (first: {where}: {first.msg})"
        )


# --------------------------------------------------------------------------- pure part


class ParsedEvent(msgspec.Struct, kw_only=True):
    index: int
    id: str
    kind: Kind
    format: Format
    row: dict[str, Any] | None = None
    """Pairs and edits: the canonical row."""
    prompt: Any = None
    """Ratings: the canonical prompt and response, and which way."""
    response: Any = None
    rating: Literal["up", "down"] | None = None


class Waiting(msgspec.Struct, array_like=True):
    id: str
    response: Any


class Pending(msgspec.Struct, kw_only=True):
    """The ratings of one prompt that wait for an opposite rating, oldest first."""

    prompt: Any
    up: list[Waiting] = []
    down: list[Waiting] = []


class Applied(msgspec.Struct, kw_only=True):
    pairs: list[PairRecord]
    accepted: list[str]
    duplicates: int
    pending: dict[str, Pending]
    """The touched prompts' queues after the batch (empty ones are to be deleted)."""
    pending_delta: int
    waiting_from_batch: int


def _event_id(obj: dict[str, Any]) -> str:
    if "id" not in obj:
        raise RowInvalid("id", "missing field 'id' (each event needs a unique id)")
    value = obj["id"]
    if not isinstance(value, str):
        raise RowInvalid("id", f"expected a string, got {type(value).__name__}")
    if not value or value.isspace():
        raise RowInvalid("id", "the id is empty")
    if len(value) > MAX_EVENT_ID:
        raise RowInvalid("id", f"the id is longer than {MAX_EVENT_ID} characters")
    return value


def _kind(obj: dict[str, Any]) -> Kind:
    marks: list[Kind] = []
    if "rating" in obj:
        marks.append("rating")
    if "edited" in obj:
        marks.append("edit")
    if "chosen" in obj or "rejected" in obj or "preferred_output" in obj:
        marks.append("pair")
    if len(marks) > 1:
        raise RowInvalid(
            None,
            f"the event mixes the fields of a {' and a '.join(marks)}; send one kind per event",
        )
    if not marks:
        keys = ", ".join(repr(k)[:30] for k in list(obj)[:10])
        raise RowInvalid(
            None,
            "not a known event: a pair has chosen and rejected, a rating has response and "
            f"rating (up or down), an edit has response and edited (the event has: {keys})",
        )
    return marks[0]


def _need(obj: dict[str, Any], *fields: str) -> None:
    for name in fields:
        if name not in obj:
            raise RowInvalid(name, f"missing field {name!r}")


def _parse_one(obj: object, index: int) -> ParsedEvent:
    if not isinstance(obj, dict):
        raise RowInvalid(None, "expected an event object")
    event_id = _event_id(obj)
    kind = _kind(obj)
    if kind == "pair":
        row, _ = normalize_row(obj)
        return ParsedEvent(index=index, id=event_id, kind=kind, format=row_format(row), row=row)
    if kind == "edit":
        _need(obj, "prompt", "response")
        row, _ = normalize_row(obj, mapping=_EDIT_FIELDS)
        return ParsedEvent(index=index, id=event_id, kind=kind, format=row_format(row), row=row)
    _need(obj, "prompt", "response")
    rating = obj["rating"]
    if rating not in ("up", "down"):
        raise RowInvalid("rating", f"expected 'up' or 'down', got {repr(rating)[:40]}")
    response = obj["response"]
    stand_in: Any = (
        [{"role": "assistant", "content": _STAND_IN}] if isinstance(response, list) else _STAND_IN
    )
    checked, _ = normalize_row(
        {"prompt": obj["prompt"], "response": response, _STAND_IN: stand_in},
        mapping=_RATING_FIELDS,
    )
    return ParsedEvent(
        index=index,
        id=event_id,
        kind="rating",
        format=row_format(checked),
        prompt=checked["prompt"],
        response=checked["chosen"],
        rating=rating,
    )


def parse_events(
    events: list[Any], stream_format: Format | None, *, max_errors: int = 100
) -> list[ParsedEvent]:
    """Check and normalize a batch; InvalidFeedback lists every bad event by its index.

    The first event fixes the format of a new stream; every event must match it.
    """
    parsed: list[ParsedEvent] = []
    errors: list[EventError] = []
    total = 0
    fmt, fmt_from = stream_format, "the stream"
    for i, obj in enumerate(events):
        try:
            event = _parse_one(obj, i)
        except RowInvalid as exc:
            total += 1
            if len(errors) < max_errors:
                errors.append(EventError(index=i, field=exc.field, msg=exc.msg))
            continue
        if fmt is None:
            fmt, fmt_from = event.format, f"events[{i}]"
        elif event.format != fmt:
            total += 1
            if len(errors) < max_errors:
                errors.append(
                    EventError(
                        index=i,
                        field="prompt",
                        msg=f"the event is {event.format} but {fmt_from} is {fmt}; a stream "
                        "holds one format",
                    )
                )
            continue
        parsed.append(event)
    if total:
        raise InvalidFeedback(errors, total)
    return parsed


_encoder = msgspec.json.Encoder()


def prompt_key(prompt: Any) -> str:
    """Ratings pair up when their normalized prompts are equal: this digest names one."""
    return hashlib.sha256(_encoder.encode(prompt)).hexdigest()[:32]


def apply_events(
    events: list[ParsedEvent],
    seen: set[str],
    pending: dict[str, Pending],
    *,
    now: float,
) -> Applied:
    """What a checked batch adds: pairs in batch order, and the rating queues it leaves.

    `seen` holds the ids already stored; `pending` the queues of the prompts rated in this
    batch (missing ones are empty). A rating pairs with the oldest waiting opposite rating
    of a different response; if there is none, it waits.
    """
    pairs: list[PairRecord] = []
    accepted: list[str] = []
    duplicates = 0
    taken = set(seen)
    queues = {
        k: msgspec.structs.replace(v, up=list(v.up), down=list(v.down)) for k, v in pending.items()
    }
    delta = 0
    waiting_ids: set[str] = set()
    for event in events:
        if event.id in taken:
            duplicates += 1
            continue
        taken.add(event.id)
        accepted.append(event.id)
        if event.row is not None:
            pairs.append(PairRecord(row=event.row, kind=event.kind, events=[event.id], at=now))
            continue
        key = prompt_key(event.prompt)
        queue = queues.setdefault(key, Pending(prompt=event.prompt))
        same, opposite = (queue.up, queue.down) if event.rating == "up" else (queue.down, queue.up)
        match = next((w for w in opposite if w.response != event.response), None)
        if match is None:
            same.append(Waiting(id=event.id, response=event.response))
            waiting_ids.add(event.id)
            delta += 1
            continue
        opposite.remove(match)
        waiting_ids.discard(match.id)
        delta -= 1
        good, bad = (
            (event.response, match.response)
            if event.rating == "up"
            else (match.response, event.response)
        )
        row = {"prompt": queue.prompt, "chosen": good, "rejected": bad}
        pairs.append(PairRecord(row=row, kind="rating", events=[match.id, event.id], at=now))
    return Applied(
        pairs=pairs,
        accepted=accepted,
        duplicates=duplicates,
        pending=queues,
        pending_delta=delta,
        waiting_from_batch=len(waiting_ids),
    )


# --------------------------------------------------------------------------- Redis


def _key(tenant: str, stream: str, part: str) -> str:
    return f"{P}fb:{tenant}:{stream}:{part}"


def _index(tenant: str) -> str:
    return f"{P}fb-streams:{tenant}"


_stream_decoder = msgspec.json.Decoder(FeedbackStream)
_pending_decoder = msgspec.json.Decoder(Pending)
_pair_decoder = msgspec.json.Decoder(PairRecord)
_snapshot_decoder = msgspec.json.Decoder(FeedbackSnapshot)


async def ingest(
    store: Store, tenant: str, stream: str, events: list[Any], *, now: float | None = None
) -> FeedbackReceipt:
    """Check a batch and store what is new of it, all or nothing (InvalidFeedback)."""
    now = time.time() if now is None else now
    meta_key = _key(tenant, stream, "meta")
    seen_key, pending_key = _key(tenant, stream, "seen"), _key(tenant, stream, "pending")
    async with store.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(meta_key)
                raw = await pipe.get(meta_key)
                meta = (
                    _stream_decoder.decode(raw)
                    if raw
                    else FeedbackStream(name=stream, tenant=tenant, created_at=now, updated_at=now)
                )
                parsed = parse_events(events, meta.format)
                ids = list(dict.fromkeys(e.id for e in parsed))
                flags = await pipe.smismember(seen_key, ids) if ids else []
                seen = {i for i, flag in zip(ids, flags, strict=True) if flag}
                keys = list(dict.fromkeys(prompt_key(e.prompt) for e in parsed if e.row is None))
                stored = await pipe.hmget(pending_key, keys) if keys else []
                pending = {
                    k: _pending_decoder.decode(v)
                    for k, v in zip(keys, stored, strict=True)
                    if v is not None
                }
                applied = apply_events(parsed, seen, pending, now=now)
                new_meta = msgspec.structs.replace(
                    meta,
                    format=meta.format or (parsed[0].format if parsed else None),
                    events=meta.events + len(applied.accepted),
                    duplicates=meta.duplicates + applied.duplicates,
                    pairs=meta.pairs + len(applied.pairs),
                    pending_ratings=meta.pending_ratings + applied.pending_delta,
                    updated_at=now,
                )
                pipe.multi()
                if applied.pairs:
                    encoded = [_encoder.encode(pair) for pair in applied.pairs]
                    pipe.rpush(_key(tenant, stream, "pairs"), *encoded)
                if applied.accepted:
                    pipe.sadd(seen_key, *applied.accepted)
                for key, queue in applied.pending.items():
                    if queue.up or queue.down:
                        pipe.hset(pending_key, key, _encoder.encode(queue))
                    else:
                        pipe.hdel(pending_key, key)
                pipe.set(meta_key, _encoder.encode(new_meta))
                pipe.zadd(_index(tenant), {stream: 0})
                await pipe.execute()
                break
            except WatchError:
                continue
    return FeedbackReceipt(
        stream=stream,
        received=len(events),
        accepted=len(applied.accepted),
        duplicates=applied.duplicates,
        pairs_added=len(applied.pairs),
        ratings_waiting=applied.waiting_from_batch,
        pairs_total=new_meta.pairs,
    )


async def get_stream(store: Store, tenant: str, stream: str, *, recent: int = 0) -> FeedbackStream:
    """The stream's record (NotFound before its first event), with its newest snapshots."""
    raw = await store.redis.get(_key(tenant, stream, "meta"))
    if raw is None:
        raise NotFound(f"feedback stream {stream} does not exist")
    meta = _stream_decoder.decode(raw)
    if recent:
        meta.recent_snapshots = await list_snapshots(store, tenant, stream, limit=recent)
    return meta


async def list_streams(
    store: Store, tenant: str, *, limit: int, cursor: str | None
) -> tuple[list[FeedbackStream], str | None]:
    """Streams by name, in pages."""
    names, next_cursor = await store.page_by_name(_index(tenant), limit, cursor)
    if not names:
        return [], None
    metas = await store.redis.mget([_key(tenant, n, "meta") for n in names])
    return [_stream_decoder.decode(m) for m in metas if m], next_cursor


async def pair_count(store: Store, tenant: str, stream: str) -> int:
    return int(await store.redis.llen(_key(tenant, stream, "pairs")))


async def read_pairs(
    store: Store, tenant: str, stream: str, start: int, stop: int
) -> list[PairRecord]:
    """Pairs start .. stop-1 (stop exclusive), in the order they were gathered."""
    if stop <= start:
        return []
    raw = await store.redis.lrange(_key(tenant, stream, "pairs"), start, stop - 1)
    return [_pair_decoder.decode(r) for r in raw]


async def read_pairs_at(
    store: Store, tenant: str, stream: str, indices: list[int]
) -> list[PairRecord]:
    """The pairs at these positions (missing ones are skipped)."""
    key = _key(tenant, stream, "pairs")
    async with store.redis.pipeline(transaction=False) as pipe:
        for i in indices:
            pipe.lindex(key, i)
        raw = await pipe.execute()
    return [_pair_decoder.decode(r) for r in raw if r is not None]


async def list_snapshots(
    store: Store, tenant: str, stream: str, *, limit: int = 20
) -> list[FeedbackSnapshot]:
    raw = await store.redis.lrange(_key(tenant, stream, "snapshots"), 0, limit - 1)
    return [_snapshot_decoder.decode(r) for r in raw]


async def snapshot(
    store: Store,
    blobs: BlobStore,
    tenant: str,
    stream: str,
    *,
    limits: Limits,
    end: int | None = None,
    select: Callable[[int, bytes], bool] | None = None,
    selection: Selection = "all",
    by: str = "api",
    name: str | None = None,
) -> FeedbackSnapshot:
    """Freeze pairs 0 .. end-1 (all so far by default) into a dataset, and record it.

    `select(index, canonical row JSON)` keeps a pair or leaves it out (a policy's held-out
    pairs). The rows go through the same validation as an upload, so the dataset has the
    same stats and warnings and the same sha256 as uploading those rows would give.
    Conflict if nothing is selected.
    """
    meta = await get_stream(store, tenant, stream)
    total = await pair_count(store, tenant, stream)
    end = total if end is None else min(end, total)
    with tempfile.TemporaryDirectory(prefix="ftune-snapshot-") as tmp:
        raw_path = Path(tmp) / "raw.jsonl"
        kept = 0
        with raw_path.open("wb") as out:
            for start in range(0, end, _READ_CHUNK):
                for i, pair in enumerate(
                    await read_pairs(store, tenant, stream, start, min(start + _READ_CHUNK, end)),
                    start,
                ):
                    line = _encoder.encode(pair.row)
                    if select is None or select(i, line):
                        out.write(line + b"\n")
                        kept += 1
        if kept == 0:
            raise Conflict(
                f"feedback stream {stream} has no pairs to snapshot"
                + (f" ({selection} of the first {end})" if end else "")
                + (
                    f"; {meta.pending_ratings} ratings wait for an opposite rating"
                    if meta.pending_ratings
                    else ""
                )
            )

        version = int(await store.redis.incr(_key(tenant, stream, "versions")))

        try:
            ds = await store_dataset(
                store,
                blobs,
                raw_path,
                tenant=tenant,
                name=name or f"{stream} v{version}",
                limits=limits,
            )
        except InvalidDataset as exc:  # the pairs were checked on the way in; this is a bug
            raise RuntimeError(f"stored pairs of {stream} failed validation: {exc}") from exc
    now = time.time()
    record = FeedbackSnapshot(
        stream=stream,
        version=version,
        dataset=DatasetRef(id=ds.id, sha256=ds.sha256, rows=ds.rows, format=ds.format),
        selection=selection,
        pairs_end=end,
        excluded=end - kept,
        by=by,
        created_at=now,
    )
    meta_key = _key(tenant, stream, "meta")
    async with store.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(meta_key)
                current = _stream_decoder.decode(await pipe.get(meta_key))
                current.snapshots += 1
                pipe.multi()
                pipe.set(meta_key, _encoder.encode(current))
                pipe.lpush(_key(tenant, stream, "snapshots"), _encoder.encode(record))
                await pipe.execute()
                break
            except WatchError:
                continue
    return record
