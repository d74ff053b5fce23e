"""A raw upload's body is checked while it arrives, over real HTTP (uvicorn): no temp file,
and a body that stops short, runs past the limit or is refused early stores nothing and
still gets its answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.api.body_stream import stream_upload
from service.settings import Settings
from tests.fixtures.api import (
    ALICE,
    LiveServer,
    other_upload,
    slot_taken,
    slots_freed,
    stored_nothing,
)
from tests.integration.test_api_datasets import FIXTURES, ROW, jsonl

NDJSON = {**ALICE, "Content-Type": "application/x-ndjson"}
ROWS = [{**ROW, "prompt": f"Question {i}: what is {i}+{i}?"} for i in range(2000)]
HEAD = b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-alice\r\n"


def as_form(data: bytes, name: str = "rows.jsonl") -> tuple[bytes, dict[str, str]]:
    """A multipart form holding ``data`` as its file, as httpx (and so the openai SDK)
    encodes one: the text fields first, then the file."""
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"note": "from a form"},
        files={"file": (name, data, "application/octet-stream")},
    )
    return request.read(), {**ALICE, "Content-Type": request.headers["Content-Type"]}


@pytest.mark.parametrize("sent", ["raw", "multipart"])
def test_a_jsonl_body_is_checked_while_it_arrives_and_never_saved(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch, sent: str
) -> None:
    """A raw body, or the file of a multipart form (what a browser's FormData or an SDK
    sends): either is checked as it arrives, with no temp file."""
    streaming = threading.Event()

    async def seen(*args: Any) -> Any:
        streaming.set()
        return await stream_upload(*args)

    monkeypatch.setattr("service.api.datasets.stream_upload", seen)
    body = jsonl(*ROWS)
    sending, headers = as_form(body) if sent == "multipart" else (body, NDJSON)
    half = len(sending) // 2
    looked = threading.Event()

    def chunks() -> Iterator[bytes]:
        yield sending[:half]
        looked.wait(20)
        yield sending[half:]

    with LiveServer(api_settings) as api:
        answer: list[httpx.Response] = []
        upload = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{api.url}/v1/datasets", content=chunks(), headers=headers)
            )
        )
        upload.start()
        try:
            assert streaming.wait(20)
            # The upload holds a slot, but no file of it exists on the host.
            [slot] = [p for p in api_settings.upload_dir.iterdir() if p.is_dir()]
            assert [p.name for p in slot.iterdir()] == [".lock"]
        finally:
            looked.set()
            upload.join(30)
        [resp] = answer
        assert resp.status_code == 201, resp.text
        ds = resp.json()
        assert ds["rows"] == len(ROWS) and ds["source_bytes"] == len(body)
        rows = httpx.get(
            f"{api.url}/v1/datasets/{ds['id']}/rows",
            params={"offset": 1999, "limit": 1},
            headers=ALICE,
        ).json()["rows"]
    assert rows == [{**ROW, "prompt": "Question 1999: what is 1999+1999?"}]
    assert slots_freed(api_settings)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "form", "form-unclosed"])
def test_a_body_that_stops_short_stores_nothing(
    live_api: LiveServer, api_settings: Settings, framing: str
) -> None:
    """The client goes away after whole rows: what came is a valid dataset, but not the one
    it was sending, so none is stored (tests/unit/test_body_stream.py makes the same cut
    without a socket's timing). A form cut in its file, or after its file but before its
    closing boundary, stores nothing either."""
    body = jsonl(*ROWS)
    cut = body.index(b"\n", len(body) // 2) + 1
    head = HEAD + b"Content-Type: application/x-ndjson\r\n"
    if framing.startswith("form"):
        form, headers = as_form(body)
        cut = form.index(body[cut:]) if framing == "form" else len(form) - len(b"--\r\n")
        head = HEAD + b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n"
        body = form
    if framing == "chunked":
        sent = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % cut + body[:cut] + b"\r\n"
    else:
        sent = head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:cut]
    with socket.create_connection(("127.0.0.1", live_api.port), timeout=10) as conn:
        conn.sendall(sent)
        # Gone only once the server is reading the body: a check made before it even took the
        # request would see nothing stored yet, or a draft it is still writing.
        assert slot_taken(api_settings)
    assert slots_freed(api_settings)
    assert stored_nothing(api_settings)


def with_field_after(form: bytes, headers: dict[str, str], name: str, value: bytes) -> bytes:
    """``form`` with one more text field after its file, as `curl -F file=@x -F name=v`
    sends it."""
    tail = b"--" + headers["Content-Type"].split("boundary=")[1].encode()
    field = b'\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (
        name.encode(),
        value,
    )
    return form.removesuffix(tail + b"--\r\n") + tail + field + tail + b"--\r\n"


def test_a_form_that_ends_without_its_closing_boundary_stores_nothing(
    live_api: LiveServer, api_settings: Settings
) -> None:
    """The body ends in good order (chunked, its last chunk sent), the file's rows whole, but
    the form never closed: it is malformed, not a shorter file."""
    form, headers = as_form(jsonl(*ROWS[:50]))
    unclosed = form[: -len(b"--\r\n")]
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=iter([unclosed]), headers=headers)
    assert resp.status_code == 400, resp.text
    assert "multipart/form-data body is malformed" in resp.json()["detail"]
    assert stored_nothing(api_settings) and slots_freed(api_settings)


def test_a_form_with_a_field_after_its_file_is_read_to_its_end(live_api: LiveServer) -> None:
    form, headers = as_form(jsonl(*ROWS[:3]))
    resp = httpx.post(
        f"{live_api.url}/v1/datasets",
        content=with_field_after(form, headers, "after", b"yes"),
        headers=headers,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["rows"] == 3
    big = with_field_after(form, headers, "after", b"x" * 5000)
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=big, headers=headers)
    assert resp.status_code == 413, resp.text
    assert resp.json()["detail"] == "form field 'after' is over 4096 bytes"
    listed = httpx.get(f"{live_api.url}/v1/datasets", headers=ALICE).json()["items"]
    assert len(listed) == 1  # the refused form's file, valid as it was, is not stored


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
    body = "\n".join(str(ROW) for _ in range(3000)).encode("utf-16")  # ~700 KB
    chunks = (body[at : at + 8192] for at in range(0, len(body), 8192))
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=chunks, headers=NDJSON)
    assert resp.status_code == 415, resp.text
    assert "UTF-16" in resp.json()["detail"]
    assert stored_nothing(api_settings) and slots_freed(api_settings)


def test_a_parquet_file_sent_as_octet_stream_is_saved_then_read(
    live_api: LiveServer, tmp_path: Path
) -> None:
    """The browser console sends a .parquet file as application/octet-stream: its first bytes
    say Parquet, which is read from its end, so it is saved first after all."""
    source = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").open()]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(source), parquet)
    data = parquet.read_bytes()
    resp = httpx.post(
        f"{live_api.url}/v1/datasets",
        content=(data[at : at + 1000] for at in range(0, len(data), 1000)),
        headers={**ALICE, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["rows"]) == ("parquet", len(source))
    # The same file in a form, with a field after it (curl -F puts them in the order given).
    form, headers = as_form(data, "train.parquet")
    form = with_field_after(form, headers, "after", b"yes")
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=form, headers=headers)
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["rows"]) == ("parquet", len(source))


def test_a_busy_server_answers_expect_100_continue_with_503_before_the_body_is_sent(
    api_settings: Settings,
) -> None:
    """curl sends `Expect: 100-continue` for a large file: told 503 at once, it never sends
    the gigabytes it would have to send again."""
    settings = replace(api_settings, max_concurrent_uploads=1)
    with LiveServer(settings) as api:
        _, lock = other_upload(settings)._admit(
            "another-team", None
        )  # another process holds the one slot
        try:
            with socket.create_connection(("127.0.0.1", api.port), timeout=10) as conn:
                conn.sendall(
                    HEAD + b"Content-Type: application/x-ndjson\r\nContent-Length: 500000\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                first = conn.recv(200)
        finally:
            lock.close()
    assert first.startswith(b"HTTP/1.1 503"), first
