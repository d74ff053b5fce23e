"""The scheduler role runs in the API: with no worker process at all, policies fire on their
count and on their schedule, lost jobs are re-queued, and one API replica leads at a time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.contract import JobStatus
from service.retraining import policies
from service.scheduler import LEADER_KEY
from service.settings import Settings
from service.store import Store
from tests.fixtures.api import ALICE, Api
from tests.integration.test_policies import events, feed, get, policy_body, put
from tests.integration.test_worker_recovery import put_running, running_job


@pytest.fixture
def scheduled(api_settings: Settings) -> Settings:
    return replace(
        api_settings, scheduler_enabled=True, scheduler_interval_seconds=0.2, lease_seconds=2.0
    )


@pytest.fixture
async def api_alone(scheduled: Settings) -> AsyncIterator[Api]:
    """The API with its scheduler, and no worker anywhere."""
    async with AsyncTestClient(create_app(scheduled)) as client:
        yield Api(client, scheduled)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s; last: {result!r}")
        await asyncio.sleep(0.1)


async def queued_ids(api: Api) -> list[str]:
    store = Store.from_url(api.settings.redis_url)
    try:
        raw = await store.redis.zrange(api.settings.queue_name, 0, -1)
        return [r.decode() for r in raw]
    finally:
        await store.close()


async def test_a_policy_fires_on_its_count_with_no_worker(api_alone: Api) -> None:
    assert (await put(api_alone, "p", policy_body())).status_code == 200
    await feed(api_alone, "chat", events(0, 9))
    await asyncio.sleep(1.0)  # five passes: 9 of 10 pairs is not enough
    assert (await get(api_alone, "p"))["runs"] == []
    await feed(api_alone, "chat", events(9, 12))

    async def fired() -> dict[str, Any] | None:
        p = await get(api_alone, "p")
        return p if p["runs"] and p["runs"][0]["status"] == "queued" else None

    run = (await eventually(fired, timeout=5))["runs"][0]
    assert run["new_pairs"] == 12
    assert await queued_ids(api_alone) == [f"{run['job_id']}:0"]
    job = await api_alone.client.get(f"/v1/jobs/{run['job_id']}", headers=ALICE)
    assert job.json()["status"] == "queued"


async def test_a_cron_policy_fires_on_schedule_with_no_worker(api_alone: Api) -> None:
    # Once a year: no scheduled time can come by itself while the test runs.
    body = policy_body(trigger={"cron": "0 0 1 1 *"})
    assert (await put(api_alone, "nightly", body)).status_code == 200
    await feed(api_alone, "chat", events(0, 10))

    async def waiting() -> dict[str, Any] | None:
        status = (await get(api_alone, "nightly"))["status"]
        return (
            status if "waiting for the schedule" in ((status or {}).get("message") or "") else None
        )

    status = await eventually(waiting)
    assert status["next_cron_at"] > time.time()

    # Let a scheduled time come without waiting for it: the policy's schedule starts from
    # when it was made, so make it a year and a day older (one period of the schedule).
    store = Store.from_url(api_alone.settings.redis_url)
    try:
        await policies.update_policy(
            store,
            "alice",
            "nightly",
            lambda p: msgspec.structs.replace(p, cron_after=p.cron_after - 366 * 86400),
        )
    finally:
        await store.close()

    async def fired() -> dict[str, Any] | None:
        p = await get(api_alone, "nightly")
        return p if p["runs"] and p["runs"][0]["status"] == "queued" else None

    run = (await eventually(fired, timeout=5))["runs"][0]
    assert "scheduled" in run["reason"]
    assert await queued_ids(api_alone) == [f"{run['job_id']}:0"]


async def test_a_lost_job_is_requeued_with_no_worker(api_alone: Api) -> None:
    store = Store.from_url(api_alone.settings.redis_url)
    try:
        job = running_job()
        await put_running(store, job)
        await store.renew_lease(job.id, "a-worker-that-was-killed", 1.0)

        async def requeued() -> Any:
            current = await store.get_job(job.id, None)
            return current if current.status == JobStatus.queued else None

        after = await eventually(requeued, timeout=8)
        assert after.attempt == 1
        # Written with the record: a job seen queued has its dispatch token already.
        assert f"{job.id}:1" in await queued_ids(api_alone)
    finally:
        await store.close()


async def test_one_replica_leads_and_another_takes_over(scheduled: Settings) -> None:
    store = Store.from_url(scheduled.redis_url)
    try:
        first = AsyncTestClient(create_app(scheduled))
        await first.__aenter__()
        try:
            holder = await eventually(lambda: store.redis.get(LEADER_KEY), timeout=5)
            async with AsyncTestClient(create_app(scheduled)):
                await asyncio.sleep(1.0)
                assert await store.redis.get(LEADER_KEY) == holder  # the second one waits
                await first.__aexit__(None, None, None)  # the leader stops
                taken = await eventually(lambda: _other_holder(store, holder), timeout=5)
                assert taken != holder
        finally:
            await first.__aexit__(None, None, None)
    finally:
        await store.close()


async def test_a_dead_leaders_lock_lapses_and_the_api_takes_over(scheduled: Settings) -> None:
    """A leader killed outright never releases its lock: it lapses, then another leads. The
    lock outlives the app's start, the policy and the feedback with room to spare (on a busy
    CI machine those took more than the 1.5 s it once had)."""
    store = Store.from_url(scheduled.redis_url)
    try:
        await store.redis.set(LEADER_KEY, b"dead-process", px=4000)
        async with AsyncTestClient(create_app(scheduled)) as client:
            api = Api(client, scheduled)
            assert (await put(api, "p", policy_body())).status_code == 200
            await feed(api, "chat", events(0, 12))
            await asyncio.sleep(0.8)
            runs = (await get(api, "p"))["runs"]
            assert await store.redis.get(LEADER_KEY) == b"dead-process", "too slow to tell"
            assert runs == []  # nobody led yet when they were read
            await eventually(lambda: _other_holder(store, b"dead-process"), timeout=10)

            async def fired() -> bool:
                return bool((await get(api, "p"))["runs"])

            await eventually(fired, timeout=10)
    finally:
        await store.close()


async def _other_holder(store: Store, holder: bytes) -> bytes | None:
    current = await store.redis.get(LEADER_KEY)
    return current if current not in (None, holder) else None


async def test_ftune_scheduler_runs_the_role_alone(api: Api, tmp_path: Path) -> None:
    """An API with FTUNE_SCHEDULER_ENABLED=false and `ftune scheduler` beside it."""
    s = api.settings
    env = {
        **os.environ,
        "FTUNE_REDIS_URL": s.redis_url,
        "FTUNE_STORE_URL": s.store_url,
        "FTUNE_SCHEDULER_INTERVAL_SECONDS": "0.2",
        "FTUNE_LOG_FORMAT": "text",
    }
    log = (tmp_path / "scheduler.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "scheduler"], env=env, stdout=log, stderr=log
    )
    store = Store.from_url(s.redis_url)
    try:
        assert (await put(api, "p", policy_body())).status_code == 200
        await feed(api, "chat", events(0, 12))

        async def fired() -> bool:
            return bool((await get(api, "p"))["runs"])

        await eventually(fired, timeout=15)
        assert await store.redis.get(LEADER_KEY) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert await store.redis.get(LEADER_KEY) is None  # released on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
        await store.close()
