"""A big upload's body is validated in a child process (`service.datasets.offload`): the same
record, rows and refusals as when it is validated in a thread of the API, and a child that
dies stores nothing. Here every upload that declares its size goes to a child
(`MIN_BYTES` = 0), or none does."""

from __future__ import annotations

import gzip
import json
import socket
import time
from dataclasses import replace
from typing import Any

import httpx
import psutil
import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.datasets import offload
from service.settings import Settings
from tests.fixtures.api import ALICE, Api, LiveServer, slot_taken, slots_freed, stored_nothing
from tests.integration.test_api_datasets import FIXTURES, ROW, jsonl
from tests.integration.test_upload_streaming import HEAD, as_form

NDJSON = {**ALICE, "Content-Type": "application/x-ndjson"}
SAME = (
    "rows",
    "bytes",
    "source_bytes",
    "sha256",
    "format",
    "kind",
    "source_format",
    "stats",
    "warnings",
    "container",
    "compressed",
    "mapping",
    "functions",
    "skipped_rows",
    "skipped",
)
TEXT_THEN_CHAT = jsonl(
    ROW,
    {**ROW, "prompt": "Name a colour."},
    {
        "prompt": [{"role": "user", "content": "Café, s'il vous plaît."}],
        "chosen": [{"role": "assistant", "content": "Voilà votre café ☕."}],
        "rejected": [{"role": "assistant", "content": "Non."}],
    },
)
"""Text rows, then a conversation: the text rows written so far are read back from the
draft and rewritten as conversations (the child asks the API for the bytes it holds)."""
SFT_TEXT_THEN_CHAT = jsonl(
    {"prompt": "Say hi.", "completion": "Hi!"},
    {
        "messages": [
            {"role": "user", "content": "Say bye."},
            {"role": "assistant", "content": "Bye!"},
        ]
    },
)


class Children:
    """Counts the uploads validated in a child process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = offload.validate_in_child

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr("service.datasets.ingest.validate_in_child", counted)


async def both_ways(
    api: Api, monkeypatch: pytest.MonkeyPatch, body: bytes, headers: dict[str, str], **params: str
) -> tuple[httpx.Response, httpx.Response]:
    """The answers to ``body`` validated in a child, then in a thread (its record deleted in
    between, so that nothing the first stored can answer the second)."""
    children = Children(monkeypatch)
    answers = []
    for at_least in (0, 1 << 62):
        monkeypatch.setattr(offload, "MIN_BYTES", at_least)
        resp = await api.client.post(
            "/v1/datasets", params={"name": "d", **params}, content=body, headers=headers
        )
        if resp.status_code == 201:
            await api.client.delete(f"/v1/datasets/{resp.json()['id']}", headers=ALICE)
        answers.append(resp)
    assert children.count == 1, [a.text[:300] for a in answers]
    return answers[0], answers[1]


@pytest.mark.parametrize(
    ("name", "ctype", "params"),
    [
        ("ultrafeedback.jsonl", "application/x-ndjson", {}),
        ("ultrafeedback.jsonl.gz", "application/gzip", {}),
        ("sharegpt.json", "application/json", {}),
        ("prompts.csv", "text/csv", {}),
        ("hh.jsonl", "application/x-ndjson", {"on_invalid": "skip", "max_invalid_fraction": "0.5"}),
        ("text-then-chat.jsonl", "application/x-ndjson", {}),
        ("sft-text-then-chat.jsonl", "application/x-ndjson", {}),
    ],
)
async def test_a_body_validated_in_a_child_is_stored_as_in_a_thread(
    api: Api, monkeypatch: pytest.MonkeyPatch, name: str, ctype: str, params: dict[str, str]
) -> None:
    if name == "text-then-chat.jsonl":
        body = TEXT_THEN_CHAT
    elif name == "sft-text-then-chat.jsonl":
        body = SFT_TEXT_THEN_CHAT
    elif name.endswith(".gz"):
        body = gzip.compress((FIXTURES / name.removesuffix(".gz")).read_bytes())
    else:
        body = (FIXTURES / name).read_bytes()
    child, thread = await both_ways(
        api, monkeypatch, body, {**ALICE, "Content-Type": ctype}, **params
    )
    assert child.status_code == thread.status_code == 201, (child.text, thread.text)
    ours, theirs = child.json(), thread.json()
    assert {k: ours[k] for k in SAME} == {k: theirs[k] for k in SAME}
    if name.endswith("then-chat.jsonl"):  # the read-back happened: every row is a chat now
        assert ours["format"] == "conversational"
        assert [w["kind"] for w in ours["warnings"]] == ["made_conversational"]
    if params:
        assert ours["skipped_rows"] > 0


async def test_a_refusal_from_a_child_is_the_answer_a_thread_gives(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = jsonl(ROW, {"prompt": "Hi", "chosen": 4}, ROW) + b"{not json\n"
    child, thread = await both_ways(api, monkeypatch, body, NDJSON)
    assert child.status_code == thread.status_code == 422
    assert child.json() == thread.json()
    assert [e["line"] for e in child.json()["errors"]] == [2, 4]
    utf16 = "\n".join(json.dumps(ROW) for _ in range(50)).encode("utf-16")
    child, thread = await both_ways(api, monkeypatch, utf16, NDJSON)
    assert child.status_code == thread.status_code == 415
    assert child.json() == thread.json()
    assert stored_nothing(api.settings)


async def test_a_gzip_bomb_in_a_child_is_413(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(api_settings, max_dataset_bytes=100_000)
    bomb = gzip.compress(jsonl(*[ROW] * 20_000))  # 1.5 MB of rows in ~10 KB
    async with AsyncTestClient(create_app(settings)) as client:
        child, thread = await both_ways(
            Api(client, settings), monkeypatch, bomb, {**ALICE, "Content-Type": "application/gzip"}
        )
    assert child.status_code == thread.status_code == 413
    assert child.json() == thread.json()
    assert stored_nothing(settings)


def test_a_form_s_file_is_validated_in_a_child(
    live_api: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a browser or the openai SDK sends: a multipart form, over real HTTP."""
    children = Children(monkeypatch)
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    form, headers = as_form(jsonl(*[{**ROW, "prompt": f"Q{i}"} for i in range(500)]))
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=form, headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.json()["rows"] == 500 and children.count == 1


