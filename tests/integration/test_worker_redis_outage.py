"""A worker rides out a Redis outage: arq's polling loop alone would let a Redis error end the
worker; the supervisor keeps what the training process reports, within bounds."""

from __future__ import annotations

import asyncio
import queue as stdqueue
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpu_worker import supervisor
from gpu_worker.worker import build_worker
from service import queue
from service.contract import Phase, Progress
from service.dev.localredis import LocalRedis
from service.metrics import WorkerMetrics
from service.settings import Settings
from service.store import Store
from tests.integration.test_worker_recovery import put_running, running_job


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


async def test_an_idle_worker_outlives_a_redis_restart_and_takes_jobs_after(
    own_redis: LocalRedis, tmp_path: Path
) -> None:
    settings = replace(
        Settings(),
        redis_url=own_redis.url,
        work_dir=tmp_path / "work",
        lease_seconds=1.5,
        worker_metrics_port=0,
    )
    worker = build_worker(settings, on_terminal=())
    running = asyncio.create_task(worker.async_run())
    try:
        await asyncio.sleep(1.0)
        own_redis.stop()
        await asyncio.sleep(3.0)  # a dozen polls fail meanwhile
        assert not running.done(), running
        own_redis.start()
        pool = await queue.connect(settings.redis_url)
        # An attempt of a job that does not exist: the worker takes it and skips it at once.
        await queue.enqueue(pool, running_job(), queue_name=settings.queue_name)  # not stored
        deadline = time.monotonic() + 15
        while await queue.depth(pool, queue_name=settings.queue_name):
            assert time.monotonic() < deadline, "the worker took no job after Redis returned"
            await asyncio.sleep(0.2)
        await pool.aclose()
    finally:
        worker.handle_sig(signal.SIGUSR1)
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()


async def test_events_buffered_in_an_outage_are_bounded_and_the_drops_told(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the child reports while Redis is away waits in a bounded buffer: progress keeps
    only its newest value, phases and record updates are never dropped, metric points and
    log lines past the bound are, and the job's log says how many."""
    monkeypatch.setattr(supervisor, "MAX_PENDING", 20)
    store = Store.from_url(redis_url)
    job = running_job()
    await put_running(store, job)
    sup = supervisor.Supervisor(store, job, Settings(), "w", WorkerMetrics())
    events: stdqueue.Queue[tuple[str, Any]] = stdqueue.Queue()
    for step in range(1, 31):
        events.put(("progress", Progress(step=step, total_steps=30)))
        events.put(("metrics", (step, float(step), {"loss": 1.0 / step})))
    events.put(("phase", "evaluating"))
    sup.take(events)  # type: ignore[arg-type]  # the same get_nowait/Empty as multiprocessing's

    assert sup.dropped == 10  # 20 points kept, then the phase; 10 points dropped
    await sup.flush()
    stored = await store.get_job(job.id, None)
    assert stored.progress.step == 30 and stored.phase == Phase.evaluating
    assert [p.step for p in await store.get_metrics(job.id)] == list(range(1, 21))
    logged = await store.read_events(job.id, after="0", block_ms=None)
    assert any(b"10 metric points and log lines could not be kept" in d for _, k, d in logged)
    await store.close()
