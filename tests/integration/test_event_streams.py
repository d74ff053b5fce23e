"""Event streams cannot take the service down: one tenant's many streams share a bounded
number of Redis connections and are capped, and Redis trouble is a 503, never a 500."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from service.api import events
from service.contract import JobStatus
from service.dev.localredis import LocalRedis
from service.settings import Settings
from service.store import Store
from tests.fixtures.api import ADMIN, ALICE, BOB, ApiProcess, LiveServer

ROWS = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
NDJSON = {"Content-Type": "application/x-ndjson"}
MAXCLIENTS = 40
STREAMS, CAP = 200, 150


@pytest.fixture
def small_redis() -> Iterator[LocalRedis]:
    """A Redis that accepts only MAXCLIENTS connections (issue 13 saw 160 streams exhaust 150)."""
    server = LocalRedis(args=["--maxclients", str(MAXCLIENTS)]).start()
    yield server
    server.stop()


async def open_stream(
    http: httpx.AsyncClient,
    job_id: str,
    streams: list[httpx.Response],
    refused: list[httpx.Response],
) -> None:
    request = http.build_request("GET", f"/v1/jobs/{job_id}/events", headers=ALICE)
    resp = await http.send(request, stream=True)
    if resp.status_code != 200:
        await resp.aread()
        refused.append(resp)
        return
    streams.append(resp)


async def first_event_and_end(resp: httpx.Response) -> list[str]:
    """The `event:` lines of a stream, until the server ends it."""
    kinds = []
    async for line in resp.aiter_lines():
        if line.startswith("event:"):
            kinds.append(line.split(":", 1)[1].strip())
    return kinds


async def test_many_streams_of_one_tenant_leave_others_served(
    small_redis: LocalRedis, api_settings: Settings
) -> None:
    settings = replace(
        api_settings,
        redis_url=small_redis.url,
        max_event_streams=CAP,
        redis_max_connections=10,
    )
    with LiveServer(settings) as api:
        limits = httpx.Limits(max_connections=STREAMS + 20)
        async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as http:
            ds = await http.post("/v1/datasets", content=ROWS, headers={**ALICE, **NDJSON})
            job = await http.post(
                "/v1/jobs",
                json={"base_model": "org/m", "dataset_id": ds.json()["id"]},
                headers=ALICE,
            )
            job_id = job.json()["id"]

            streams: list[httpx.Response] = []
            refused: list[httpx.Response] = []
            await asyncio.gather(
                *(open_stream(http, job_id, streams, refused) for _ in range(STREAMS))
            )
            assert len(streams) == CAP and len(refused) == STREAMS - CAP
            for resp in refused:
                assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 0
                assert resp.headers["Content-Type"].startswith("application/problem+json")
                assert "event streams" in resp.json()["detail"]

            # Meanwhile another tenant is served as usual.
            for _ in range(10):
                assert (await http.get("/v1/jobs", headers=BOB)).status_code == 200
                up = await http.post("/v1/datasets", content=ROWS, headers={**BOB, **NDJSON})
                assert up.status_code == 201
                assert (await http.get("/readyz")).status_code == 200
            client = redis.Redis.from_url(small_redis.url)
            connected = int(client.info("clients")["connected_clients"])
            assert connected <= 15, f"{connected} Redis connections for {CAP} streams"

            # Every stream gets the job's events live, from one reader, and ends at the end.
            store = Store.from_url(small_redis.url)
            readers = [asyncio.create_task(first_event_and_end(r)) for r in streams]
            await asyncio.sleep(0.5)
            for status in (JobStatus.running, JobStatus.succeeded):
                await store.update_job(
                    job_id, lambda j, s=status: msgspec.structs.replace(j, status=s)
                )
            started = time.monotonic()
            seen = await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
            assert all(kinds == ["status", "status", "status"] for kinds in seen), seen[0]
            assert time.monotonic() - started < 10
            await store.close()

            # Streams closed: the tenant may open new ones.
            again = await http.get(f"/v1/jobs/{job_id}/events", headers=ALICE)
            assert again.status_code == 200

            # Redis gone: a 503 that says to retry, not a 500.
            client.close()
            small_redis.stop()
            down = await http.get("/v1/jobs", headers=BOB)
            assert down.status_code == 503, down.text
            assert int(down.headers["Retry-After"]) > 0
            assert down.headers["Content-Type"].startswith("application/problem+json")


async def test_a_client_that_falls_behind_is_dropped_and_resumes_losing_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber's queue is bounded: past it the stream ends, and a reconnect with the
    last id it got (Last-Event-ID) carries on exactly after it."""
    monkeypatch.setattr(events, "QUEUE_SIZE", 5)
    store = Store.from_url(redis_url)
    async with events.EventHub(redis_url, block_ms=50).running() as hub:
        sub = await hub.subscribe(store, "alice", "job_x", limit=5)
        await asyncio.sleep(0.2)  # the reader follows the stream now
        for i in range(12):  # nobody reads meanwhile
            await store.add_log("job_x", f"line {i}")
        await asyncio.sleep(0.5)
        got = [e async for e in events.follow(store, sub, "0-0", keepalive=0.2) if e]
        hub.unsubscribe(sub)
        assert sub.dropped and len(got) == 5
        assert hub.open == {} and hub.cursors == {}

        again = await hub.subscribe(store, "alice", "job_x", limit=5)
        rest = []
        async for event in events.follow(store, again, got[-1][0], keepalive=0.2):
            if event is None:
                break
            rest.append(event)
        hub.unsubscribe(again)
    lines = [msgspec.json.decode(data)["message"] for _, _, data in got + rest]
    assert lines == [f"line {i}" for i in range(12)]
    await store.close()


