"""Events over SSE with resume, and Prometheus figures that move."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

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


def read_events(
    http: httpx.Client, job_id: str, last: str | None, stop_after: int | None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last} if last else {}
    events: list[dict[str, Any]] = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in resp.iter_lines():
            if line.startswith("id:"):
                current["id"] = line[3:].strip()
            elif line.startswith("event:"):
                current["event"] = line[6:].strip()
            elif line.startswith("data:"):
                current["data"] = json.loads(line[5:].strip())
            elif line == "" and current:
                events.append(current)
                current = {}
                if stop_after is not None and len(events) == stop_after:
                    break
    return events


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


def test_events_resume_with_last_event_id_and_end_at_terminal(
    live_api: LiveServer, api_settings: Settings
) -> None:
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        job_id = submit(http)
        first = read_events(http, job_id, None, stop_after=1)
        assert first[0]["event"] == "status" and first[0]["data"]["status"] == "queued"

        # The job moves on while a second client follows live and drops out midway.
        def run() -> None:
            async def go() -> None:
                store = Store.from_url(api_settings.redis_url)
                await drive(store, job_id)
                await store.close()

            time.sleep(0.5)
            asyncio.run(go())

        driver = threading.Thread(target=run)
        driver.start()
        middle = read_events(http, job_id, first[-1]["id"], stop_after=3)
        driver.join()
        rest = read_events(http, job_id, middle[-1]["id"], stop_after=None)  # ends by itself

    events = first + middle + rest
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "no event twice"
    kinds = [
        (e["event"], e["data"].get("status") or e["data"].get("phase") or e["data"].get("step"))
        for e in events
    ]
    assert kinds == [
        ("status", "queued"),
        ("status", "running"),
        ("phase", "training"),
        ("metrics", 1),
        ("metrics", 2),
        ("metrics", 3),
        ("log", None),
        ("status", "succeeded"),
    ]
    # a client reconnecting after the end gets nothing more and is not left hanging
    with httpx.Client(base_url=live_api.url, headers=HEADERS, timeout=30) as http:
        assert read_events(http, job_id, ids[-1], stop_after=None) == []
        bad = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422


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
    gets = [k for k in after if k.startswith("ftune_requests_total") and "/v1/jobs/{job_id}" in k]
    assert gets and after[gets[0]] >= 1
