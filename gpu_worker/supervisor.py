"""The worker's side of a running job: forward the training child's events to Redis, renew the
lease, watch for a cancel, and ride out a Redis outage.

Training never needs Redis, so an outage must not cost it: while Redis is unreachable the
supervisor keeps draining the child's events into a bounded buffer (progress kept as its newest
value only; past the bound, metric points and log lines are dropped and counted, and the
artifact's metrics.jsonl still has them all), retries with capped exponential backoff, and on
reconnect renews the lease first, then replays the buffer in order. The scheduler's reaper
waits a full lease period after it sees Redis again (service/scheduler.py), and the backoff is
capped well below that, so a job is not taken from a worker that is about to renew.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue as stdqueue
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import logs
from service.contract import (
    Artifact,
    DataReport,
    Generation,
    Job,
    JobError,
    JobStatus,
    MetricPoint,
    Phase,
    Progress,
)
from service.metrics import WorkerMetrics
from service.settings import Settings
from service.store import Store

log = logging.getLogger("ftune.worker")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
"""What an unreachable Redis raises; anything else is a bug and is not retried."""
CANCEL_GRACE_SECONDS = 30.0
"""How long a cancelled child gets to stop by itself before it is killed."""
CANCEL_POLL_SECONDS = 1.0
"""How often the record is read for a cancel between lease renewals: one small GET a second
while a job runs (the API has answered `cancelled` already)."""
MAX_PENDING = 10_000
"""Events kept while Redis is unreachable; past it, metric points and log lines are dropped."""
_DROPPABLE = ("metrics", "log")
R = TypeVar("R")


class Outcome(msgspec.Struct, kw_only=True):
    """What the child sends last: its result or its error."""

    artifacts: list[Artifact] = []
    final_metrics: dict[str, float] = {}
    error: JobError | None = None
    cancelled: bool = False
    stopped: bool = False
    """A planned stop: a checkpoint of the step reached is stored; re-queue, don't count it."""


class Backoff:
    """Capped exponential backoff while Redis is unreachable; logs the outage once each way."""

    def __init__(self, cap: float, first: float = 0.25) -> None:
        self.first, self.cap = first, cap
        self.delay = first
        self.next_try = 0.0
        self.down_since: float | None = None

    def ready(self) -> bool:
        return time.monotonic() >= self.next_try

    def failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("Redis is unreachable (%s); training goes on, retrying", exc)
        self.next_try = now + self.delay
        self.delay = min(self.delay * 2, self.cap)

    def succeeded(self) -> float | None:
        """Seconds Redis was unreachable, if it just came back."""
        down, self.down_since, self.delay = self.down_since, None, self.first
        if down is None:
            return None
        seconds = time.monotonic() - down
        log.warning("Redis is reachable again after %.1f s", seconds)
        return seconds

    async def retry(self, op: Callable[[], Awaitable[R]]) -> R:
        """`op()` until Redis answers: for writes that must land (how the job ended)."""
        while True:
            try:
                result = await op()
            except REDIS_DOWN as exc:
                self.failed(exc)
                await asyncio.sleep(max(self.next_try - time.monotonic(), 0.0))
                continue
            self.succeeded()
            return result


def backoff_for(settings: Settings) -> Backoff:
    """Retries at least three times per lease period, so that a worker renews its lease well
    within the reaper's grace after Redis returns."""
    return Backoff(cap=min(5.0, settings.lease_seconds / 3))


