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


async def test_a_stream_holds_at_most_a_datasets_rows(api: Api) -> None:
    """Past them a batch is refused whole (the stream would outgrow every snapshot, in Redis
    for ever); a limit lowered later makes the snapshot a 409 naming it, storing nothing."""
    assert (await post(api, "big", [pair(i) for i in range(4)])).status_code == 200
    resp = await post(api, "big", [pair(4), pair(5)])
    assert resp.status_code == 409, resp.text
    assert "would hold 6 pairs" in resp.json()["detail"]
    assert "FTUNE_MAX_DATASET_ROWS" in resp.json()["detail"]
    waiting = [rating(f"r{i}", f"prompt {i}?", "an answer", "up") for i in range(6)]
    resp = await post(api, "waits", waiting)  # each a row for kto, waiting for a pair
    assert resp.status_code == 409 and "would hold 6 ratings" in resp.json()["detail"]
    assert (await post(api, "big", [pair(4)])).status_code == 200
    stream = (await api.client.get("/v1/feedback/big", headers=ALICE)).json()
    assert (stream["pairs"], stream["snapshots"]) == (5, 0)

    lowered = replace(api.settings, max_dataset_rows=4)
    async with AsyncTestClient(create_app(lowered)) as client:
        resp = await client.post("/v1/feedback/big/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert "at most 4 rows" in resp.json()["detail"]
    listed = (await api.client.get("/v1/datasets", headers=ALICE)).json()
    assert listed["items"] == []
    # Within the limit it snapshots, as version 1.
    resp = await api.client.post("/v1/feedback/big/snapshot", headers=ALICE)
    assert resp.status_code == 201, resp.text
    assert (resp.json()["version"], resp.json()["dataset"]["rows"]) == (1, 5)


async def test_a_snapshot_asked_for_counts_against_the_tenants_datasets(api: Api) -> None:
    assert (await post(api, "s", [pair(i) for i in range(3)])).status_code == 200
    capped = replace(api.settings, max_datasets=1)
    async with AsyncTestClient(create_app(capped)) as client:
        assert (await client.post("/v1/feedback/s/snapshot", headers=ALICE)).status_code == 201
        resp = await client.post("/v1/feedback/s/snapshot", headers=ALICE)
        assert resp.status_code == 429, resp.text
        assert "datasets" in resp.json()["detail"]
    listed = (await api.client.get("/v1/datasets", headers=ALICE)).json()
    assert len(listed["items"]) == 1


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


async def test_a_stream_holds_at_most_a_datasets_bytes(api: Api) -> None:
    """Past them a batch is refused (every snapshot would be a 409, and every policy run
    not_started); a limit lowered later makes the snapshot the 409."""
    limit = api.settings.max_dataset_bytes
    long = "x" * (api.settings.max_line_bytes - 200)
    rows = limit // len(long) + 1
    roomy = replace(api.settings, max_dataset_rows=rows)
    async with AsyncTestClient(create_app(roomy)) as client:
        for i in range(rows):  # a batch each: every one fits a request
            resp = await client.post(
                "/v1/feedback/wide", json={"events": [pair(i, chosen=long)]}, headers=ALICE
            )
            assert resp.status_code == (200 if i < rows - 1 else 409), resp.text
        assert f"{limit:,} bytes, the operator's FTUNE_MAX_DATASET_BYTES" in resp.text
        stream = (await client.get("/v1/feedback/wide", headers=ALICE)).json()
        assert stream["pairs"] == rows - 1 and 0 < stream["pair_bytes"] <= limit
    lowered = replace(api.settings, max_dataset_bytes=stream["pair_bytes"] - 1)
    async with AsyncTestClient(create_app(lowered)) as client:
        resp = await client.post("/v1/feedback/wide/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert f"{stream['pair_bytes'] - 1:,} bytes" in resp.json()["detail"]


async def test_a_row_past_a_lowered_line_limit_is_a_409_when_snapshot(api: Api) -> None:
    """Stored while the operator's limit was higher: the snapshot says which pair."""
    assert (await post(api, "old", [pair(0), pair(1, chosen="z" * 5000)])).status_code == 200
    lowered = replace(api.settings, max_line_bytes=4096)
    async with AsyncTestClient(create_app(lowered)) as client:
        resp = await client.post("/v1/feedback/old/snapshot", headers=ALICE)
    assert resp.status_code == 409, resp.text
    assert "pair 1 of feedback stream old is" in resp.json()["detail"]
