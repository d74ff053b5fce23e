"""Redis does not grow for ever: finished jobs go after the retention period, whole, and a
job's streams are capped."""

from __future__ import annotations

import time

import msgspec
import redis

from service.contract import JobStatus, MetricPoint
from service.openai.records import set_suffix
from service.scheduler import JOB_KEYS
from service.store import Store, events_key, job_key, metrics_key
from service.webhooks import log_key
from tests.integration.test_worker_recovery import put_running, running_job

DAY = 86400.0


async def finished(store: Store, at: float) -> str:
    job = running_job()
    await put_running(store, job)
    await store.add_metrics(job.id, MetricPoint(step=1, time=at, values={"loss": 0.7}))
    await store.add_log(job.id, "trained")
    await store.redis.rpush(log_key(job.id), b"{}")  # a webhook delivery attempt
    await set_suffix(store, job.id, "v1")
    await store.update_job(
        job.id,
        lambda j: msgspec.structs.replace(j, status=JobStatus.succeeded, finished_at=at),
    )
    return job.id


async def test_jobs_past_retention_are_deleted_whole_and_unlisted(redis_url: str) -> None:
    store = Store.from_url(redis_url, job_keys=JOB_KEYS)
    now = time.time()
    old = await finished(store, now - 31 * DAY)
    recent = await finished(store, now - 29 * DAY)
    running = running_job()
    await put_running(store, running)

    assert await store.forget_finished(now - 30 * DAY) == [old]
    assert await store.forget_finished(now - 30 * DAY) == []  # done once

    gone = [job_key(old), metrics_key(old), events_key(old), log_key(old)]
    assert await store.redis.exists(*gone) == 0
    client = redis.Redis.from_url(redis_url)
    assert not any(k.decode().endswith(old) for k in client.keys("*"))  # the suffix too
    # No index lists an id without a record: every listed job can be fetched.
    for index in client.keys("ftune:jobs:*"):
        assert old.encode() not in client.zrange(index, 0, -1), index
    listed, _ = await store.list_jobs("alice", status=None, labels={}, limit=10, cursor=None)
    assert sorted(j.id for j in listed) == sorted([recent, running.id])
    assert (await store.get_job(recent, "alice")).status == JobStatus.succeeded
    assert await store.get_metrics(recent) != []
    client.close()
    await store.close()


async def test_event_stream_is_capped_with_the_metric_stream(redis_url: str) -> None:
    store = Store(Store.from_url(redis_url).redis, metrics_maxlen=100)
    job = running_job()
    await put_running(store, job)
    for step in range(1000):
        await store.add_metrics(job.id, MetricPoint(step=step, time=0.0, values={"loss": 1.0}))
        await store.add_log(job.id, f"line {step}")
    # Trimming is approximate (whole stream nodes of 100 entries), never unbounded.
    assert await store.redis.xlen(metrics_key(job.id)) <= 200
    assert await store.redis.xlen(events_key(job.id)) <= 300
    await store.close()
