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
conversational), fixed by its first batch, because a dataset does (see
:func:`service.retraining.events.parse_events`).

Redis layout per stream (``{tenant}`` and ``{stream}`` never contain the separators that
follow them): ``ftune:fb:{tenant}:{stream}:meta`` (the :class:`FeedbackStream` record),
``:pairs`` (append-only list of :class:`PairRecord`), ``:seen`` (set of event ids),
``:pending:{prompt digest}:up`` and ``:down`` (lists of waiting ratings, oldest first, at
most MAX_WAITING each; a batch reads their heads and pushes, removes and trims a few items,
so it costs O(batch) however long they grow; the former ``:pending`` hash, one value per
prompt, is moved to them as its prompts are rated), ``:waiting`` (the set of prompt digests
that have such lists, so that deleting the stream finds them), ``:snapshots`` (list, newest
first).
An ingest writes all of them in one MULTI, watched on ``:meta``, which every ingest changes.

Snapshots of a stream (its first N pairs frozen into a dataset) are written by
:mod:`service.retraining.snapshots`; this module numbers and lists them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from service.contract import (
    FeedbackReceipt,
    FeedbackSnapshot,
    FeedbackStream,
    PairRecord,
    SnapshotRows,
)
from service.retraining.events import (
    WAYS,
    Applied,
    ParsedEvent,
    Pending,
    Waiting,
    apply_events,
    check_row_sizes,
    parse_events,
    rating_key,
)
from service.store import (
    Conflict,
    LimitReached,
    NotFound,
    P,
    Store,
    check_count,
    transact,
)

CHUNK = 1000
"""Pairs read, or keys unlinked, per Redis command in a loop over a whole stream."""


# The checks of a rated response are the dataset row checks with the response in the place
# of "chosen"; the place of "rejected" holds a stand-in that always passes.


# --------------------------------------------------------------------------- API shapes


# --------------------------------------------------------------------------- pure part


_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- Redis


def _key(tenant: str, stream: str, part: str) -> str:
    return f"{P}fb:{tenant}:{stream}:{part}"


def _index(tenant: str) -> str:
    return f"{P}fb-streams:{tenant}"


def _bytes_key(tenant: str) -> str:
    """About the bytes the tenant's streams take in Redis (their `stored_bytes`, summed)."""
    return f"{P}fb-bytes:{tenant}"


_ID_COST = 80
"""What an event id costs in a stream's ``:seen`` set beyond its own bytes (Redis's entry and
string headers)."""
_ITEM_COST = 24
"""What a list item costs beyond its own bytes."""


ALL = f"{P}fb-streams-all"
"""Every stream as a JSON [tenant, stream], for admins listing across tenants."""
_PARTS = ("meta", "seen", "pending", "waiting", "pairs", "unpaired", "snapshots", "versions")


_stream_decoder = msgspec.json.Decoder(FeedbackStream)
_pending_decoder = msgspec.json.Decoder(Pending)
_waiting_decoder = msgspec.json.Decoder(Waiting)
_pair_decoder = msgspec.json.Decoder(PairRecord)
_snapshot_decoder = msgspec.json.Decoder(FeedbackSnapshot)


MAX_WAITING = 1000
"""Ratings one prompt keeps waiting in one direction; past it the oldest are dropped (and
counted in the stream's ``dropped_ratings``): one prompt rated up 80,000 times must not grow
without bound."""
_HEAD = 16
"""Waiting ratings read per prompt and direction beyond the batch's own ratings of it: enough
to find one of a different response, without reading a long queue."""


def _waiting_key(tenant: str, stream: str, prompt: str, way: str) -> str:
    return _key(tenant, stream, f"pending:{prompt}:{way}")


def _waiting_prompts(tenant: str, stream: str) -> str:
    """The set of prompt digests that have waiting ratings: what a stream's delete must find."""
    return _key(tenant, stream, "waiting")


