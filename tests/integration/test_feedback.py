"""Feedback streams over HTTP against real Redis: events in, pairs stored, snapshots out."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
import redis
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.retraining import feedback
from tests.fixtures.api import ALICE, BOB, Api


def pair(i: int, **over: Any) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "prompt": f"Question {i}?",
        "chosen": f"A kind answer {i}.",
        "rejected": f"A rude answer {i}.",
        **over,
    }


def rating(event_id: str, prompt: str, response: Any, value: str) -> dict[str, Any]:
    return {"id": event_id, "prompt": prompt, "response": response, "rating": value}


async def post(api: Api, stream: str, events: list[Any], headers: dict[str, str] = ALICE) -> Any:
    return await api.client.post(f"/v1/feedback/{stream}", json={"events": events}, headers=headers)


async def test_every_kind_of_event_becomes_pairs_and_retries_are_ignored(api: Api) -> None:
    batch = [
        pair(1),
        {"id": "e1", "prompt": "Fix this?", "response": "teh answer", "edited": "the answer"},
        rating("r1", "How are you?", "Great, thanks!", "up"),
        rating("r2", "Where is it?", "Over there.", "down"),
    ]
    first = await post(api, "chat", batch)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "stream": "chat",
        "received": 4,
        "accepted": 4,
        "duplicates": 0,
        "pairs_added": 2,
        "ratings_waiting": 2,
        "pairs_total": 2,
        "ratings_dropped": 0,
    }
    retry = (await post(api, "chat", batch)).json()
    assert (retry["accepted"], retry["duplicates"], retry["pairs_added"]) == (0, 4, 0)

    second = await post(
        api,
        "chat",
        [
            rating("r3", "How are you?", "Go away.", "down"),  # pairs with r1
            rating("r4", "Where is it?", "Over there.", "up"),  # same response as r2: waits
            pair(2),
            pair(2, prompt="A changed retry"),  # the same id again in one batch: ignored
        ],
    )
    assert second.json()["pairs_added"] == 2 and second.json()["duplicates"] == 1

    stream = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    assert (stream["events"], stream["pairs"], stream["pending_ratings"]) == (7, 4, 2)
    assert stream["duplicates"] == 5 and stream["format"] == "standard"

    pairs = (await api.client.get("/v1/feedback/chat/pairs", headers=ALICE)).json()
    assert pairs["total"] == 4
    assert [(p["kind"], p["events"]) for p in pairs["items"]] == [
        ("pair", ["p1"]),
        ("edit", ["e1"]),
        ("rating", ["r1", "r3"]),
        ("pair", ["p2"]),
    ]
    rows = [p["row"] for p in pairs["items"]]
    assert rows[1] == {"prompt": "Fix this?", "chosen": "the answer", "rejected": "teh answer"}
    assert rows[2] == {"prompt": "How are you?", "chosen": "Great, thanks!", "rejected": "Go away."}
    assert rows[3]["prompt"] == "Question 2?"
    page = (await api.client.get("/v1/feedback/chat/pairs?offset=3&limit=5", headers=ALICE)).json()
    assert [p["events"] for p in page["items"]] == [["p2"]]


async def test_a_batch_with_bad_events_stores_nothing_and_says_which(api: Api) -> None:
    good = [pair(1), rating("r1", "Hi?", "Hello!", "up")]
    bad = [
        good[0],
        pair(2, rejected=pair(2)["chosen"]),  # chosen == rejected
        {"id": "x3", "prompt": "Hi?", "response": "Hello!", "rating": "meh"},
        good[1],
        {"id": "x5", "prompt": "Hi?", "response": "Same.", "edited": "Same."},
        {"prompt": "Hi?", "chosen": "a", "rejected": "b"},  # no id
        {"id": "x7", "prompt": "Hi?", "chosen": "   ", "rejected": "b"},
        {"id": "x8", "prompt": "Hi?", "text": "what kind is this?"},
    ]
    resp = await post(api, "chat", bad)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert [e["loc"] for e in problem["errors"]] == [
        ["body", "events", "1", "rejected"],
        ["body", "events", "2", "rating"],
        ["body", "events", "4", "response"],
        ["body", "events", "5", "id"],
        ["body", "events", "6", "chosen"],
        ["body", "events", "7"],
    ]
    assert "identical" in problem["errors"][0]["msg"]
    assert "6 invalid events" in problem["detail"] and "nothing was stored" in problem["detail"]

    # Nothing of the batch was kept: no stream, and its good events' ids are still free.
    assert (await api.client.get("/v1/feedback/chat", headers=ALICE)).status_code == 404
    resp = await post(api, "chat", good)
    assert resp.json()["accepted"] == 2 and resp.json()["pairs_added"] == 1


async def test_an_invalid_batch_leaves_an_existing_stream_as_it_was(api: Api) -> None:
    await post(api, "chat", [pair(1), rating("r1", "Hi?", "Hello!", "up")])
    before = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    resp = await post(api, "chat", [rating("r2", "Hi?", "Bye.", "down"), pair(3, prompt="")])
    assert resp.status_code == 422
    assert [e["loc"] for e in resp.json()["errors"]] == [["body", "events", "1", "prompt"]]
    assert (await api.client.get("/v1/feedback/chat", headers=ALICE)).json() == before
    pairs = (await api.client.get("/v1/feedback/chat/pairs", headers=ALICE)).json()
    assert pairs["total"] == 1  # r2 did not pair with r1


async def test_conversational_events_and_one_format_per_stream(api: Api) -> None:
    user = [{"role": "user", "content": "Hi?"}]
    events = [
        {
            "id": "c1",
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "What?"}],
        },
        rating("c2", user, [{"role": "assistant", "content": "Hey."}], "up"),
        rating("c3", user, [{"role": "assistant", "content": "Leave."}], "down"),
        {
            "id": "c4",
            "prompt": user,
            "response": [{"role": "user", "content": "wrong role"}],
            "edited": [{"role": "assistant", "content": "Hello."}],
        },
    ]
    resp = await post(api, "conv", events)
    assert resp.status_code == 422
    assert [e["loc"] for e in resp.json()["errors"]] == [
        ["body", "events", "3", "response", "0", "role"]
    ]
    resp = await post(api, "conv", events[:3])
    assert resp.json()["pairs_added"] == 2
    assert (await api.client.get("/v1/feedback/conv", headers=ALICE)).json()["format"] == (
        "conversational"
    )
    # A text event joins a stream of conversations as the one-turn chat it stands for ...
    resp = await post(api, "conv", [pair(9)])
    assert resp.status_code == 200, resp.text
    snap = await api.client.post("/v1/feedback/conv/snapshot", headers=ALICE)
    rows = await api.client.get(f"/v1/datasets/{snap.json()['dataset']['id']}/rows", headers=ALICE)
    assert rows.json()["rows"][-1]["prompt"] == [{"role": "user", "content": pair(9)["prompt"]}]
    # ... but a conversation cannot join a stream of texts: it says how to go on.
    assert (await post(api, "texts", [pair(1)])).status_code == 200
    resp = await post(api, "texts", [{**pair(2), "system": "Be brief."}])
    assert resp.status_code == 422
    assert "the stream holds texts" in resp.json()["errors"][0]["msg"]


async def test_a_first_batch_with_one_system_prompt_makes_a_stream_of_conversations(
    api: Api,
) -> None:
    """A product that sets a system prompt only sometimes: its first batch decides, whatever
    the order of its events; and a system given twice, differently, is refused, not lost."""
    events = [pair(1), {**pair(2), "system": "Answer in French."}, rating("r", "Hi?", "Yo.", "up")]
    resp = await post(api, "mixed", events)
    assert resp.status_code == 200, resp.text
    stream = (await api.client.get("/v1/feedback/mixed", headers=ALICE)).json()
    assert stream["format"] == "conversational"
    own = [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": "Hi?"}]
    twice = {
        "id": "t",
        "prompt": own,
        "chosen": [{"role": "assistant", "content": "Hello there, friend."}],
        "rejected": [{"role": "assistant", "content": "Hi."}],
        "system": "Be brief.",
    }
    resp = await post(api, "mixed", [twice])
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["loc"] == ["body", "events", "0", "system"]
    assert "give the system prompt once" in resp.json()["errors"][0]["msg"]
    same = {**twice, "system": "Be verbose."}  # the same words in both places: one system
    assert (await post(api, "mixed", [same])).status_code == 200
    other = {k: v for k, v in twice.items() if k != "system"} | {"id": "t2", "system_prompt": "X"}
    resp = await post(api, "mixed", [other])  # under any of the names a system column has
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["loc"] == ["body", "events", "0", "system_prompt"]


async def test_streams_belong_to_their_tenant(api: Api) -> None:
    await post(api, "shared-name", [pair(1), pair(2)])
    assert (await api.client.get("/v1/feedback/shared-name", headers=BOB)).status_code == 404
    assert (await api.client.get("/v1/feedback/shared-name/pairs", headers=BOB)).status_code == 404
    snap = await api.client.post("/v1/feedback/shared-name/snapshot", headers=BOB)
    assert snap.status_code == 404
    # The same name is Bob's own, separate stream.
    resp = await post(api, "shared-name", [pair(1)], headers=BOB)
    assert resp.json() == {**resp.json(), "accepted": 1, "pairs_total": 1}
    assert (await api.client.get("/v1/feedback/shared-name", headers=ALICE)).json()["pairs"] == 2
    listed = (await api.client.get("/v1/feedback", headers=BOB)).json()
    assert [(s["name"], s["tenant"], s["pairs"]) for s in listed["items"]] == [
        ("shared-name", "bob", 1)
    ]
    assert (await api.client.get("/v1/feedback/shared-name")).status_code == 401


@pytest.mark.parametrize("name", ["has:colon", "a" * 64, "-leading", "sp ace"])
async def test_stream_names_are_checked(api: Api, name: str) -> None:
    resp = await post(api, name, [pair(1)])
    assert resp.status_code in (400, 404), resp.text
    assert (await api.client.get("/v1/feedback", headers=ALICE)).json()["items"] == []


async def test_batch_shape_is_checked(api: Api) -> None:
    assert (await post(api, "chat", [])).status_code == 422
    assert (await post(api, "chat", [pair(i) for i in range(1001)])).status_code == 422
    resp = await post(api, "chat", [pair(1), "not an object"])
    assert resp.status_code == 422
    # Litestar's own check of the body's shape; its loc reads ["body", "events[1]"].
    assert "".join(resp.json()["errors"][0]["loc"]).startswith("bodyevents")
    assert "1" in "".join(resp.json()["errors"][0]["loc"])


async def test_concurrent_batches_store_each_event_once(api: Api) -> None:
    batches = [[pair(i) for i in range(start, start + 10)] for start in range(0, 40, 5)]
    results = await asyncio.gather(*(post(api, "busy", b) for b in batches))
    assert all(r.status_code == 200 for r in results)
    assert sum(r.json()["accepted"] for r in results) == 45
    stream = (await api.client.get("/v1/feedback/busy", headers=ALICE)).json()
    assert stream["pairs"] == stream["events"] == 45
    pairs = (await api.client.get("/v1/feedback/busy/pairs?limit=1000", headers=ALICE)).json()
    assert sorted(p["events"][0] for p in pairs["items"]) == sorted(f"p{i}" for i in range(45))


async def test_snapshot_freezes_the_pairs_into_a_versioned_dataset(api: Api) -> None:
    await post(api, "chat", [pair(1), pair(2), rating("r1", "Hi?", "Hello!", "up")])
    resp = await api.client.post("/v1/feedback/chat/snapshot", headers=ALICE)
    assert resp.status_code == 201, resp.text
    v1 = resp.json()
    assert (v1["version"], v1["selection"], v1["pairs_end"], v1["by"]) == (1, "all", 2, "api")
    assert v1["dataset"]["rows"] == 2 and v1["dataset"]["format"] == "standard"

    # A normal dataset, holding exactly the canonical rows, addressed by their sha256 ...
    ds = (await api.client.get(f"/v1/datasets/{v1['dataset']['id']}", headers=ALICE)).json()
    assert ds["name"] == "chat v1" and ds["rows"] == 2
    blob = (api.store_dir / "datasets" / f"{ds['sha256']}.jsonl").read_bytes()
    rows = [{k: pair(i)[k] for k in ("prompt", "chosen", "rejected")} for i in (1, 2)]
    assert [json.loads(line) for line in blob.splitlines()] == rows
    assert hashlib.sha256(blob).hexdigest() == ds["sha256"]
    # ... the same address an upload of the same rows gets,
    upload = await api.client.post(
        "/v1/datasets",
        content="".join(json.dumps(r) + "\n" for r in rows),
        headers={**ALICE, "Content-Type": "application/x-ndjson"},
    )
    assert upload.json()["sha256"] == ds["sha256"]
    # ... and a job can train on it.
    job = await api.client.post(
        "/v1/jobs", json={"base_model": "org/model", "dataset_id": ds["id"]}, headers=ALICE
    )
    assert job.status_code == 201, job.text

    await post(api, "chat", [rating("r2", "Hi?", "Go away.", "down"), pair(3)])
    v2 = (await api.client.post("/v1/feedback/chat/snapshot", headers=ALICE)).json()
    assert (v2["version"], v2["pairs_end"], v2["dataset"]["rows"]) == (2, 4, 4)
    assert v2["dataset"]["sha256"] != v1["dataset"]["sha256"]
    stream = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    assert stream["snapshots"] == 2
    assert [s["version"] for s in stream["recent_snapshots"]] == [2, 1]


async def test_a_streams_snapshot_records_are_bounded(
    api: Api, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client looping snapshot-and-delete must not grow Redis outside every quota: the
    stream keeps its newest records, and still counts them all."""
    monkeypatch.setattr(feedback, "KEPT_SNAPSHOTS", 3)
    for i in range(5):
        await post(api, "loop", [pair(i)])
        resp = await api.client.post("/v1/feedback/loop/snapshot", headers=ALICE)
        assert resp.status_code == 201, resp.text
    stream = (await api.client.get("/v1/feedback/loop", headers=ALICE)).json()
    assert stream["snapshots"] == 5
    assert [s["version"] for s in stream["recent_snapshots"]] == [5, 4, 3]
    assert redis.Redis.from_url(redis_url).llen("ftune:fb:alice:loop:snapshots") == 3


