"""The scheduler role: what must happen while no job runs, whether or not a worker exists.

GPU workers scale to zero (KEDA), so nothing that must happen on time may live in them: the
reaper that re-queues jobs of lost workers (service/leases.py), the retraining policies'
triggers, cron schedules and gates (service/retraining/runs.py), and the retention sweep of
finished jobs (Store.forget_finished) run here. Every API process
runs a `Scheduler`; one of them leads at a time through a Redis lock (redis-py's `Lock`) that
its holder extends while it lives. When the leader's process dies, its lock lapses within
`lease_seconds` and another replica takes over. Webhook deliveries are not led: every replica
sends them, each event claimed by one (service/webhooks/delivery.py).

`ftune scheduler` runs the role alone, for deployments that keep it (and the Hub tokens that
promotion publishing needs) out of the API pods (`FTUNE_SCHEDULER_ENABLED=false` there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from service import leases, logs, queue, webhooks
from service.blobs import BlobStore, open_store
from service.openai.records import result_bytes_key, suffix_key
from service.retraining import runs, verdicts
from service.settings import Settings
from service.store import P, Store

log = logging.getLogger("ftune.scheduler")

LEADER_KEY = f"{P}lock:scheduler"
JOB_KEYS = (webhooks.log_key, suffix_key, result_bytes_key)
"""Features' per-job keys, deleted with a job past its retention."""


class Scheduler:
    def __init__(
        self,
        store: Store,
        pool: ArqRedis,
        blobs: BlobStore,
        settings: Settings,
        *,
        publisher: verdicts.Publisher | None = None,
    ) -> None:
        self.store, self.pool, self.blobs, self.settings = store, pool, blobs, settings
        self.publisher = publisher
        self.interval = settings.scheduler_interval_seconds
        self.leading = False
        self.reachable_since: float | None = None
        """When this process last found Redis reachable after not knowing it was (start-up
        or an error): the reaper waits a lease period from then."""

    def _reaper_may_act(self) -> bool:
        """Whether Redis has been reachable for a whole lease period. While Redis is down no
        worker can renew its lease and no reaper can reap; when it returns (AOF keeps the
        leases' absolute expiry times, so a long outage leaves them lapsed) the workers, which
        retry more often than that, renew before any job is taken from them."""
        now = time.monotonic()
        if self.reachable_since is None:
            self.reachable_since = now
        return now - self.reachable_since >= self.settings.lease_seconds

    async def tick(self) -> list[str]:
        """One pass of every duty; what happened, one line per action."""
        done: list[str] = []
        if self._reaper_may_act():
            lost = await leases.reap(self.store, self.pool, self.settings)
            if lost:
                done.append("re-queued jobs of lost workers: " + ", ".join(lost))
        done += await runs.tick(
            self.store,
            self.pool,
            self.blobs,
            self.settings,
            publisher=self.publisher,
            announce=webhooks.stage_verdict,
        )
        retention = self.settings.job_retention_days * 86400
        if forgotten := await self.store.forget_finished(time.time() - retention):
            done.append(f"deleted {len(forgotten)} jobs finished over the retention period")
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Lead whenever the lock is free, until `stop` is set."""
        ttl = max(self.settings.lease_seconds, 3 * self.interval)
        lock: Lock = self.store.redis.lock(LEADER_KEY, timeout=ttl, thread_local=False)
        while not stop.is_set():
            try:
                if await lock.acquire(blocking=False):
                    await self._lead(lock, stop, ttl)
            except RedisError as exc:
                self.reachable_since = None
                log.warning("the scheduler lock could not be checked: %s", exc)
            await _wait(stop, self.interval)

    async def _lead(self, lock: Lock, stop: asyncio.Event, ttl: float) -> None:
        """Tick every `interval` while a keeper extends the lock; return when it is lost."""
        log.info("this process now runs the scheduler")
        self.leading = True
        lost = asyncio.Event()
        keeper = asyncio.create_task(_keep(lock, ttl, lost), name="ftune-scheduler-lock")
        try:
            while not (stop.is_set() or lost.is_set()):
                try:
                    for line in await self.tick():
                        log.info("%s", line)
                except RedisError as exc:
                    self.reachable_since = None
                    log.warning("scheduler pass stopped, Redis is unreachable: %s", exc)
                except Exception:
                    log.exception("scheduler pass failed")
                await _wait(stop, self.interval)
        finally:
            self.leading = False
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not lost.is_set():
                with contextlib.suppress(LockError, RedisError):
                    await lock.release()


async def _keep(lock: Lock, ttl: float, lost: asyncio.Event) -> None:
    """Extend the lock every third of its lifetime; a long tick (publishing a model to the
    Hub) must not lose it. Set `lost` once another process holds it."""
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            await lock.reacquire()
        except LockError:
            log.warning("the scheduler lock lapsed; another process may lead now")
            lost.set()
            return
        except RedisError as exc:
            log.warning("the scheduler lock could not be extended: %s", exc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@contextlib.asynccontextmanager
async def scheduling(scheduler: Scheduler) -> AsyncIterator[None]:
    """Run the scheduler for the duration of the block (the API lifespan)."""
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop), name="ftune-scheduler")
    try:
        yield
    finally:
        stop.set()
        # A pass in flight gets a moment to end; past it, it is cancelled (each of its steps
        # is a compare-and-set, so the next leader redoes what it left half done).
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, timeout=10)


async def serve(settings: Settings) -> None:
    """The scheduler role on its own, until SIGTERM or SIGINT."""
    store = Store.from_url(
        settings.redis_url,
        metrics_maxlen=settings.metrics_maxlen,
        on_terminal=(webhooks.stage_webhook,),
        job_keys=JOB_KEYS,
    )
    pool = await queue.connect(settings.redis_url)
    blobs = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Scheduler(store, pool, blobs, settings).run(stop)
    finally:
        await pool.aclose()
        await store.close()


def run_scheduler(settings: Settings) -> None:
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    asyncio.run(serve(settings))
