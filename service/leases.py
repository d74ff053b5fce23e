"""Leases of running jobs: a worker renews its job's lease while it trains; a job whose lease
lapsed lost its worker and goes back to the queue as its next attempt, which resumes from the
last checkpoint.

`requeue` is shared by a worker that shuts down mid-job and by the scheduler's reaper, which
runs whether or not any worker exists (arq's own recovery would wait `job_timeout + 10 s`,
hours for training).
"""

from __future__ import annotations

import time

import msgspec
from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline

from service import queue
from service.contract import Job, JobError, JobStatus
from service.settings import Settings
from service.store import Conflict, NotFound, Store, job_key, new_id, transact


async def requeue(
    store: Store,
    pool: ArqRedis,
    settings: Settings,
    job_id: str,
    why: str,
    *,
    planned: bool = False,
    attempt: int | None = None,
) -> Job | None:
    """Running → queued as the next attempt (or failed when lost attempts are used up,
    cancelled when a cancel was asked for). None if the job was not running (or, with
    `attempt`, no longer that attempt).

    `planned`: the worker stopped on purpose (SIGTERM on an upgrade, drain or scale-down)
    after checkpointing; such a re-queue takes a new attempt number (arq remembers the old
    one's id) but does not spend the `max_attempts` budget, which counts lost workers only.
    """

    def change(job: Job) -> Job:
        if job.status != JobStatus.running or attempt not in (None, job.attempt):
            raise Conflict(f"job {job_id} is {job.status.value}, attempt {job.attempt}")
        if job.cancel_requested:
            return msgspec.structs.replace(job, status=JobStatus.cancelled, finished_at=time.time())
        lost = job.lost_attempts + (0 if planned else 1)
        if lost >= settings.max_attempts:
            error = JobError(
                type="WorkerLost",
                message=f"{why}; gave up after {lost} lost attempts",
                phase=job.phase,
            )
            return msgspec.structs.replace(
                job, status=JobStatus.failed, finished_at=time.time(), error=error
            )
        return msgspec.structs.replace(
            job,
            status=JobStatus.queued,
            attempt=job.attempt + 1,
            lost_attempts=lost,
            worker=None,
            phase=None,
        )

    # The running attempt's token, read before the transaction: no other can be dispatched
    # for the job until that transaction queues the next attempt.
    token = await queue.dispatched(pool, job_id)

    def release_and_enqueue(pipe: Pipeline, job: Job) -> None:
        """In the record's own transaction: a requeue cut short cannot leave a queued job
        with no token to dispatch it, and the old token goes before the new one can be
        picked (and mapped to the job in its place)."""
        queue.release_in(pipe, job_id, token, queue_name=settings.queue_name)
        if job.status == JobStatus.queued:
            queue.enqueue_in(pipe, job, queue_name=settings.queue_name, requires=job_key(job_id))

    try:
        job = await store.update_job(job_id, change, then=release_and_enqueue)
    except (Conflict, NotFound):
        return None
    await store.drop_lease(job_id)
    if job.status == JobStatus.queued:
        await store.add_log(job_id, f"{why}: re-queued as attempt {job.attempt}")
    return job


async def reap(store: Store, pool: ArqRedis, settings: Settings) -> list[str]:
    """Re-queue the running jobs whose worker stopped renewing the lease; the ids it moved.

    Each re-queue is a compare-and-set on the job, so two reapers racing move a job once.
    """
    await restore_lost_claims(store, pool, settings)
    await queue.replace_stranded_tokens(
        pool,
        queue_name=settings.queue_name,
        in_progress_seconds=settings.job_timeout_hours * 3600 + 10,
    )
    moved = []
    for job_id in await store.expired_leases():
        if await requeue(store, pool, settings, job_id, "the worker running it was lost"):
            moved.append(job_id)
    return moved


async def restore_lost_claims(store: Store, pool: ArqRedis, settings: Settings) -> None:
    """Attempts a worker picked but never started (it died in between) go back to their
    tenant's pending set with a fresh dispatch token."""
    for lost in await queue.lost_claims(pool):
        await _restore(store, pool, settings, lost)


async def _restore(store: Store, pool: ArqRedis, settings: Settings, lost: queue.Picked) -> None:
    """The claim's end, the dead token's removal and the fresh token in one transaction: a
    reaper cut short leaves the claim for its next pass, never a queued job that no token
    dispatches. Watched: the claim (ended by its worker's own unclaim or by another reaper)
    and the record (the worker's compare-and-set, a cancel); the token mapping changes only
    with them."""
    claiming = queue.claiming_key(lost.tenant)
    attempt = queue.attempt_key(lost.job_id, lost.attempt)

    async def restore(pipe: Pipeline) -> None:
        if await pipe.zscore(claiming, attempt) is None:
            return  # its worker started it meanwhile, or another reaper took it
        token = await queue.dispatched(pool, lost.job_id)
        try:
            job: Job | None = await store.get_job(lost.job_id, None)
        except NotFound:
            job = None
        status = job.status if job and job.attempt == lost.attempt else None
        pipe.multi()
        pipe.zrem(claiming, attempt)
        if status == JobStatus.running:
            return  # started late, its claim not yet ended: the running attempt keeps its token
        queue.release_in(pipe, lost.job_id, token, queue_name=settings.queue_name)
        if job and status == JobStatus.queued:
            queue.enqueue_in(
                pipe,
                job,
                queue_name=settings.queue_name,
                requires=job_key(lost.job_id),
                token=new_id("dispatch"),
            )

    await transact(store.redis, restore, claiming, job_key(lost.job_id))
