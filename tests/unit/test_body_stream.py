"""Handing an upload's body to the thread that checks it: a cut body is never taken for a
shorter file, a reader that gives up gets its answer out at once, and bodies waiting on their
readers never hold the threads those readers need."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import pytest

from service.api.body_stream import BodyCutOff, BodyReader, stream_upload
from service.api.errors import PayloadTooLarge
from service.api.spool import Upload
from service.datasets.containers import UnsupportedFile
from service.datasets.validate import validate_stream

LINE = (json.dumps({"prompt": "2+2?", "chosen": "4.", "rejected": "5."}) + "\n").encode()


def upload(chunks: AsyncIterator[bytes]) -> Upload:
    return Upload(chunks, 1 << 30, None, b"")


async def rows(reader: BodyReader) -> int:
    result = await anyio.to_thread.run_sync(validate_stream, reader, io.BytesIO())
    return result.rows


async def test_a_body_cut_after_whole_rows_fails_its_reader() -> None:
    """Every line that came is a valid row: only the end marker tells the reader the body was
    not whole, and the body's own fault is the answer."""
    seen: list[BaseException] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield LINE * 100
        raise PayloadTooLarge("the upload is over the limit")

    async def consume(reader: BodyReader) -> int:
        try:
            return await rows(reader)
        except BaseException as e:
            seen.append(e)
            raise

    with pytest.raises(PayloadTooLarge):
        await stream_upload(upload(chunks()), consume)
    assert [type(e) for e in seen] == [BodyCutOff]


async def test_a_reader_that_gives_up_is_answered_without_the_rest_of_the_body() -> None:
    taken = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal taken
        yield "not UTF-8 but UTF-16\n".encode("utf-16")
        while True:  # a client that would go on sending for ever
            taken += 1
            yield b"\0" * 65536
            await anyio.sleep(0)

    with anyio.fail_after(20), pytest.raises(UnsupportedFile, match="UTF-16"):
        await stream_upload(upload(chunks()), rows)
    assert taken < 100


async def test_uploads_waiting_on_their_readers_leave_the_readers_threads_free() -> None:
    """A body's hand-over waits in a thread of its own while its reader is behind; in the
    threads the readers run in (anyio's shared pool), it would take the one a reader needs."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 1

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(300):
            yield LINE * 400

    async def consume(reader: BodyReader) -> int:
        await anyio.sleep(0.2)  # as store_dataset, which looks at the quota first
        return await rows(reader)

    try:
        with anyio.fail_after(20):
            assert await stream_upload(upload(chunks()), consume) == 300 * 400
    finally:
        limiter.total_tokens = tokens
