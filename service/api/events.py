"""Job event streams for every SSE client of one API process, from one Redis connection.

Each open `GET /v1/jobs/{id}/events` used to hold its own connection blocked in XREAD: 160
of them exhausted a Redis with `maxclients 150`, and every tenant got errors. Here one reader
task follows all the streams that have subscribers with a single multi-key XREAD on its own
connection and hands each entry to the subscribers' bounded queues. A subscriber reads what
it missed (after its `Last-Event-ID`) with short non-blocking reads, then takes live entries
from its queue; one that falls `QUEUE_SIZE` entries behind is dropped and its client resumes
with `Last-Event-ID`, losing nothing. Each tenant may hold its `event_streams` limit of
streams on one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import FrameType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.store import LimitReached, Store, events_key, stream_position

log = logging.getLogger("ftune.api.events")

Event = tuple[str, str, bytes]
"""(stream id, type, JSON data)"""
CLOSED: Event = ("", "", b"")
"""Put in a subscriber's queue when the process shuts down: its stream ends there."""
QUEUE_SIZE = 1000
BLOCK_MS = 500
"""The reader's XREAD wait: how late a stream subscribed meanwhile joins the next read."""
RETRY_AFTER_SECONDS = 10


@dataclass(eq=False)
class Subscription:
    key: str
    tenant: str
    start: str
    """Stream id from which the reader delivers; before it the subscriber reads itself."""
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: bool = False
    closed: bool = False


class EventHub:
    def __init__(self, redis_url: str, *, block_ms: int = BLOCK_MS) -> None:
        # One connection: the reader's. Subscribers' catch-up reads use the store's pool.
        self.redis = aioredis.Redis.from_url(
            redis_url, max_connections=1, client_name="ftune-events"
        )
        self.block_ms = block_ms
        self.cursors: dict[str, str] = {}
        self.subscribers: dict[str, set[Subscription]] = {}
        self.open: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._register = asyncio.Lock()
        self.closing = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EventHub]:
        task = asyncio.create_task(self._read_forever(), name="ftune-event-hub")
        restore = _on_sigterm(asyncio.get_running_loop(), self.close_all)
        try:
            yield self
        finally:
            restore()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.redis.aclose()

    async def subscribe(
        self, store: Store, tenant: str, job_id: str, *, limit: int | None
    ) -> Subscription:
        """Follow the job's stream: live entries after `Subscription.start` go to its queue
        until `unsubscribe`. LimitReached past the tenant's `limit` (None: no limit) of
        streams on this process."""
        if limit is not None and self.open[tenant] >= limit:
            raise LimitReached(
                f"tenant {tenant} has {self.open[tenant]} open event streams on this API "
                f"process, the limit is {limit} (event_streams); close one, or poll "
                "GET /v1/jobs/{id} instead",
                limit="event_streams",
                quota=limit,
                retry_after=RETRY_AFTER_SECONDS,
            )
        key = events_key(job_id)
        sub = Subscription(key=key, tenant=tenant, start="0-0")
        self.open[tenant] += 1
        try:
            async with self._register:  # a stream's cursor is set once, before any delivery
                if key not in self.cursors:
                    last = await store.redis.xrevrange(key, count=1)
                    self.cursors[key] = last[0][0].decode() if last else "0-0"
                sub.start = self.cursors[key]
                self.subscribers.setdefault(key, set()).add(sub)
                sub.dropped = self.closing  # shutting down: it reads what is stored, then ends
        except BaseException:
            self.unsubscribe(sub)
            raise
        self._wake.set()
        return sub

    def close_all(self) -> None:
        """End every stream of this process now (it is shutting down): each ends after what
        it has already been sent, and its client resumes elsewhere with Last-Event-ID. Left
        open, a stream would hold the server past its graceful shutdown."""
        self.closing = True
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.dropped = True
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(CLOSED)

    def unsubscribe(self, sub: Subscription) -> None:
        """Idempotent: also called when the response's stream object is collected unused."""
        if sub.closed:
            return
        sub.closed = True
        self.open[sub.tenant] -= 1
        if not self.open[sub.tenant]:
            del self.open[sub.tenant]
        subs = self.subscribers.get(sub.key, set())
        subs.discard(sub)
        if not subs:
            self.subscribers.pop(sub.key, None)
            self.cursors.pop(sub.key, None)

    async def _read(self) -> None:
        backoff = 0.5
        while True:
            if not self.cursors:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                found = await self.redis.xread(dict(self.cursors), count=100, block=self.block_ms)
            except RedisError as exc:
                log.warning("reading job events failed (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            for raw_key, entries in found or []:
                key = raw_key.decode()
                if key not in self.cursors:
                    continue  # its last subscriber left during the read
                for entry_id, fields in entries:
                    event = (entry_id.decode(), fields[b"type"].decode(), fields[b"data"])
                    for sub in list(self.subscribers.get(key, ())):
                        self._push(key, sub, event)
                self.cursors[key] = entries[-1][0].decode()

    async def _read_forever(self) -> None:
        """The reader must outlive a bug in one pass: every stream of the process needs it."""
        while True:
            try:
                await self._read()
            except Exception:
                log.exception("the job event reader failed; restarting it in 1 s")
                await asyncio.sleep(1)

    def _push(self, key: str, sub: Subscription, event: Event) -> None:
        try:
            sub.queue.put_nowait(event)
        except asyncio.QueueFull:  # a client that does not read: it resumes when it reconnects
            sub.dropped = True
            self.subscribers.get(key, set()).discard(sub)


async def follow(
    store: Store, sub: Subscription, after: str, keepalive: float, until: float | None = None
) -> AsyncIterator[Event | None]:
    """The stream's events after `after`, then live ones; None when `keepalive` seconds
    passed with none, or when the time `until` (`time.monotonic`) came first. Ends when the
    subscriber was dropped for falling behind."""
    key = sub.key
    last = stream_position(after)
    while stream_position(sub.start) > last:  # what came before the reader took over
        page = await store.redis.xrange(key, min=f"({after}", max=sub.start, count=100)
        if not page:
            break
        for entry_id, fields in page:
            after = entry_id.decode()
            last = stream_position(after)
            yield after, fields[b"type"].decode(), fields[b"data"]
    while not sub.dropped or not sub.queue.empty():
        wait = keepalive if until is None else max(0.0, min(keepalive, until - time.monotonic()))
        try:
            event = await asyncio.wait_for(sub.queue.get(), wait)
        except TimeoutError:
            yield None
            continue
        if event is CLOSED:
            return
        if stream_position(event[0]) > last:
            last = stream_position(event[0])
            yield event


def _on_sigterm(loop: asyncio.AbstractEventLoop, close: Callable[[], None]) -> Callable[[], None]:
    """Call `close` on the loop when SIGTERM arrives, then the handler already there (uvicorn's,
    which starts its graceful shutdown); returns what puts that handler back. uvicorn waits for
    open connections before it tells the app anything, and an event stream is never done."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        return lambda: None
    chained = previous

    def handle(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # that loop has closed: nothing to end
            loop.call_soon_threadsafe(close)
        chained(signum, frame)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handle:  # else another chained after us
            signal.signal(signal.SIGTERM, chained)

    signal.signal(signal.SIGTERM, handle)
    return restore