class _Queue(msgspec.Struct, kw_only=True):
    """What an ingest read of one prompt's waiting ratings."""

    key: str
    prompt: Any
    tools: Any
    head: dict[str, list[bytes]]
    """The first stored ratings of each direction, as stored."""
    lengths: dict[str, int]
    legacy: bool = False
    """Read from the former layout (one hash value per prompt), moved to lists on write."""

    def pending(self) -> Pending:
        decode = _waiting_decoder.decode
        return Pending(
            prompt=self.prompt,
            tools=self.tools,
            up=[decode(w) for w in self.head["up"]],
            down=[decode(w) for w in self.head["down"]],
        )


async def _read_queues(
    store: Store, tenant: str, stream: str, parsed: list[ParsedEvent]
) -> list[_Queue]:
    """The heads of the waiting ratings of the prompts the batch rates: one round trip."""
    ratings: dict[str, list[ParsedEvent]] = {}
    for event in parsed:
        if event.row is None:
            ratings.setdefault(rating_key(event), []).append(event)
    if not ratings:
        return []
    keys = list(ratings)
    async with store.redis.pipeline(transaction=False) as reads:
        reads.hmget(_key(tenant, stream, "pending"), keys)
        for key, events in ratings.items():
            for way in WAYS:
                reads.lrange(_waiting_key(tenant, stream, key, way), 0, _HEAD + len(events) - 1)
                reads.llen(_waiting_key(tenant, stream, key, way))
        legacy, *lists = await reads.execute()
    queues = []
    for i, key in enumerate(keys):
        up, up_len, down, down_len = lists[4 * i : 4 * i + 4]
        queue = _Queue(
            key=key,
            prompt=ratings[key][0].prompt,
            tools=ratings[key][0].tools,
            head={"up": up, "down": down},
            lengths={"up": up_len, "down": down_len},
        )
        if legacy[i] is not None:  # the whole queue, as the former layout kept it
            old = _pending_decoder.decode(legacy[i])
            queue.head = {w: [_encoder.encode(x) for x in getattr(old, w)] for w in WAYS}
            queue.lengths = {w: len(queue.head[w]) for w in WAYS}
            queue.legacy = True
        queues.append(queue)
    return queues


def _write_queue(pipe: Pipeline, tenant: str, stream: str, queue: _Queue, after: Pending) -> int:
    """Queue the list operations that turn the stored waiting ratings into ``after``: those
    paired off removed, new ones appended, each direction cut to MAX_WAITING. O(batch).
    How many were dropped by the cut."""
    dropped, left = 0, 0
    if queue.legacy:
        pipe.hdel(_key(tenant, stream, "pending"), queue.key)
    for way in WAYS:
        list_key = _waiting_key(tenant, stream, queue.key, way)
        after_ids = {w.id for w in getattr(after, way)}
        head = [(raw, _waiting_decoder.decode(raw).id) for raw in queue.head[way]]
        gone = [raw for raw, wid in head if wid not in after_ids]
        if queue.legacy:
            kept: set[str] = set()
        else:
            kept = {wid for _, wid in head if wid in after_ids}
            for raw in gone:
                pipe.lrem(list_key, 1, raw.decode())
        added = [_encoder.encode(w) for w in getattr(after, way) if w.id not in kept]
        # A legacy queue's lists were empty: they now hold what it had left.
        length = len(added) if queue.legacy else queue.lengths[way] - len(gone) + len(added)
        if added:
            pipe.rpush(list_key, *added)
            if length > MAX_WAITING:
                pipe.ltrim(list_key, -MAX_WAITING, -1)
                dropped += length - MAX_WAITING
        left += min(length, MAX_WAITING)
    if left:
        pipe.sadd(_waiting_prompts(tenant, stream), queue.key)
    else:
        pipe.srem(_waiting_prompts(tenant, stream), queue.key)
    return dropped


