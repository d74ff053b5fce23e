"""Dataset upload over HTTP: good files are stored, every bad one gets a 4xx that says where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.fixtures.api import ADMIN, ALICE, BOB, Api

NDJSON = {"Content-Type": "application/x-ndjson"}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


ROW = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think at length... 5?"}


async def upload(api: Api, body: bytes, headers: dict[str, str] | None = None, **params: str):
    return await api.client.post(
        "/v1/datasets",
        content=body,
        params={"name": "t", **params},
        headers={**ALICE, **NDJSON, **(headers or {})},
    )


def stored_nothing(api: Api) -> bool:
    r = redis.Redis.from_url(api.settings.redis_url)
    keys = [k for k in r.keys("ftune:ds:*")]
    blobs = list(api.store_dir.rglob("*.jsonl")) if api.store_dir.exists() else []
    return not keys and not blobs


async def test_upload_standard_rows_is_stored_under_its_sha256(api: Api) -> None:
    body = jsonl(ROW, {**ROW, "prompt": "And 3+3?", "chosen": "6."})
    resp = await upload(api, body)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["rows"] == 2 and ds["format"] == "standard" and ds["tenant"] == "alice"
    blob = api.store_dir / "datasets" / f"{ds['sha256']}.jsonl"
    assert blob.exists() and blob.stat().st_size == ds["bytes"]
    got = await api.client.get(f"/v1/datasets/{ds['id']}", headers=ALICE)
    assert got.json() == ds


async def test_multipart_upload_and_column_mapping(api: Api) -> None:
    body = jsonl({"question": "Hi?", "support": "Hello.", "oppose": "Go away."})
    resp = await api.client.post(
        "/v1/datasets",
        params={
            "name": "mapped",
            "prompt_field": "question",
            "chosen_field": "support",
            "rejected_field": "oppose",
        },
        files={"file": ("data.jsonl", body, "application/x-ndjson")},
        headers=ALICE,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["source_format"] == "mapped"


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        (jsonl(ROW, ROW) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', 3, "UTF-8"),
        (jsonl(ROW) + b"{not json\n", 2, "JSON"),
        (jsonl(ROW, [1, 2]), 2, "object"),
        (jsonl({"prompt": "p", "chosen": "c"}), 1, "rejected"),
        (jsonl({"prompt": "p", "chosen": 3, "rejected": "r"}), 1, "chosen"),
        (jsonl({"prompt": "p", "chosen": "  ", "rejected": "r"}), 1, "chosen"),
        (jsonl({"prompt": "p", "chosen": "same", "rejected": "same"}), 1, "identical"),
        (
            jsonl(
                {
                    "prompt": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}],
                }
            ),
            1,
            "assistant",
        ),
        (
            jsonl(
                {
                    "prompt": [{"role": "wizard", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}],
                }
            ),
            1,
            "wizard",
        ),
        (jsonl({**ROW, "prompt": "x" * 70_000}), 1, "limit"),
    ],
    ids=[
        "not-utf8",
        "not-json",
        "array",
        "missing",
        "mistyped",
        "empty",
        "equal",
        "assistant-last",
        "unknown-role",
        "line-too-long",
    ],
)
async def test_bad_rows_answer_422_with_line_and_store_nothing(
    api: Api, body: bytes, line: int, needle: str
) -> None:
    resp = await upload(api, body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == 422 and problem["total_errors"] >= 1
    first = problem["errors"][0]
    assert first["line"] == line
    assert needle.lower() in (first["msg"] + str(first.get("field"))).lower(), first
    assert stored_nothing(api)


async def test_empty_file_is_422(api: Api) -> None:
    resp = await upload(api, b"")
    assert resp.status_code == 422
    assert "no rows" in resp.json()["detail"] + json.dumps(resp.json()["errors"])
    assert stored_nothing(api)


async def test_errors_are_capped_at_100_with_total(api: Api) -> None:
    resp = await upload(api, b"nope\n" * 150)
    problem = resp.json()
    assert resp.status_code == 422
    assert len(problem["errors"]) == 100 and problem["total_errors"] == 150
    assert [e["line"] for e in problem["errors"][:3]] == [1, 2, 3]


async def test_file_over_limit_is_413_and_wrong_type_is_415(api: Api) -> None:
    big = jsonl(*[{**ROW, "prompt": f"{i} " + "x" * 1000} for i in range(1200)])
    resp = await upload(api, big)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]
    resp = await upload(api, jsonl(ROW), headers={"Content-Type": "application/xml"})
    assert resp.status_code == 415 and "application/x-ndjson" in resp.json()["detail"]
    assert stored_nothing(api)


async def test_tenants_do_not_see_each_other(api: Api) -> None:
    ds = (await upload(api, jsonl(ROW))).json()
    assert (await api.client.get(f"/v1/datasets/{ds['id']}", headers=BOB)).status_code == 404
    assert (await api.client.get("/v1/datasets", headers=BOB)).json()["items"] == []
    assert (await api.client.get(f"/v1/datasets/{ds['id']}", headers=ADMIN)).status_code == 200
    assert (await api.client.delete(f"/v1/datasets/{ds['id']}", headers=BOB)).status_code == 404


async def test_auth_is_required(api: Api) -> None:
    resp = await api.client.get("/v1/datasets")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    resp = await api.client.get("/v1/datasets", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401 and "nope" not in resp.text


async def test_list_pages_newest_first_and_delete_frees_the_blob(api: Api) -> None:
    ids = []
    for i in range(5):
        resp = await upload(api, jsonl({**ROW, "prompt": f"q{i}"}))
        ids.append(resp.json()["id"])
    page1 = (await api.client.get("/v1/datasets", params={"limit": 3}, headers=ALICE)).json()
    page2 = (
        await api.client.get(
            "/v1/datasets", params={"limit": 3, "cursor": page1["next_cursor"]}, headers=ALICE
        )
    ).json()
    assert [d["id"] for d in page1["items"] + page2["items"]] == ids[::-1]
    assert page2["next_cursor"] is None
    first = page1["items"][0]
    assert (
        await api.client.delete(f"/v1/datasets/{first['id']}", headers=ALICE)
    ).status_code == 204
    assert not (Path(api.store_dir) / "datasets" / f"{first['sha256']}.jsonl").exists()
    assert (await api.client.get(f"/v1/datasets/{first['id']}", headers=ALICE)).status_code == 404
