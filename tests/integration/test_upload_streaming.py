"""A raw upload's body is checked while it arrives, over real HTTP (uvicorn): no temp file,
and a body that stops short, runs past the limit or is refused early stores nothing and
still gets its answer."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
import redis

from service.api.spool import BodyReader, Upload, stream_upload
from service.datasets.space import UploadSpace
from service.datasets.validate import validate_stream
from service.settings import Settings
from tests.fixtures.api import ALICE, LiveServer
from tests.integration.test_api_datasets import ROW, jsonl

NDJSON = {**ALICE, "Content-Type": "application/x-ndjson"}
ROWS = [{**ROW, "prompt": f"Question {i}: what is {i}+{i}?"} for i in range(2000)]


def stored_nothing(settings: Settings) -> bool:
    keys = redis.Redis.from_url(settings.redis_url).keys("ftune:ds:*")
    store = Path(settings.store_url.removeprefix("file://"))
    files = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    return not keys and not files


def slots_freed(settings: Settings) -> bool:
    """Only the upload space's own lock is left (within a few seconds: the server notices a
    client gone at its next read)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if [p.name for p in settings.upload_dir.iterdir()] == [".admit"]:
            return True
        time.sleep(0.05)
    return False


def test_a_jsonl_body_is_checked_while_it_arrives_and_never_saved(
    live_api: LiveServer, api_settings: Settings
) -> None:
    body = jsonl(*ROWS)
    half = body.index(b"\n", len(body) // 2) + 1
    sent, looked = threading.Event(), threading.Event()

    def chunks() -> Iterator[bytes]:
        yield body[:half]
        sent.set()
        looked.wait(10)
        yield body[half:]

    answer: list[httpx.Response] = []
    upload = threading.Thread(
        target=lambda: answer.append(
            httpx.post(f"{live_api.url}/v1/datasets", content=chunks(), headers=NDJSON)
        )
    )
    upload.start()
    assert sent.wait(10)
    time.sleep(0.3)
    # Half the body is in: the upload holds a slot, but no file of it exists on the host.
    [slot] = [p for p in api_settings.upload_dir.iterdir() if p.is_dir()]
    assert [p.name for p in slot.iterdir()] == [".lock"]
    looked.set()
    upload.join(20)
    [resp] = answer
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["rows"] == len(ROWS) and ds["source_bytes"] == len(body)
    rows = httpx.get(
        f"{live_api.url}/v1/datasets/{ds['id']}/rows",
        params={"offset": 1999, "limit": 1},
        headers=ALICE,
    ).json()["rows"]
    assert rows == [{**ROW, "prompt": "Question 1999: what is 1999+1999?"}]
    assert slots_freed(api_settings)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_stops_short_stores_nothing(
    live_api: LiveServer, api_settings: Settings, framing: str
) -> None:
    """The client goes away after whole rows: what came is a valid dataset, but not the one
    it was sending, so none is stored."""
    body = jsonl(*ROWS)
    cut = body.index(b"\n", len(body) // 2) + 1
    host, port = live_api.url.removeprefix("http://").split(":")
    head = (
        b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-alice\r\n"
        b"Content-Type: application/x-ndjson\r\n"
    )
    if framing == "chunked":
        sent = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % cut + body[:cut] + b"\r\n"
    else:
        sent = head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:cut]
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(sent)
        time.sleep(0.5)  # the rows that came are read and checked
    assert slots_freed(api_settings)
    assert stored_nothing(api_settings)


def test_a_chunked_body_past_the_limit_is_413_and_stores_nothing(
    api_settings: Settings,
) -> None:
    settings = replace(api_settings, max_dataset_bytes=100_000)
    body = jsonl(*ROWS)  # ~270 KB of valid rows, sent without a Content-Length
    chunks = (body[at : at + 16384] for at in range(0, len(body), 16384))
    with LiveServer(settings) as api:
        resp = httpx.post(f"{api.url}/v1/datasets", content=chunks, headers=NDJSON)
    assert resp.status_code == 413, resp.text
    assert resp.json()["detail"] == "the upload is over the limit of 100000 bytes"
    assert stored_nothing(settings) and slots_freed(settings)


def test_a_file_refused_by_its_first_bytes_is_answered_to_a_client_still_sending(
    live_api: LiveServer, api_settings: Settings
) -> None:
    """The refusal is known from the first bytes; the rest of the body is still taken (and
    dropped), so the client reads the 415 instead of a broken connection."""
    body = "\n".join(str(ROW) for _ in range(3000)).encode("utf-16")  # ~700 KB
    chunks = (body[at : at + 8192] for at in range(0, len(body), 8192))
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=chunks, headers=NDJSON)
    assert resp.status_code == 415, resp.text
    assert "UTF-16" in resp.json()["detail"]
    assert stored_nothing(api_settings) and slots_freed(api_settings)


def test_a_busy_server_answers_expect_100_continue_with_503_before_the_body_is_sent(
    api_settings: Settings,
) -> None:
    """curl sends `Expect: 100-continue` for a large file: told 503 at once, it never sends
    the gigabytes it would have to send again."""
    settings = replace(api_settings, max_concurrent_uploads=1)
    with LiveServer(settings) as api:
        _, lock = UploadSpace(settings.upload_dir, max_uploads=1, reserve_bytes=0)._admit()
        try:  # another process's upload holds the host's one slot
            host, port = api.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(
                    b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-alice\r\n"
                    b"Content-Type: application/x-ndjson\r\nContent-Length: 500000\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                first = conn.recv(200)
        finally:
            lock.close()
    assert first.startswith(b"HTTP/1.1 503"), first


async def test_uploads_waiting_on_their_readers_leave_the_readers_threads_free() -> None:
    """A body's hand-over waits in a thread of its own while its reader is behind; in the
    threads the readers run in (anyio's shared pool), it would take the one a reader needs."""
    line = jsonl(ROW)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 1

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(300):
            yield line * 400

    async def consume(reader: BodyReader) -> int:
        await anyio.sleep(0.2)  # as store_dataset, which looks at the quota first
        result = await anyio.to_thread.run_sync(validate_stream, reader, io.BytesIO())
        return result.rows

    try:
        with anyio.fail_after(20):
            rows = await stream_upload(Upload(chunks(), 1 << 30, None, b""), consume)
    finally:
        limiter.total_tokens = tokens
    assert rows == 300 * 400