async def ingest(
    store: Store,
    tenant: str,
    stream: str,
    events: list[Any],
    *,
    now: float | None = None,
    max_streams: int | None = None,
    max_line_bytes: int,
    max_rows: int,
    max_bytes: int,
    max_tenant_bytes: int | None = None,
) -> FeedbackReceipt:
    """Check a batch and store what is new of it, all or nothing (InvalidFeedback). A batch
    that would start the tenant's stream number `max_streams` + 1 is refused (LimitReached),
    counted in the same transaction; so is one with a row past `max_line_bytes`, which no
    snapshot could hold, and one that would take the stream past `max_rows` pairs or ratings,
    or past `max_bytes` of either (Conflict): no snapshot could hold them, and a stream must
    not grow in Redis for ever. A batch that would take the tenant's streams past
    `max_tenant_bytes` in Redis is refused too (LimitReached); that count is read, not
    watched, so concurrent batches of one tenant may pass it by what they add together."""
    now = time.time() if now is None else now
    meta_key = _key(tenant, stream, "meta")
    seen_key = _key(tenant, stream, "seen")

    async def write(pipe: Pipeline) -> tuple[Applied, FeedbackStream, int]:
        raw = await pipe.get(meta_key)
        if raw is None:
            hint = "delete one or post to an existing one"
            await check_count(pipe, _index(tenant), tenant, "feedback_streams", max_streams, hint)
        meta = (
            _stream_decoder.decode(raw)
            if raw
            else FeedbackStream(name=stream, tenant=tenant, created_at=now, updated_at=now)
        )
        parsed = parse_events(events, meta.format)
        ids = list(dict.fromkeys(e.id for e in parsed))
        flags = await pipe.smismember(seen_key, ids) if ids else []  # type: ignore[misc]  # redis-py#2399
        seen = {i for i, flag in zip(ids, flags, strict=True) if flag}
        # Read on another connection: the WATCH on meta, which every ingest changes, still
        # guards them.
        queues = await _read_queues(store, tenant, stream, parsed)
        applied = apply_events(parsed, seen, {q.key: q.pending() for q in queues}, now=now)
        check_row_sizes(applied, parsed, max_line_bytes)
        pair_bytes, rating_bytes = _row_bytes(applied.pairs), _row_bytes(applied.unpaired)
        _check_room(stream, meta, applied, max_rows, max_bytes, pair_bytes, rating_bytes)
        pairs = [_encoder.encode(pair) for pair in applied.pairs]
        ratings = [_encoder.encode(row) for row in applied.unpaired]
        stored = _stored_bytes(applied.accepted, pairs, ratings)
        await _check_budget(pipe, tenant, stored, max_tenant_bytes)
        pipe.multi()
        dropped = sum(_write_queue(pipe, tenant, stream, q, applied.pending[q.key]) for q in queues)
        if pairs:
            pipe.rpush(_key(tenant, stream, "pairs"), *pairs)
        if ratings:
            pipe.rpush(_key(tenant, stream, "unpaired"), *ratings)
        if applied.accepted:
            pipe.sadd(seen_key, *applied.accepted)
        if stored:
            pipe.incrby(_bytes_key(tenant), stored)
        new_meta = msgspec.structs.replace(
            meta,
            format=meta.format or (parsed[0].format if parsed else None),
            events=meta.events + len(applied.accepted),
            duplicates=meta.duplicates + applied.duplicates,
            pairs=meta.pairs + len(applied.pairs),
            ratings=meta.ratings + len(applied.unpaired),
            pending_ratings=meta.pending_ratings + applied.pending_delta - dropped,
            pair_bytes=meta.pair_bytes + pair_bytes,
            rating_bytes=meta.rating_bytes + rating_bytes,
            stored_bytes=meta.stored_bytes + stored,
            dropped_ratings=meta.dropped_ratings + dropped,
            updated_at=now,
        )
        pipe.set(meta_key, _encoder.encode(new_meta))
        pipe.zadd(_index(tenant), {stream: 0})
        pipe.zadd(ALL, {_encoder.encode((tenant, stream)): 0})
        return applied, new_meta, dropped

    watched = (meta_key, _index(tenant)) if max_streams is not None else (meta_key,)
    (applied, new_meta, dropped), _ = await transact(store.redis, write, *watched)
    return FeedbackReceipt(
        stream=stream,
        received=len(events),
        accepted=len(applied.accepted),
        duplicates=applied.duplicates,
        pairs_added=len(applied.pairs),
        ratings_waiting=applied.waiting_from_batch,
        pairs_total=new_meta.pairs,
        ratings_dropped=dropped,
    )