class Supervisor:
    """Forwards one attempt's events to the store and tracks what the record says about it."""

    def __init__(
        self,
        store: Store,
        job: Job,
        settings: Settings,
        worker: str,
        metrics: WorkerMetrics,
    ) -> None:
        self.store, self.job_id, self.attempt = store, job.id, job.attempt
        self.settings, self.worker, self.metrics = settings, worker, metrics
        self.phase: Phase | None = None
        self.outcome: Outcome | None = None
        self.pending: deque[tuple[str, Any]] = deque()
        self.progress: Any = None
        self.dropped = 0
        self.cancel_requested = False
        self.taken = False
        """The record no longer shows this attempt running: the reaper gave the job away
        while this worker could not reach Redis. Nothing more may be written."""
        self.backoff = backoff_for(settings)

    def take(self, events: multiprocessing.Queue[tuple[str, Any]]) -> None:
        """Move the child's events into the buffer, without touching Redis."""
        while True:
            try:
                kind, payload = events.get_nowait()
            except stdqueue.Empty:
                return
            if kind == "outcome":
                self.outcome = msgspec.json.decode(payload, type=Outcome)
            elif kind == "progress":
                self.progress = payload  # only the newest matters
            elif len(self.pending) >= MAX_PENDING and kind in _DROPPABLE:
                self.dropped += 1
            else:
                self.pending.append((kind, payload))

    async def sync(self, renew: bool = True) -> None:
        """Renew the lease (unless told not to) and read the record (cancel asked? still
        ours?); raises REDIS_DOWN."""
        if renew:
            await self.store.renew_lease(self.job_id, self.worker, self.settings.lease_seconds)
        job = await self.store.get_job(self.job_id, None)
        self.cancel_requested = job.cancel_requested
        if job.status != JobStatus.running or job.attempt != self.attempt:
            self.taken = True

    async def forward(self) -> None:
        await self.sync()
        await self.flush()

    async def flush(self) -> None:
        """Write the buffered events in order; raises REDIS_DOWN with the rest still buffered."""
        while self.pending and not self.taken:
            if self.pending[0][0] == "metrics":
                await self._metrics_run()
                continue
            await self.apply(*self.pending[0])
            self.pending.popleft()
        if self.progress is not None and not self.taken:
            await self.apply("progress", self.progress)
            self.progress = None
        if self.dropped and not self.taken:
            await self.store.add_log(
                self.job_id,
                f"Redis was unreachable: {self.dropped} metric points and log lines could not "
                "be kept here (the artifact's metrics.jsonl has every point)",
            )
            self.dropped = 0

    async def _metrics_run(self) -> None:
        """The metric points at the head of the buffer: one record write for all of them (with a
        log every step, one per step was most of this process's CPU), then each point appended.
        The idempotent write first: a retry after Redis dropped in between adds no second copy
        of a point."""
        run = list(itertools.takewhile(lambda e: e[0] == "metrics", self.pending))
        latest: dict[str, float] = {}
        for _, (_, _, values) in run:
            latest.update(values)
        await self.store.update_job(
            self.job_id,
            lambda j: msgspec.structs.replace(j, latest_metrics={**j.latest_metrics, **latest}),
        )
        for _, (step, at, values) in run:
            await self.store.add_metrics(
                self.job_id, MetricPoint(step=step, time=at, values=values)
            )
            self.metrics.observe(values)
            self.pending.popleft()

    async def apply(self, kind: str, payload: Any) -> None:
        if kind == "phase":
            self.phase = Phase(payload)
            logs.update_context(phase=self.phase.value)
            phase = self.phase
            await self.store.update_job(
                self.job_id, lambda j: msgspec.structs.replace(j, phase=phase)
            )
        elif kind == "progress":
            progress = msgspec.convert(payload, Progress, from_attributes=True)
            self.metrics.step.set(progress.step)
            await self.store.update_job(
                self.job_id, lambda j: msgspec.structs.replace(j, progress=progress)
            )
        elif kind == "log":
            await self.store.add_log(self.job_id, str(payload))
        elif kind == "update":
            fields = dict(payload)
            if "eval_generations" in fields:
                fields["eval_generations"] = msgspec.convert(
                    fields["eval_generations"], list[Generation], from_attributes=True
                )
            if "data" in fields:
                fields["data"] = msgspec.convert(fields["data"], DataReport, from_attributes=True)
            await self.store.update_job(self.job_id, lambda j: msgspec.structs.replace(j, **fields))

    async def supervise(
        self,
        child: Any,
        events: multiprocessing.Queue[tuple[str, Any]],
        cancel: Any,
        stop_child: Callable[[Any], None],
    ) -> None:
        """Until the child reports its outcome or ends: forward, renew, watch. Returns with the
        buffer written (the child may still be exiting: the caller reaps it), or with `taken`
        set (the child then stopped at once: its work belongs to another attempt)."""
        renew_every = max(self.settings.lease_seconds / 3, 0.5)
        next_renew = next_look = 0.0
        kill_at: float | None = None
        stopping: asyncio.Future[None] | None = None
        while True:
            self.take(events)
            alive = child.is_alive()
            if not alive:
                await asyncio.sleep(0.1)  # let the queue's feeder flush the last events
                self.take(events)
            now = time.monotonic()
            if self.backoff.ready():
                try:
                    if now >= next_renew or self.backoff.down_since is not None:
                        await self.sync()  # the lease first: it is what a long outage risks
                        next_renew, next_look = now + renew_every, now + CANCEL_POLL_SECONDS
                    elif now >= next_look:  # a cancel is seen within a second
                        await self.sync(renew=False)
                        next_look = now + CANCEL_POLL_SECONDS
                    await self.flush()
                    self.backoff.succeeded()
                except REDIS_DOWN as exc:
                    self.backoff.failed(exc)
            if self.taken:
                # Killed, not asked: a checkpoint written now would be another attempt's.
                log.warning("job %s attempt %s was re-queued meanwhile", self.job_id, self.attempt)
                child.kill()
                await stopping if stopping is not None else asyncio.to_thread(child.join, 5)
                return
            if self.cancel_requested and not cancel.is_set():
                cancel.set()
                kill_at = now + CANCEL_GRACE_SECONDS
            if kill_at is not None and now >= kill_at and stopping is None:
                # Up to 15 s: in a thread, while this loop goes on renewing the lease.
                stopping = asyncio.ensure_future(asyncio.to_thread(stop_child, child))
            if not alive or self.outcome is not None:  # the outcome is the child's last event
                if self.pending or self.progress is not None or self.backoff.down_since:
                    await self.backoff.retry(self.forward)
                if stopping is not None:
                    await stopping
                return
            await asyncio.sleep(0.2)
