"""The minimum pace of an upload holds the client to it, not the server: time the server spends
holding the body back (its reader behind, a slow store) is not the client's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from service.api.errors import UploadTimeout
from service.api.spool import paced


async def _chunks(n: int, gap: float) -> AsyncIterator[bytes]:
    for _ in range(n):
        await anyio.sleep(gap)
        yield b"x" * 10


async def test_a_client_that_stops_sending_is_cut_off() -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield b"x" * 10
        yield b"x" * 10
        await anyio.Event().wait()  # the client sends nothing more
        yield b""

    got = 0
    with anyio.fail_after(10), pytest.raises(UploadTimeout, match="came too slowly: 20 bytes"):
        async for chunk in paced(stalls(), min_rate=1000, grace=0.25):
            got += len(chunk)
    assert got == 20


async def test_the_server_holding_the_body_back_is_not_counted_against_the_client() -> None:
    got = 0
    async for chunk in paced(_chunks(5, 0.0), min_rate=1000, grace=0.25):
        got += len(chunk)
        await anyio.sleep(0.15)  # the reader behind: 0.75 s in all, far past the grace
    assert got == 50
