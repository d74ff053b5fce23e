"""Feedback within what a dataset may hold: a row past a dataset's line limit is refused when
posted (a snapshot could never hold it), and a stream that outgrew a dataset's rows or bytes
gets a 409 naming the limits when snapshot, found while its rows are written out, with
nothing stored."""

from __future__ import annotations

from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.settings import Settings
from tests.fixtures.api import ALICE, Api
from tests.integration.test_feedback import pair, post, rating


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return replace(api_settings, max_dataset_rows=5)


async def test_a_snapshot_past_the_dataset_row_limit_is_a_409(api: Api) -> None:
    assert (await post(api, "big", [pair(i) for i in range(6)])).status_code == 200
    resp = await api.client.post("/v1/feedback/big/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert "at most 5 rows" in resp.json()["detail"]
    assert "FTUNE_MAX_DATASET_ROWS" in resp.json()["detail"]
    stream = (await api.client.get("/v1/feedback/big", headers=ALICE)).json()
    assert stream["snapshots"] == 0
    listed = (await api.client.get("/v1/datasets", headers=ALICE)).json()
    assert listed["items"] == []
    # A stream within the limit snapshots, as version 1.
    assert (await post(api, "small", [pair(i) for i in range(5)])).status_code == 200
    resp = await api.client.post("/v1/feedback/small/snapshot", headers=ALICE)
    assert resp.status_code == 201, resp.text
    assert (resp.json()["version"], resp.json()["dataset"]["rows"]) == (1, 5)


async def test_a_row_past_the_line_limit_is_refused_when_posted(api: Api) -> None:
    line = api.settings.max_line_bytes
    resp = await post(api, "long", [pair(0), pair(1, chosen="x" * line)])
    assert resp.status_code == 422, resp.text
    error = resp.json()["errors"][0]
    assert error["loc"] == ["body", "events", "1"]
    assert f"line limit of {line:,}" in error["msg"]
    assert (await api.client.get("/v1/feedback/long", headers=ALICE)).status_code == 404
    # Two ratings each within the limit, whose pair is not: the second is refused.
    half = "y" * (line // 2)
    first = rating("r1", "Hi?", half + "1", "up")
    assert (await post(api, "rated", [first])).status_code == 200
    resp = await post(api, "rated", [pair(2), rating("r2", "Hi?", half + "2", "down")])
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["loc"] == ["body", "events", "1"]
    assert "the pair it completes" in resp.json()["errors"][0]["msg"]
    stream = (await api.client.get("/v1/feedback/rated", headers=ALICE)).json()
    assert (stream["events"], stream["pairs"]) == (1, 0)


async def test_a_snapshot_past_the_dataset_size_limit_is_a_409(api: Api) -> None:
    limit = api.settings.max_dataset_bytes
    long = "x" * (api.settings.max_line_bytes - 200)
    for i in range(limit // len(long) + 1):  # a batch each: every one fits a request
        assert (await post(api, "wide", [pair(i, chosen=long)])).status_code == 200
    resp = await api.client.post("/v1/feedback/wide/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert f"{limit:,} bytes" in resp.json()["detail"]


async def test_a_row_past_a_lowered_line_limit_is_a_409_when_snapshot(api: Api) -> None:
    """Stored while the operator's limit was higher: the snapshot says which pair."""
    assert (await post(api, "old", [pair(0), pair(1, chosen="z" * 5000)])).status_code == 200
    lowered = replace(api.settings, max_line_bytes=4096)
    async with AsyncTestClient(create_app(lowered)) as client:
        resp = await client.post("/v1/feedback/old/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert "pair 1 of feedback stream old is" in resp.json()["detail"]
