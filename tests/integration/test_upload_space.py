"""Uploads share a host's temp space fairly (feedback snapshots too): a bounded number at
once (503 + Retry-After past it, or when space is short), a body that trickles in is cut off,
and what a killed upload left is removed when the API starts again."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.datasets.space import UploadSpace
from service.settings import Settings
from tests.fixtures.api import ALICE, BOB, ApiProcess, LiveServer, other_upload, slots_freed
from tests.integration.test_api_datasets import ROW, jsonl

NDJSON = {**ALICE, "Content-Type": "application/x-ndjson"}
PARQUET = {**ALICE, "Content-Type": "application/vnd.apache.parquet"}


async def test_past_the_concurrent_uploads_an_upload_gets_503(
    api_settings: Settings,
) -> None:
    settings = replace(api_settings, max_concurrent_uploads=1)
    async with AsyncTestClient(create_app(settings)) as client:
        path, lock = other_upload(settings)._admit(
            "another-team", None
        )  # an upload in flight in another process
        resp = await client.post("/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "30"
        assert "taking 1 uploads, its limit" in resp.json()["detail"]
        lock.close()  # that upload's process is gone: its slot is taken back
        resp = await client.post("/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert resp.status_code == 201, resp.text
        assert not path.exists() and list(settings.upload_dir.iterdir()) == [
            settings.upload_dir / ".admit"
        ]


async def test_one_tenant_takes_at_most_half_of_the_hosts_uploads(
    api_settings: Settings,
) -> None:
    """A tenant's slow uploads must not shut the other tenants out of a shared host: with two
    slots, alice's second upload waits while bob's goes through."""
    settings = replace(api_settings, max_concurrent_uploads=2)
    host = UploadSpace(settings.upload_dir, max_uploads=2, reserve_bytes=0)
    async with AsyncTestClient(create_app(settings)) as client:
        _, alices = host._admit("alice", None)  # alice's slow upload, in another process
        resp = await client.post("/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "30"
        assert "tenant alice is taking 1 uploads on this server" in resp.json()["detail"]
        resp = await client.post("/v1/datasets", content=jsonl(ROW), headers={**NDJSON, **BOB})
        assert resp.status_code == 201, resp.text
        alices.close()
        resp = await client.post("/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert resp.status_code == 201, resp.text


def test_a_host_with_one_tenant_gives_it_every_slot(tmp_path: Path) -> None:
    settings = Settings(upload_dir=tmp_path, max_concurrent_uploads=3)
    assert UploadSpace.from_settings(settings, tenants=1).per_tenant == 3
    assert UploadSpace.from_settings(settings, tenants=2).per_tenant == 2
    one = replace(settings, max_concurrent_uploads=1)
    assert UploadSpace.from_settings(one, tenants=5).per_tenant == 1


async def test_a_feedback_snapshot_takes_a_slot_of_the_upload_space(
    api_settings: Settings,
) -> None:
    settings = replace(api_settings, max_concurrent_uploads=1)
    async with AsyncTestClient(create_app(settings)) as client:
        events = [{"id": "p1", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}]
        posted = await client.post("/v1/feedback/chat", json={"events": events}, headers=ALICE)
        assert posted.status_code == 200, posted.text
        _, lock = other_upload(settings)._admit(
            "another-team", None
        )  # an upload in flight in another process
        resp = await client.post("/v1/feedback/chat/snapshot", headers=ALICE)
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "30"
        lock.close()
        resp = await client.post("/v1/feedback/chat/snapshot", headers=ALICE)
        assert resp.status_code == 201, resp.text
        assert list(settings.upload_dir.iterdir()) == [settings.upload_dir / ".admit"]


def test_an_upload_the_temp_space_may_not_hold_gets_503(api_settings: Settings) -> None:
    """A file that is saved before it is read (Parquet, a multipart form) reserves space for
    its declared size, or for the largest upload when the body is chunked: more than any disk
    has here. A JSONL body is checked as it arrives and needs no space."""
    with LiveServer(replace(api_settings, max_dataset_bytes=1 << 60)) as api:
        small = httpx.post(f"{api.url}/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert small.status_code == 201, small.text
        chunked = httpx.post(f"{api.url}/v1/datasets", content=iter([jsonl(ROW)]), headers=NDJSON)
        assert chunked.status_code == 201, chunked.text
        parquet = httpx.post(
            f"{api.url}/v1/datasets",
            content=iter([b"PAR1", b"\0" * 100]),
            headers=PARQUET,
        )
        assert parquet.status_code == 503, parquet.text
        assert "temp space is short" in parquet.json()["detail"]
        assert parquet.headers["Retry-After"] == "30"
        # The same under a media type that does not say Parquet: its first bytes do.
        unnamed = httpx.post(
            f"{api.url}/v1/datasets",
            content=iter([b"PAR1", b"\0" * 100]),
            headers={**ALICE, "Content-Type": "application/octet-stream"},
        )
        assert unnamed.status_code == 503, unnamed.text
        assert "temp space is short" in unnamed.json()["detail"]


@pytest.fixture
def slow_api(api_settings: Settings) -> Iterator[LiveServer]:
    settings = replace(api_settings, upload_grace_seconds=1.0, upload_min_bytes_per_second=1000)
    with LiveServer(settings) as server:
        yield server


def test_a_body_that_trickles_in_is_cut_off_with_408(
    slow_api: LiveServer, api_settings: Settings
) -> None:
    with socket.create_connection(("127.0.0.1", slow_api.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-alice\r\n"
            b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"pro\r\n'
        )
        started = time.monotonic()
        answer = b""
        while chunk := conn.recv(4096):  # until the server closes the connection
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"the upload came too slowly" in answer and 0.8 < waited < 5, waited
    assert slots_freed(api_settings)


def test_a_killed_uploads_temp_files_are_removed_at_start_up(
    api_settings: Settings, tmp_path: Path
) -> None:
    settings = replace(api_settings, max_concurrent_uploads=1)
    sent, killed = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:  # a Parquet file is saved before it is read
        yield b"PAR1" + b"\0" * 5000
        sent.set()
        killed.wait(10)
        yield b"PAR1"

    with ApiProcess(settings, tmp_path / "a.log") as api:

        def post() -> None:
            with contextlib.suppress(httpx.TransportError):  # the API dies mid-upload
                httpx.post(f"{api.url}/v1/datasets", content=body(), headers=PARQUET, timeout=10)

        upload = threading.Thread(target=post, daemon=True)
        upload.start()
        assert sent.wait(10)
        left = _spooling(settings.upload_dir)
        second = httpx.post(f"{api.url}/v1/datasets", content=jsonl(ROW), headers=NDJSON)
        assert second.status_code == 503, second.text  # the one slot is taken
        api.kill()
        killed.set()
    assert left.exists()  # nothing of the killed process cleaned up
    live, lock = other_upload(settings)._admit(
        "another-team", None
    )  # another process's upload, still running
    try:
        with ApiProcess(settings, tmp_path / "b.log") as again:
            assert not left.exists() and live.exists()
            lock.close()
            resp = httpx.post(f"{again.url}/v1/datasets", content=jsonl(ROW), headers=NDJSON)
            assert resp.status_code == 201, resp.text
    finally:
        lock.close()
    upload.join(10)


def _spooling(root: Path) -> Path:
    """The slot of the one upload being saved, once its first bytes are in its file."""
    deadline = time.monotonic() + 20
    while True:
        files = [p for p in root.glob("*/upload") if p.stat().st_size > 0]
        if files:
            return files[0].parent
        assert time.monotonic() < deadline, "no upload is being saved"
        time.sleep(0.05)
