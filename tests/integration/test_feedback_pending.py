"""Ratings waiting for an opposite rating stay bounded per prompt, and a batch touches only
what it changes, however many wait (real Redis, through the API)."""

from __future__ import annotations

from typing import Any

import msgspec
import redis

from service.retraining.events import Pending, Waiting, prompt_key
from service.retraining.feedback import MAX_WAITING
from tests.fixtures.api import ALICE, Api
from tests.integration.test_feedback import post, rating

PROMPT = "Is this answer any good?"


def ups(start: int, count: int) -> list[dict[str, Any]]:
    return [
        rating(f"u{i}", PROMPT, f"Answer number {i}.", "up") for i in range(start, start + count)
    ]


def waiting_key(way: str) -> str:
    return f"ftune:fb:alice:chat:pending:{prompt_key(PROMPT)}:{way}"


async def test_one_prompt_rated_up_thousands_of_times_stays_bounded(api: Api) -> None:
    r = redis.Redis.from_url(api.settings.redis_url)
    dropped = []
    for start in range(0, 2500, 500):
        resp = await post(api, "chat", ups(start, 500))
        assert resp.status_code == 200
        dropped.append(resp.json()["ratings_dropped"])
    assert dropped == [0, 0, 500, 500, 500]  # each batch says what it pushed out
    stream = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    assert stream["pending_ratings"] == MAX_WAITING and stream["dropped_ratings"] == 1500
    assert r.llen(waiting_key("up")) == MAX_WAITING
    assert r.hlen("ftune:fb:alice:chat:pending") == 0  # no one value per prompt any more
    # The oldest kept (u1500) pairs with the next down; a batch writes what it changed only.
    r.config_resetstat()
    resp = await post(api, "chat", [rating("d1", PROMPT, "A bad answer.", "down")])
    assert resp.json()["pairs_added"] == 1
    pairs = (await api.client.get("/v1/feedback/chat/pairs", headers=ALICE)).json()
    assert pairs["items"][0]["events"] == ["u1500", "d1"]
    stats = r.info("commandstats")
    assert "cmdstat_hset" not in stats and "cmdstat_set" in stats  # the meta only
    written = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("rpush", "lrem"))
    # One LREM of the paired rating, one RPUSH of the pair and one of the rating as an unpaired
    # row (every rating is kept for kto): three, however many ratings wait.
    assert written <= 3 and r.llen(waiting_key("up")) == MAX_WAITING - 1


async def test_queues_in_the_former_layout_are_moved_when_their_prompt_is_rated(
    api: Api,
) -> None:
    await post(api, "chat", [rating("first", "Other prompt?", "Yes.", "up")])  # the stream
    legacy = Pending(
        prompt=PROMPT,
        up=[Waiting(id=f"old{i}", response=f"Old answer {i}.") for i in range(3)],
    )
    r = redis.Redis.from_url(api.settings.redis_url)
    r.hset("ftune:fb:alice:chat:pending", prompt_key(PROMPT), msgspec.json.encode(legacy))
    resp = await post(api, "chat", [rating("d1", PROMPT, "A bad answer.", "down")])
    assert resp.json()["pairs_added"] == 1
    pairs = (await api.client.get("/v1/feedback/chat/pairs", headers=ALICE)).json()
    assert pairs["items"][-1]["events"] == ["old0", "d1"]
    assert r.hget("ftune:fb:alice:chat:pending", prompt_key(PROMPT)) is None
    assert [msgspec.json.decode(w)[0] for w in r.lrange(waiting_key("up"), 0, -1)] == [
        "old1",
        "old2",
    ]


async def test_deleting_a_stream_removes_its_waiting_ratings(api: Api) -> None:
    r = redis.Redis.from_url(api.settings.redis_url)
    await post(api, "chat", [*ups(0, 3), rating("o1", "Other prompt?", "Yes.", "down")])
    await post(api, "other", ups(0, 1))  # another stream's keys stay
    assert r.llen(waiting_key("up")) == 3
    gone = await api.client.delete("/v1/feedback/chat", headers=ALICE)
    assert gone.status_code == 204, gone.text
    assert r.keys("ftune:fb:alice:chat:*") == []
    assert r.keys("ftune:fb:alice:other:*") != []
