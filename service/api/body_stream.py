"""An upload's file handed to a thread that checks it while it arrives (or, for a big one,
feeds it to a child process that does: service.datasets.offload): no spool file, and
the checking overlaps the receiving (`POST /v1/datasets` for a raw body or a form's file,
OpenAI's `POST /v1/files` for the SDK's form). The thread reads a :class:`BodyReader`; a
body that stops short makes it raise, so a cut-off upload is never taken for a shorter
file."""

from __future__ import annotations

import contextlib
import io
import queue
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


QUEUED_BATCHES = 4
"""Batches waiting for the reader: with the one being filled, all a body holds in memory."""
BATCH_BYTES = 2 << 20
"""While its reader is behind, a body is handed over in batches of uvicorn's chunks (up to
256 KB each): one hand-over (a thread's wake-up, the GIL passed back and forth) for up to
2 MiB instead of one a chunk."""


class BodyReader(io.RawIOBase):
    """An upload's body for a thread to read while it arrives: chunks handed over through a
    bounded queue (memory stays flat; the body waits while the reader is behind). The reader
    sees the end only when the whole body came: a body cut off raises :class:`BodyCutOff`."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[bytes] | BaseException | None] = queue.Queue(QUEUED_BATCHES)
        self.batch: list[bytes] = []
        self.batch_bytes = 0
        self.pending: list[memoryview] = []
        self.ended = False
        self.waiting = anyio.CapacityLimiter(1)
        """The thread a hand-over waits in while the reader is behind: its own, so uploads
        waiting on their readers never hold the threads the readers themselves need."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.pending:
            if self.ended:
                return 0
            item = self.queue.get()
            if not isinstance(item, list):
                self.ended = True
                if item is None:
                    return 0
                raise item
            self.pending = [memoryview(chunk) for chunk in reversed(item)]
        chunk = self.pending[-1]
        n = min(len(buffer), len(chunk))
        buffer[:n] = chunk[:n]
        if n == len(chunk):
            self.pending.pop()
        else:
            self.pending[-1] = chunk[n:]
        return n

    def close(self) -> None:
        """The reader is done (at the end, or given up): whatever waits to hand it a chunk
        goes on."""
        super().close()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()

    async def put(self, chunk: bytes) -> None:
        """Hand over a chunk (the reader still reading), waiting only while the reader is
        behind by a whole batch."""
        if not chunk:  # an empty read is the end to the reader: only :meth:`end` says so
            return
        self.batch.append(chunk)
        self.batch_bytes += len(chunk)
        try:
            self.queue.put_nowait(self.batch)
        except queue.Full:
            if self.batch_bytes < BATCH_BYTES:
                return
            await self._put(self.batch)
        self.batch, self.batch_bytes = [], 0

    async def end(self, cut_off: BaseException | None) -> None:
        """The body's end (``cut_off``: it stopped short), after what is left of it."""
        if self.batch:
            await self._put(self.batch)
            self.batch, self.batch_bytes = [], 0
        await self._put(cut_off)

    async def _put(self, item: list[bytes] | BaseException | None) -> None:
        if not self.closed:
            await anyio.to_thread.run_sync(self.queue.put, item, limiter=self.waiting)


class BodyCutOff(Exception):
    """The body stopped before its end (too large, too slow, the client gone): nothing it
    held may be stored."""


async def stream_upload(
    body: AsyncIterable[bytes], consume: Callable[[BodyReader], Awaitable[T]]
) -> T:
    """``consume``'s answer for the file's bytes (``body``), which it reads in a thread while they
    arrive: no spool file, and the checking overlaps the receiving. If ``consume`` gives up
    early (a file refused by its first bytes, the tenant's quota), it answers at once and
    frees its slot; the server drops what the client still sends."""
    reader = BodyReader()
    answer: list[T] = []
    failed: list[Exception] = []

    async def run() -> None:
        try:
            answer.append(await consume(reader))
        except Exception as e:
            failed.append(e)
        finally:
            reader.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        end: BaseException | None = BodyCutOff("the upload stopped before its end")
        try:
            async for chunk in body:
                if reader.closed:
                    break  # answered already: uvicorn drops the rest of the body
                await reader.put(chunk)
            else:
                end = None
        except Exception as e:
            failed.insert(0, e)  # the body's own fault is the answer
        finally:
            with anyio.CancelScope(shield=True):
                await reader.end(end)
    if failed:
        raise failed[0]
    return answer[0]