def test_on_sigterm_open_streams_end_and_the_api_shuts_down_at_once(
    api_settings: Settings, tmp_path: Path
) -> None:
    """A stream never ends by itself, and uvicorn waits for open connections before it tells
    the app anything: on SIGTERM each stream ends now, with a comment that tells its client to
    resume (on another replica), and the API shuts down cleanly instead of waiting out its
    grace period (then a SIGKILL, or uvicorn cancelling the stream with an error logged)."""
    log = tmp_path / "api.log"
    with (
        ApiProcess(api_settings, log, FTUNE_API_GRACE_SECONDS="60") as api,
        httpx.Client(base_url=api.url, headers=ALICE, timeout=30) as http,
    ):
        ds = http.post("/v1/datasets", content=ROWS, headers=NDJSON).json()
        job = http.post("/v1/jobs", json={"base_model": "org/m", "dataset_id": ds["id"]}).json()
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("id: ")  # the stream is open: the job was queued
            assert api.proc is not None
            started = time.monotonic()
            api.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert ": the server is shutting down; resume with Last-Event-ID" in rest
        api.proc.wait(30)
        assert time.monotonic() - started < 10  # not the 60 s grace
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert "Traceback" not in text and "CancelledError" not in text


def test_sigterm_hooks_of_two_apps_ended_out_of_order_leave_the_original_handler() -> None:
    """Two apps in one process (tests do this) may end in either order: SIGTERM still reaches
    the handler that was there before both, through a hook whose loop has closed too."""
    seen: list[str] = []
    original = signal.signal(signal.SIGTERM, lambda s, f: seen.append("original"))
    try:
        first_loop, second_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
        restore_first = events._on_sigterm(first_loop, lambda: seen.append("first"))
        restore_second = events._on_sigterm(second_loop, lambda: seen.append("second"))
        first_loop.close()
        restore_first()  # the first app ends before the second
        signal.raise_signal(signal.SIGTERM)
        second_loop.run_until_complete(asyncio.sleep(0))
        assert seen == ["original", "second"]
        restore_second()
        seen.clear()
        signal.raise_signal(signal.SIGTERM)
        assert seen == ["original"]
        second_loop.close()
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_streams_are_counted_for_whoever_opens_them_and_end_in_time(
    api_settings: Settings,
) -> None:
    """An admin watching a tenant's job takes its own slots, not the tenant's; a finished
    job's stream takes one too while it is read; a live stream ends after
    event_stream_seconds with a comment, and resumes with Last-Event-ID."""
    settings = replace(api_settings, max_event_streams=2, event_stream_seconds=2)
    with LiveServer(settings) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            ds = await http.post("/v1/datasets", content=ROWS, headers={**BOB, **NDJSON})
            spec = {"base_model": "org/m", "dataset_id": ds.json()["id"]}
            live = (await http.post("/v1/jobs", json=spec, headers=BOB)).json()["id"]
            ended = await http.post("/v1/jobs", json={**spec, "labels": {"n": "2"}}, headers=BOB)
            ended_id = ended.json()["id"]
            assert (await http.post(f"/v1/jobs/{ended_id}/cancel", headers=BOB)).is_success

            async def open_(job_id: str, who: dict[str, str]) -> httpx.Response:
                request = http.build_request("GET", f"/v1/jobs/{job_id}/events", headers=who)
                return await http.send(request, stream=True)

            admins = [await open_(live, ADMIN) for _ in range(2)]
            assert [r.status_code for r in admins] == [200, 200]
            assert (await open_(live, ADMIN)).status_code == 429  # the admin's own limit
            opened = time.monotonic()
            bobs = [await open_(live, BOB), await open_(live, BOB)]
            assert [r.status_code for r in bobs] == [200, 200]  # untouched by the admin's
            third = await open_(ended_id, BOB)  # a finished job's stream takes a slot too
            assert third.status_code == 429
            usage = (await http.get("/v1/usage", headers=BOB)).json()["limits"]
            assert {u["name"]: u["used"] for u in usage}["event_streams"] == 2

            lines = [line async for line in bobs[0].aiter_lines()]
            # At its time, though nothing happened: not at the next keep-alive, 15 s after.
            assert 2 <= time.monotonic() - opened < 10
            assert any("ends after 2 s; resume with Last-Event-ID" in line for line in lines)
            last_id = [line for line in lines if line.startswith("id:")][-1].split(":", 1)[1]
            for resp in [*admins, bobs[1]]:
                await resp.aclose()
            resumed = await http.get(
                f"/v1/jobs/{live}/events",
                headers={**BOB, "Last-Event-ID": last_id.strip()},
            )
            assert resumed.status_code == 200 and "event:" not in resumed.text  # nothing new
