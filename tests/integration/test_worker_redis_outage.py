"""arq's polling loop lets a Redis error end the worker; ours waits for Redis to come back."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gpu_worker.worker import build_worker
from service import queue
from service.dev.localredis import LocalRedis
from service.settings import Settings


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
        await queue.enqueue(pool, "job_gone", 0, queue_name=settings.queue_name)
        deadline = time.monotonic() + 15
        while await queue.depth(pool, queue_name=settings.queue_name):
            assert time.monotonic() < deadline, "the worker took no job after Redis returned"
            await asyncio.sleep(0.2)
        await pool.aclose()
    finally:
        worker.handle_sig(signal.SIGUSR1)
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()
