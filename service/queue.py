"""The API's side of arq: put a job id on the queue, take it off again.

One arq job per attempt (`{job_id}:{attempt}`): arq refuses a repeated `_job_id` while it
remembers the first, so a retried attempt needs its own, and a repeated enqueue of the same
attempt is a no-op.
"""

from __future__ import annotations

from datetime import timedelta

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix

TASK = "run_job"
QUEUED_FOR = timedelta(days=30)
"""How long an attempt may wait for a free GPU (arq's default is one day)."""


def arq_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}:{attempt}"


async def connect(redis_url: str) -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(redis_url))


async def enqueue(pool: ArqRedis, job_id: str, attempt: int, *, queue_name: str) -> bool:
    """True if queued now, False if this attempt was already on the queue."""
    job = await pool.enqueue_job(
        TASK,
        job_id,
        attempt,
        _job_id=arq_job_id(job_id, attempt),
        _queue_name=queue_name,
        _expires=QUEUED_FOR,
    )
    return job is not None


async def remove(pool: ArqRedis, job_id: str, attempt: int, *, queue_name: str) -> None:
    """Take a queued attempt off the queue. A running one is stopped by its worker, which
    watches the job record; a worker that picks up a removed attempt anyway finds the record
    no longer queued and drops it."""
    arq_id = arq_job_id(job_id, attempt)
    async with pool.pipeline(transaction=True) as tr:
        tr.zrem(queue_name, arq_id)
        tr.delete(job_key_prefix + arq_id)
        await tr.execute()


async def depth(pool: ArqRedis, *, queue_name: str) -> int:
    return int(await pool.zcard(queue_name))
