"""Events over SSE with resume, and Prometheus figures that move."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from contextlib import closing
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api import jobs as jobs_api
from service.client import Client, Event
from service.contract import JobStatus, MetricPoint, Phase
from service.metrics import record_job_duration
from service.settings import Settings
from service.store import Store
from tests.fixtures.api import LiveServer

HEADERS = {"Authorization": "Bearer key-alice"}
ROWS = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'


def submit(http: httpx.Client) -> str:
    ds = http.post(
        "/v1/datasets", content=ROWS, headers={"Content-Type": "application/x-ndjson"}
    ).json()
    return str(
        http.post("/v1/jobs", json={"base_model": "org/m", "dataset_id": ds["id"]}).json()["id"]
    )


def read_events(url: str, job_id: str, last: str | None, stop_after: int | None) -> list[Event]:
    """Follow the job's events with the CLI's client, from after `last`, dropping out after
    `stop_after` events (None: until the server ends the stream)."""
    with (
        Client(url, "key-alice") as client,
        closing(client.events(job_id, last_event_id=last)) as events,
    ):
        return list(itertools.islice(events, stop_after))


def kinds(events: list[Event]) -> list[tuple[str, Any]]:
    return [
        (e.event, e.data.get("status") or e.data.get("phase") or e.data.get("step")) for e in events
    ]


EXPECTED = [
    ("status", "queued"),
    ("status", "running"),
    ("phase", "training"),
    ("metrics", 1),
    ("metrics", 2),
    ("metrics", 3),
    ("log", None),
    ("status", "succeeded"),
]


async def drive(store: Store, job_id: str) -> None:
    def to(status: JobStatus, **kw: Any) -> Any:
        return lambda j: msgspec.structs.replace(j, status=status, **kw)

    await store.update_job(job_id, to(JobStatus.running))
    await store.update_job(job_id, lambda j: msgspec.structs.replace(j, phase=Phase.training))
    for step in (1, 2, 3):
        await store.add_metrics(
            job_id, MetricPoint(step=step, time=time.time(), values={"loss": 1.0 / step})
        )
    await store.add_log(job_id, "saved checkpoint-3")
    await store.update_job(job_id, to(JobStatus.succeeded, finished_at=time.time()))


def drive_soon(settings: Settings, job_id: str, after: float) -> threading.Thread:
    """Move the job to its end from another thread, `after` seconds from now."""

    def run() -> None:
        async def go() -> None:
            store = Store.from_url(settings.redis_url)
            await drive(store, job_id)
            await store.close()

        time.sleep(after)
        asyncio.run(go())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_events_resume_with_last_event_id_and_end_at_terminal(
    live_api: LiveServer, api_settings: Settings
) -> None:
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        job_id = submit(http)
    first = read_events(live_api.url, job_id, None, stop_after=1)
    assert first[0].event == "status" and first[0].data["status"] == "queued"

    # The job moves on while a second client follows live and drops out midway.
    driver = drive_soon(api_settings, job_id, after=0.5)
    middle = read_events(live_api.url, job_id, first[-1].id, stop_after=3)
    driver.join()
    rest = read_events(live_api.url, job_id, middle[-1].id, stop_after=None)  # ends by itself

    events = first + middle + rest
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "no event twice"
    assert kinds(events) == EXPECTED
    # a client reconnecting after the end gets nothing more and is not left hanging
    assert read_events(live_api.url, job_id, ids[-1], stop_after=None) == []
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        bad = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400  # issue 13: a malformed Last-Event-ID is a 400


def test_keep_alive_comments_are_not_events(
    live_api: LiveServer, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle stream sends a comment every KEEPALIVE_MS; the client yields none of them,
    also after the first event with an id (where httpx-sse alone would yield empty ones)."""
    monkeypatch.setattr(jobs_api, "KEEPALIVE_MS", 20)
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        job_id = submit(http)
    driver = drive_soon(api_settings, job_id, after=0.5)  # ~25 keep-alives meanwhile
    events = read_events(live_api.url, job_id, None, stop_after=None)
    driver.join()
    assert kinds(events) == EXPECTED


def scrape(http: httpx.Client) -> dict[str, float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
            out[key] = sample.value
    return out


def test_prometheus_figures_move(live_api: LiveServer, api_settings: Settings) -> None:
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        before = scrape(http)
        assert before["ftune_queue_depth"] == 0
        job_id = submit(http)
        http.get(f"/v1/jobs/{job_id}")
        assert http.get(f"/v1/jobs/{job_id}/metrics").status_code == 200
        assert http.get("/v1/jobs/job_nope").status_code == 404
        assert http.get("/readyz").status_code == 200
        assert http.get("/v1/jobs/job_nope/events").status_code == 404

        async def finish() -> None:
            store = Store.from_url(api_settings.redis_url)
            await record_job_duration(store.redis, 420.0)
            await store.close()

        asyncio.run(finish())
        after = scrape(http)
    assert after["ftune_queue_depth"] == 1
    assert after["ftune_jobs,status=queued"] == 1
    assert after["ftune_job_duration_seconds_count"] == 1
    assert after["ftune_job_duration_seconds_bucket,le=900.0"] == 1
    assert after["ftune_job_duration_seconds_bucket,le=300.0"] == 0
    # Redis' own memory, for the chart's FtuneRedisMemoryHigh alert (the test server: no limit).
    assert after["ftune_redis_memory_used_bytes"] > 100_000
    assert after["ftune_redis_maxmemory_bytes"] == 0

    def requests(path: str, status: int) -> float:
        """This test's requests (the counters are the process's, shared by its apps)."""
        key = f"ftune_requests_total,app_name=ftune,method=GET,path={path},status_code={status}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert requests("/v1/jobs/{job_id}", 200) == 1
    assert requests("/v1/jobs/{job_id}", 404) == 1
    # A route whose path ends in /metrics is counted too; only the scrape itself is not.
    assert requests("/v1/jobs/{job_id}/metrics", 200) == 1
    assert requests("/metrics", 200) == 0
    # Nor the readiness probe (every 5 s a pod), as the liveness one.
    assert requests("/readyz", 200) == 0
    timed = "ftune_request_duration_seconds_count,app_name=ftune,method=GET"
    timed += ",path=/v1/jobs/{job_id},status_code=200"
    assert after[timed] - before.get(timed, 0.0) == 1
    # An event stream is counted, not timed: its lifetime (up to an hour) is no latency, and
    # timed it made the dashboard's p90 that of the streams.
    assert requests("/v1/jobs/{job_id}/events", 404) == 1
    streamed = "ftune_request_duration_seconds_count,app_name=ftune,method=GET"
    streamed += ",path=/v1/jobs/{job_id}/events,status_code=404"
    assert after.get(streamed, 0.0) == before.get(streamed, 0.0) == 0