def _stored_bytes(ids: Sequence[str], pairs: list[bytes], ratings: list[bytes]) -> int:
    """About what a batch adds to Redis: its ids, its pairs and its ratings, each rating twice
    (kept for kto, and waiting for its opposite until one comes or it is dropped)."""
    return (
        sum(len(i.encode()) + _ID_COST for i in ids)
        + sum(len(p) + _ITEM_COST for p in pairs)
        + 2 * sum(len(r) + _ITEM_COST for r in ratings)
    )


async def _check_budget(pipe: Pipeline, tenant: str, adding: int, limit: int | None) -> None:
    """LimitReached past the tenant's budget. The running count is trusted below the limit;
    at it, the streams' own figures are summed and the count set right by the difference: a
    stream rewritten by a replica of the release before (which drops `stored_bytes`) or one
    deleted half-way leaves the count too high, and would refuse a tenant for good."""
    if limit is None or not adding:
        return
    key = _bytes_key(tenant)
    used = int(await pipe.get(key) or 0)
    if used + adding > limit:
        names = await pipe.zrange(_index(tenant), 0, -1)
        metas = await pipe.mget([_key(tenant, n.decode(), "meta") for n in names]) if names else []
        held = sum(_stream_decoder.decode(m).stored_bytes for m in metas if m)
        if held != used:
            await pipe.incrby(
                key, held - used
            )  # by the difference: concurrent batches' count stays
            used = held
    if used + adding > limit:
        raise LimitReached(
            f"tenant {tenant}'s feedback streams take about {used:,} bytes and this batch "
            f"{adding:,} more; the limit (feedback_bytes) is {limit:,}: nothing of it was "
            "stored; snapshot the streams you need and delete them",
            limit="feedback_bytes",
            quota=limit,
            retry_after=3600,
        )


def _row_bytes(records: Sequence[PairRecord]) -> int:
    """What the rows take as a dataset's JSON lines."""
    return sum(len(_encoder.encode(record.row)) + 1 for record in records)


def _check_room(
    stream: str,
    meta: FeedbackStream,
    applied: Applied,
    max_rows: int,
    max_bytes: int,
    pair_bytes: int,
    rating_bytes: int,
) -> None:
    """Conflict when the batch would leave the stream holding more than a dataset may."""
    held = (  # every rating is kept as a row (for kto), those waiting for a pair among them
        ("pairs", meta.pairs + len(applied.pairs), meta.pair_bytes + pair_bytes),
        ("ratings", meta.ratings + len(applied.unpaired), meta.rating_bytes + rating_bytes),
    )
    for what, rows, size in held:
        if rows > max_rows or size > max_bytes:
            much = f"{rows:,} {what}" if rows > max_rows else f"{size:,} bytes of {what}"
            limit = f"{max_rows:,} rows" if rows > max_rows else f"{max_bytes:,} bytes"
            name = "FTUNE_MAX_DATASET_ROWS" if rows > max_rows else "FTUNE_MAX_DATASET_BYTES"
            raise Conflict(
                f"feedback stream {stream} would hold {much}, more than a dataset may "
                f"({limit}, the operator's {name}): nothing of this batch was stored; snapshot "
                "the stream and send new feedback to a new one"
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
    store: Store, tenant: str | None, *, limit: int, cursor: str | None
) -> tuple[list[FeedbackStream], str | None]:
    """Streams by name, in pages: one tenant's, or (None) every tenant's by tenant, then name."""
    owners, next_cursor = await store.page_owned(ALL, _index, tenant, limit, cursor)
    if not owners:
        return [], None
    metas = await store.redis.mget([_key(t, n, "meta") for t, n in owners])
    return [_stream_decoder.decode(m) for m in metas if m], next_cursor