async def test_snapshot_needs_pairs(api: Api) -> None:
    resp = await api.client.post("/v1/feedback/nothing/snapshot", headers=ALICE)
    assert resp.status_code == 404
    await post(api, "lonely", [rating("r1", "Hi?", "Hello!", "up")])
    resp = await api.client.post("/v1/feedback/lonely/snapshot", headers=ALICE)
    assert resp.status_code == 409
    assert "1 ratings wait" in resp.json()["detail"]


async def test_a_tenants_feedback_has_a_byte_budget_in_redis(api: Api, redis_url: str) -> None:
    """Streams live in the shared Redis, which evicts nothing: what a tenant's take (ids and
    waiting ratings too, not only the rows) counts against its feedback_bytes, refused whole
    past it (429) and freed when a stream is deleted; other tenants are not touched."""
    long_id = "e" * 190  # a client's UUID-ish ids with a prefix: most of what Redis holds
    ratings = [rating(f"{long_id}{i}", f"prompt {i}?", "ok", "up") for i in range(200)]
    assert (await post(api, "thumbs", ratings)).status_code == 200
    stream = (await api.client.get("/v1/feedback/thumbs", headers=ALICE)).json()
    rows = stream["rating_bytes"]
    # The estimate follows what Redis itself says the stream's keys take, ids and all.
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match="ftune:fb:alice:thumbs:*", count=1000))
    used = sum(r.memory_usage(k) or 0 for k in keys)
    assert rows * 3 < used and used / 2 < stream["stored_bytes"] < used * 2, (rows, used, stream)

    capped = replace(api.settings, max_feedback_bytes=stream["stored_bytes"] + 10_000)
    async with AsyncTestClient(create_app(capped)) as client:
        more = [rating(f"{long_id}x{i}", f"prompt {i}?", "fine", "up") for i in range(200)]
        resp = await client.post("/v1/feedback/more", json={"events": more}, headers=ALICE)
        assert resp.status_code == 429, resp.text
        assert "(feedback_bytes)" in resp.json()["detail"]
        assert (await client.get("/v1/feedback/more", headers=ALICE)).status_code == 404
        usage = (await client.get("/v1/usage", headers=ALICE)).json()
        (budget,) = [u for u in usage["limits"] if u["name"] == "feedback_bytes"]
        assert budget == {
            "name": "feedback_bytes",
            "used": stream["stored_bytes"],
            "limit": capped.max_feedback_bytes,
        }
        # Another tenant has a budget of its own.
        resp = await client.post("/v1/feedback/more", json={"events": more}, headers=BOB)
        assert resp.status_code == 200, resp.text
        # Deleting a stream gives its bytes back.
        assert (await client.delete("/v1/feedback/thumbs", headers=ALICE)).status_code == 204
        resp = await client.post("/v1/feedback/more", json={"events": more}, headers=ALICE)
        assert resp.status_code == 200, resp.text
        # A count left too high (a stream rewritten by the release before, which drops its
        # stored_bytes) is set right from the streams' own figures once it refuses a batch.
        r.set("ftune:fb-bytes:alice", capped.max_feedback_bytes)
        resp = await client.post("/v1/feedback/more", json={"events": ratings[:5]}, headers=ALICE)
        assert resp.status_code == 200, resp.text
        stream = (await client.get("/v1/feedback/more", headers=ALICE)).json()
        assert int(r.get("ftune:fb-bytes:alice") or 0) == stream["stored_bytes"]
