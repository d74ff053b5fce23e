"""An idle worker starts a submitted job when it is queued, not at its next poll.

The workers here are real (`build_worker`, in this process) with a poll delay of 30 s, and
each test waits until they are idle and subscribed: a job they start within 10 s can only
have reached them through the wake-up its queueing published. Each job's training process is
killed as soon as the job runs (it would spend seconds importing torch), which ends the job
as failed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from arq.connections import ArqRedis
from arq.worker import Worker

from gpu_worker.worker import build_worker
from service import queue
from service.contract import JobStatus
from service.settings import Settings
from service.store import Store
from tests.integration.test_worker_recovery import running_job

POLL_SECONDS = 120.0
"""Far past every wait below: a job started in time was started by a wake-up."""
WITHIN = 30.0
"""Generous: each worker spawns a training process that imports torch beside the test."""


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WITHIN
    while not await check():
        assert time.monotonic() < deadline, f"not within {WITHIN} s: {what}"
        await asyncio.sleep(0.05)


async def subscribers(pool: ArqRedis, s: Settings) -> int:
    [(_, count)] = await pool.pubsub_numsub(queue.wake_channel(s.queue_name))
    return int(count)


@contextlib.asynccontextmanager
async def idle_workers(s: Settings, pool: ArqRedis, n: int) -> AsyncIterator[list[Worker]]:
    """`n` workers that have polled once, found nothing, and now wait for a wake-up."""
    workers = [build_worker(s, on_terminal=()) for _ in range(n)]
    runs = [asyncio.create_task(w.async_run()) for w in workers]
    try:
        await eventually(lambda: _equals(subscribers(pool, s), n), "the workers subscribed")
        yield workers
        # A job whose record reads ended can still be in arq's bookkeeping (its result, its
        # token's removal), which SIGUSR1 would cancel mid-write: let it finish first.
        await eventually(lambda: _done(workers), "the workers' jobs returned")
    finally:
        for worker in workers:
            worker.handle_sig(signal.SIGUSR1)
        await asyncio.gather(*runs, return_exceptions=True)
        for worker in workers:
            await worker.close()


async def _done(workers: list[Worker]) -> bool:
    return all(task.done() for worker in workers for task in worker.tasks.values())


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


def kill_training_processes() -> None:
    for child in multiprocessing.active_children():
        if child.name.startswith("ftune-train-"):
            child.kill()


def settings(redis_url: str, tmp_path: Path) -> Settings:
    """One attempt: a training process killed while it still imports torch would otherwise
    cost the job an attempt and a second import before it fails, inside each wait below."""
    return replace(
        Settings(),
        redis_url=redis_url,
        work_dir=tmp_path / "work",
        worker_poll_seconds=POLL_SECONDS,
        worker_metrics_port=0,
        max_attempts=1,
    )


async def submit(store: Store, pool: ArqRedis, s: Settings) -> str:
    """What `POST /v1/jobs` does once the spec is checked: record the job, queue it."""
    job = running_job()
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    assert await queue.enqueue(pool, job, queue_name=s.queue_name)
    return job.id


async def test_an_idle_worker_starts_a_job_when_it_is_queued(
    redis_url: str, tmp_path: Path
) -> None:
    s = settings(redis_url, tmp_path)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    try:
        async with idle_workers(s, pool, 1):
            job_id = await submit(store, pool, s)

            async def running() -> bool:
                return (await store.get_job(job_id, None)).status == JobStatus.running

            await eventually(running, "the idle worker started the job")
            kill_training_processes()

            async def ended() -> bool:
                return (await store.get_job(job_id, None)).status == JobStatus.failed

            await eventually(ended, "the job ended once its training process was killed")
            # arq removes the token once the task returns, after the status is written.
            await eventually(
                lambda: _equals(queue.depth(pool, queue_name=s.queue_name), 0), "token removed"
            )
    finally:
        await pool.aclose()
        await store.close()


async def test_two_idle_workers_start_two_jobs_queued_together(
    redis_url: str, tmp_path: Path
) -> None:
    """Each worker hears every wake-up: the one that loses the race for the first token
    still starts the second job, not 30 s later."""
    s = settings(redis_url, tmp_path)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    try:
        async with idle_workers(s, pool, 2):
            jobs = [await submit(store, pool, s), await submit(store, pool, s)]

            async def both_running() -> bool:  # one job slot per worker: one on each
                statuses = [(await store.get_job(j, None)).status for j in jobs]
                return statuses == [JobStatus.running] * 2

            await eventually(both_running, "both idle workers started a job")
            kill_training_processes()

            async def both_ended() -> bool:
                statuses = [(await store.get_job(j, None)).status for j in jobs]
                return statuses == [JobStatus.failed] * 2

            await eventually(both_ended, "both jobs ended once their processes were killed")
    finally:
        await pool.aclose()
        await store.close()


async def test_a_worker_whose_job_ends_starts_the_next_queued_one_at_once(
    redis_url: str, tmp_path: Path
) -> None:
    """The second job's wake-up came while the only worker was busy: it starts when the
    first job ends, not at the worker's next poll."""
    s = settings(redis_url, tmp_path)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)

    async def status(job_id: str) -> JobStatus:
        return (await store.get_job(job_id, None)).status

    try:
        async with idle_workers(s, pool, 1):
            first = await submit(store, pool, s)
            await eventually(lambda: _equals(status(first), JobStatus.running), "first runs")
            second = await submit(store, pool, s)
            await asyncio.sleep(1.0)  # the wake-up has come and gone: the worker is busy
            assert await status(second) == JobStatus.queued
            kill_training_processes()
            await eventually(lambda: _equals(status(second), JobStatus.running), "second runs")
            assert await status(first) == JobStatus.failed
            kill_training_processes()
            await eventually(lambda: _equals(status(second), JobStatus.failed), "second ends")
    finally:
        await pool.aclose()
        await store.close()


async def test_every_waiting_worker_hears_a_token_added(redis_url: str) -> None:
    s = replace(Settings(), redis_url=redis_url)
    pool = await queue.connect(redis_url)
    waiting = [queue.WakeUps(pool, s.queue_name) for _ in range(2)]
    try:
        waits = [asyncio.create_task(w.wait(POLL_SECONDS)) for w in waiting]
        await eventually(lambda: _equals(subscribers(pool, s), 2), "both subscribed")
        await queue.enqueue(pool, running_job(), queue_name=s.queue_name)
        assert await asyncio.wait_for(asyncio.gather(*waits), WITHIN) == [True, True]
        # Nothing added since: a wait ends with its time, not with a stale wake-up.
        assert await waiting[0].wait(0.2) is False
    finally:
        for w in waiting:
            await w.close()
        await pool.aclose()
