"""The arq worker: claim a job, train it in a child process, write how it ended.

The event loop never trains. Training runs in a spawned child so that, while it works, this
process keeps renewing the job's lease, forwarding metrics to Redis and watching for a
cancel. A worker that dies stops renewing; the scheduler's reaper (service/leases.py, run by
the API whether or not any worker exists) re-queues the job as a new attempt, which resumes
from the last checkpoint. arq's own recovery would wait `job_timeout + 10 s`, hours for
training.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue as stdqueue
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import msgspec
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func
from prometheus_client import start_http_server

from service import logs, queue
from service.blobs import open_store
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
from service.leases import requeue
from service.metrics import WorkerMetrics, record_job_duration
from service.settings import Settings
from service.store import Conflict, NotFound, Store, TerminalHook, new_id

log = logging.getLogger("ftune.worker")

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends this process when its parent dies (Linux)."""

CANCEL_GRACE_SECONDS = 30.0
"""How long a cancelled child gets to stop by itself before it is killed."""


class Outcome(msgspec.Struct, kw_only=True):
    """What the child sends last: its result or its error."""

    artifacts: list[Artifact] = []
    final_metrics: dict[str, float] = {}
    error: JobError | None = None
    cancelled: bool = False


# -- the child process ---------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """A child orphaned by a SIGKILLed worker must not train on for nobody: not even the second a
    polling watch would take, in which the tiny test model trains a dozen steps and writes a
    checkpoint that the next attempt resumes from. On Linux the kernel kills it with its
    parent (PR_SET_PDEATHSIG); the watch thread covers other systems and a parent that died
    before the request was made."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _child(
    job_json: bytes,
    settings: Settings,
    events: multiprocessing.Queue[tuple[str, Any]],
    cancel: Any,
    parent: int,
) -> None:
    _die_with_parent(parent)
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    from gpu_worker.errors import JobFailure
    from gpu_worker.pipeline import run
    from gpu_worker.reporter import JobCancelled, QueueReporter
    from service.publish import PublishError

    job = msgspec.json.decode(job_json, type=Job)
    logs.bind(job_id=job.id, tenant=job.tenant, attempt=job.attempt)
    workdir = settings.work_dir / job.id
    try:
        store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        result = run(job, workdir, QueueReporter(events, cancel), settings=settings, store=store)
        outcome = Outcome(artifacts=result.artifacts, final_metrics=result.final_metrics)
    except JobCancelled:
        outcome = Outcome(cancelled=True)
    except (JobFailure, PublishError) as exc:
        outcome = Outcome(error=JobError(type=type(exc).__name__, message=str(exc)))
    except Exception as exc:
        logging.getLogger("ftune.worker").exception("job %s failed", job.id)
        outcome = Outcome(error=JobError(type=type(exc).__name__, message=str(exc)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    events.put(("outcome", msgspec.json.encode(outcome)))
    events.close()
    events.join_thread()


# -- the task --------------------------------------------------------------------------------


def _claim(attempt: int, worker: str) -> Any:
    def change(job: Job) -> Job:
        if job.status != JobStatus.queued or job.attempt != attempt:
            raise Conflict(f"job {job.id} attempt {attempt} is not queued")
        return msgspec.structs.replace(
            job,
            status=JobStatus.running,
            started_at=job.started_at or time.time(),
            worker=worker,
            phase=None,
            error=None,
        )

    return change


class _Supervisor:
    """Forwards the child's events to the store and decides when to stop it."""

    def __init__(
        self, store: Store, job: Job, settings: Settings, worker: str, metrics: WorkerMetrics
    ) -> None:
        self.store, self.job_id, self.settings, self.worker = store, job.id, settings, worker
        self.metrics = metrics
        self.phase: Phase | None = None
        self.outcome: Outcome | None = None

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
        elif kind == "metrics":
            step, at, values = payload
            self.metrics.observe(values)
            await self.store.add_metrics(
                self.job_id, MetricPoint(step=step, time=at, values=values)
            )
            await self.store.update_job(
                self.job_id,
                lambda j: msgspec.structs.replace(j, latest_metrics={**j.latest_metrics, **values}),
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
        elif kind == "outcome":
            self.outcome = msgspec.json.decode(payload, type=Outcome)

    async def drain(self, events: multiprocessing.Queue[tuple[str, Any]]) -> None:
        while True:
            try:
                kind, payload = events.get_nowait()
            except stdqueue.Empty:
                return
            await self.apply(kind, payload)


async def claim_next(ctx: dict[str, Any], *legacy: Any) -> Job | str:
    """Start the attempt fair dispatch picks for this worker's token: the claimed job, or
    why none ("idle": nothing queued; "deferred": every tenant with work is at its limit).

    `legacy` are the (job id, attempt) a token queued before fair dispatch carried: that
    attempt is not in any pending set yet, so it is added first (with a token of its own).
    """
    store: Store = ctx["store"]
    settings: Settings = ctx["settings"]
    pool: ArqRedis = ctx["redis"]
    worker: str = ctx["worker_id"]
    if legacy:
        job_id, attempt = legacy
        with contextlib.suppress(NotFound):
            old = await store.get_job(job_id, None)
            if old.status == JobStatus.queued and old.attempt == attempt:
                await queue.enqueue(
                    pool, old, queue_name=settings.queue_name, token=new_id("dispatch")
                )
    while True:
        picked = await queue.pick(
            pool, ctx["job_id"], ctx["limits"], claim_seconds=settings.lease_seconds
        )
        if picked is None:
            return "idle"
        if not isinstance(picked, queue.Picked):
            await queue.defer(pool, queue_name=settings.queue_name)
            return "deferred"
        await store.renew_lease(picked.job_id, worker, settings.lease_seconds)
        try:
            job = await store.update_job(picked.job_id, _claim(picked.attempt, worker))
        except (Conflict, NotFound) as exc:  # cancelled meanwhile: pick another
            if not await _runs_elsewhere(store, picked.job_id):  # its lease is another's
                await store.drop_lease(picked.job_id)
            await queue.unclaim(pool, picked, dropped_by=ctx["job_id"])
            log.info("skipping %s attempt %s: %s", picked.job_id, picked.attempt, exc)
            continue
        await queue.unclaim(pool, picked)
        return job


async def _runs_elsewhere(store: Store, job_id: str) -> bool:
    try:
        return (await store.get_job(job_id, None)).status == JobStatus.running
    except NotFound:
        return False


async def run_job(ctx: dict[str, Any], *legacy: Any) -> str:
    """One dispatch token: claim the fairest queued attempt and run it."""
    store: Store = ctx["store"]
    settings: Settings = ctx["settings"]
    job = await claim_next(ctx, *legacy)
    if isinstance(job, str):
        return job
    job_id, attempt = job.id, job.attempt
    logs.update_context(job_id=job_id, tenant=job.tenant, attempt=attempt)
    log.info("job %s attempt %s started", job_id, attempt)
    mp = multiprocessing.get_context("spawn")
    events: multiprocessing.Queue[tuple[str, Any]] = mp.Queue()
    cancel = mp.Event()
    child = mp.Process(
        target=_child,
        args=(msgspec.json.encode(job), settings, events, cancel, os.getpid()),
        name=f"ftune-train-{job_id}",
        daemon=True,
    )
    child.start()
    ctx["child"] = child
    metrics: WorkerMetrics = ctx["metrics"]
    supervisor = _Supervisor(store, job, settings, ctx["worker_id"], metrics)
    metrics.busy.set(1)
    try:
        await _supervise(supervisor, child, events, cancel)
    except asyncio.CancelledError:
        # arq is shutting down (SIGTERM past the grace period) or the task was aborted:
        # stop training and hand the job to another worker, which resumes it.
        _stop(child)
        await asyncio.shield(requeue(store, ctx["redis"], settings, job_id, "the worker shut down"))
        raise
    finally:
        ctx.pop("child", None)
        metrics.busy.set(0)
        await store.drop_lease(job_id)
    status = await _finish(store, supervisor, child)
    await queue.finished(ctx["redis"], job_id)
    metrics.finished.labels(status=status).inc()
    return status


async def _supervise(
    supervisor: _Supervisor,
    child: Any,
    events: multiprocessing.Queue[tuple[str, Any]],
    cancel: Any,
) -> None:
    store, settings = supervisor.store, supervisor.settings
    renew_every = max(settings.lease_seconds / 3, 0.5)
    next_renew = 0.0
    kill_at: float | None = None
    while True:
        await supervisor.drain(events)
        if not child.is_alive():
            await asyncio.sleep(0.1)  # let the queue's feeder flush the last events
            await supervisor.drain(events)
            return
        now = time.monotonic()
        if now >= next_renew:
            next_renew = now + renew_every
            await store.renew_lease(supervisor.job_id, supervisor.worker, settings.lease_seconds)
            job = await store.get_job(supervisor.job_id, None)
            if job.cancel_requested and not cancel.is_set():
                cancel.set()
                kill_at = now + CANCEL_GRACE_SECONDS
        if kill_at is not None and now >= kill_at:
            _stop(child)
        await asyncio.sleep(0.2)


def _stop(child: Any) -> None:
    if child.is_alive():
        child.terminate()
        child.join(10)
    if child.is_alive():
        child.kill()
        child.join(5)


async def _finish(store: Store, supervisor: _Supervisor, child: Any) -> str:
    outcome = supervisor.outcome
    phase = supervisor.phase
    now = time.time()
    current = await store.get_job(supervisor.job_id, None)
    if outcome is None:
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        died = JobError(
            type="WorkerProcessDied",
            message=f"the training process died ({how}); if it was killed for memory, "
            "lower batch_size or max_length, or use a worker with more memory",
            phase=phase,
        )
        outcome = Outcome(cancelled=current.cancel_requested, error=died)
    error: JobError | None = None
    if outcome.cancelled or (current.cancel_requested and outcome.error is not None):
        status = JobStatus.cancelled
    elif outcome.error is not None:
        status, error = JobStatus.failed, msgspec.structs.replace(outcome.error, phase=phase)
    else:
        status = JobStatus.succeeded

    def finish(job: Job) -> Job:
        return msgspec.structs.replace(
            job,
            status=status,
            finished_at=now,
            artifacts=outcome.artifacts,
            latest_metrics={**job.latest_metrics, **outcome.final_metrics},
            error=error,
            phase=None if status == JobStatus.succeeded else job.phase,
        )

    job = await store.update_job(supervisor.job_id, finish)
    if job.started_at is not None:
        await record_job_duration(store.redis, now - job.started_at)
    log.info("job %s %s", supervisor.job_id, status.value)
    return status.value


# -- arq wiring --------------------------------------------------------------------------------


def build_worker(settings: Settings, *, on_terminal: Sequence[TerminalHook]) -> Worker:
    """A worker for one GPU: one job at a time, hours of timeout, retries owned by us.

    arq's retries stay off (max_tries=1): a lost attempt is re-queued by the reaper as a new
    attempt with its own arq id; arq re-running the old one would train twice. `on_terminal`
    are the store's hooks for a job's end (the caller registers the webhook one): the worker
    knows no feature.
    """

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["store"] = Store.from_url(
            settings.redis_url, metrics_maxlen=settings.metrics_maxlen, on_terminal=on_terminal
        )
        ctx["worker_id"] = f"{socket.gethostname()}:{os.getpid()}"
        ctx["metrics"] = metrics
        ctx["limits"] = queue.limits_from_settings(settings)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["store"].close()

    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
    timeout = timedelta(hours=settings.job_timeout_hours)
    return Worker(
        functions=[func(run_job, name=queue.TASK, timeout=timeout, max_tries=1)],
        queue_name=settings.queue_name,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=1,
        job_timeout=timeout,
        max_tries=1,
        retry_jobs=False,
        allow_abort_jobs=True,
        job_completion_wait=settings.worker_grace_seconds,
        keep_result=timedelta(days=1),
        poll_delay=0.5,
    )


def run_worker(settings: Settings, *, on_terminal: Sequence[TerminalHook]) -> None:
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    build_worker(settings, on_terminal=on_terminal).run()