async def delete_stream(store: Store, tenant: str, stream: str) -> None:
    """Forget a stream: its pairs, unpaired ratings, pending ratings and snapshot list (the
    snapshots' datasets stay). A policy that reads it finds no pairs until new events arrive."""
    await get_stream(store, tenant, stream)
    meta_key, prompts_key = _key(tenant, stream, "meta"), _waiting_prompts(tenant, stream)

    async def drop(pipe: Pipeline) -> None:
        prompts = await pipe.smembers(prompts_key)  # type: ignore[misc]  # redis-py#2399
        raw = await pipe.get(meta_key)
        stored = _stream_decoder.decode(raw).stored_bytes if raw else 0
        lists = [_waiting_key(tenant, stream, p.decode(), w) for p in prompts for w in WAYS]
        pipe.multi()
        if stored:
            pipe.decrby(_bytes_key(tenant), stored)
        for i in range(0, len(lists), CHUNK):
            pipe.unlink(*lists[i : i + CHUNK])
        pipe.unlink(*(_key(tenant, stream, part) for part in _PARTS))
        pipe.zrem(_index(tenant), stream)
        pipe.zrem(ALL, _encoder.encode((tenant, stream)))

    await transact(store.redis, drop, meta_key, prompts_key)


async def pair_count(store: Store, tenant: str, stream: str, rows: SnapshotRows = "pairs") -> int:
    """How many pairs (or unpaired rows) the stream holds."""
    return int(await store.redis.llen(_key(tenant, stream, rows)))  # type: ignore[misc]  # redis-py#2399


async def read_pairs(
    store: Store, tenant: str, stream: str, start: int, stop: int, rows: SnapshotRows = "pairs"
) -> list[PairRecord]:
    """Pairs (or unpaired rows) start .. stop-1 (stop exclusive), in the order they were
    gathered."""
    if stop <= start:
        return []
    raw = await store.redis.lrange(_key(tenant, stream, rows), start, stop - 1)  # type: ignore[misc]  # redis-py#2399
    return [_pair_decoder.decode(r) for r in raw]


async def read_pairs_at(
    store: Store, tenant: str, stream: str, indices: list[int], rows: SnapshotRows = "pairs"
) -> list[PairRecord]:
    """The pairs (or unpaired rows) at these positions (missing ones are skipped)."""
    key = _key(tenant, stream, rows)
    async with store.redis.pipeline(transaction=False) as pipe:
        for i in indices:
            pipe.lindex(key, i)
        raw = await pipe.execute()
    return [_pair_decoder.decode(r) for r in raw if r is not None]


async def list_snapshots(
    store: Store, tenant: str, stream: str, *, limit: int = 20
) -> list[FeedbackSnapshot]:
    raw = await store.redis.lrange(_key(tenant, stream, "snapshots"), 0, limit - 1)  # type: ignore[misc]  # redis-py#2399
    return [_snapshot_decoder.decode(r) for r in raw]


async def next_version(store: Store, tenant: str, stream: str) -> int:
    """The number of the stream's next snapshot (1, 2, ...; never reused)."""
    return int(await store.redis.incr(_key(tenant, stream, "versions")))


KEPT_SNAPSHOTS = 50
"""Newest snapshot records a stream keeps (a stream shows its 10 newest): a loop of snapshots
must not grow Redis outside every quota. Their datasets stay, and the count goes on."""


async def record_snapshot(store: Store, tenant: str, stream: str, record: FeedbackSnapshot) -> None:
    """Count the snapshot in the stream's record and put it first in its (bounded) list."""
    meta_key = _key(tenant, stream, "meta")
    snapshots_key = _key(tenant, stream, "snapshots")

    async def count(pipe: Pipeline) -> None:
        current = _stream_decoder.decode(await pipe.get(meta_key))
        current.snapshots += 1
        pipe.multi()
        pipe.set(meta_key, _encoder.encode(current))
        pipe.lpush(snapshots_key, _encoder.encode(record))
        pipe.ltrim(snapshots_key, 0, KEPT_SNAPSHOTS - 1)

    await transact(store.redis, count, meta_key)


async def stored_bytes(store: Store, tenant: str) -> int:
    """About the bytes the tenant's feedback streams take in Redis."""
    return int(await store.redis.get(_bytes_key(tenant)) or 0)


async def stream_count(store: Store, tenant: str) -> int:
    return int(await store.redis.zcard(_index(tenant)))