def test_a_child_that_dies_fails_the_upload_and_stores_nothing(
    live_api: LiveServer, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    body = jsonl(*[{**ROW, "prompt": f"Q{i}"} for i in range(5000)])
    half = body.index(b"\n", len(body) // 2) + 1
    head = HEAD + b"Content-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", live_api.port), timeout=30) as conn:
        conn.sendall(head + body[:half])
        assert slot_taken(api_settings)
        child = _offload_child()
        child.kill()
        child.wait(10)
        conn.sendall(body[half:])
        answer = conn.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 500"), answer
    assert stored_nothing(api_settings) and slots_freed(api_settings)


def _offload_child(within: float = 20.0) -> psutil.Process:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for proc in psutil.Process().children(recursive=True):
            if _is_offload(proc):
                return proc
        time.sleep(0.02)
    raise AssertionError("no validation child started")


@pytest.mark.parametrize("fails", ["write", "reread"])
async def test_a_store_that_fails_mid_upload_stores_nothing_and_the_child_is_stopped(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """The draft's disk fails while the rows come back from the child, or while they are read
    back for the rewrite: the upload fails as it does in a thread, without waiting on a child
    that can no longer be heard (the body, 16 MB, is more than the pipes and buffers hold),
    and no row of it is kept."""
    from service.blobs import local

    def broken(self: Any, *args: Any) -> Any:
        raise OSError("the disk is gone")

    monkeypatch.setattr(local._FileDraft, fails, broken)
    settings = replace(api_settings, max_dataset_bytes=32_000_000)
    body = TEXT_THEN_CHAT if fails == "reread" else jsonl(*[ROW] * 200_000)
    async with AsyncTestClient(create_app(settings)) as client:
        child, thread = await both_ways(Api(client, settings), monkeypatch, body, NDJSON)
    assert (child.status_code, thread.status_code) == (500, 500), (child.text, thread.text)
    assert stored_nothing(settings)
    assert not [p for p in psutil.Process().children(recursive=True) if _is_offload(p)]


def _is_offload(proc: psutil.Process) -> bool:
    try:
        return any("service.datasets.offload" in part for part in proc.cmdline())
    except psutil.NoSuchProcess:
        return False


async def test_a_child_is_fed_where_pipes_cannot_be_widened(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no F_SETPIPE_SZ: the pipes keep their default size, and the upload works."""
    import fcntl

    monkeypatch.delattr(fcntl, "F_SETPIPE_SZ")
    body = jsonl(*[{**ROW, "prompt": f"Q{i}"} for i in range(5000)])  # several 64 KB pipefuls
    child, thread = await both_ways(api, monkeypatch, body, NDJSON)
    assert child.status_code == thread.status_code == 201, child.text
    assert child.json()["sha256"] == thread.json()["sha256"]
