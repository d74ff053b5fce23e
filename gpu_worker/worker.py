"""The arq worker: claim a job, train it in a child process, write how it ended.

The event loop never trains. Each job trains in a child process of its own, spawned before the
job while the worker waits (gpu_worker/warm.py), so that, while it works, this process keeps
renewing the job's lease, forwarding metrics to Redis and watching for a cancel
(gpu_worker/supervisor.py, which also rides out a Redis outage). The job's status is written
as soon as the child reports its outcome; the child is reaped after that. A worker that dies
stops renewing; the scheduler's reaper (service/leases.py, run by the API whether or not any
worker exists) re-queues the job as a new attempt, which resumes from the last checkpoint.
arq's own recovery would wait `job_timeout + 10 s`, hours for training.

A planned stop (SIGTERM: rolling upgrade, drain, scale-down) asks the child to checkpoint at
its next step and stop; the job is re-queued without spending an attempt and the next one
resumes at exactly that step. `worker_grace_seconds` bounds the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func
from prometheus_client import start_http_server

from gpu_worker.supervisor import REDIS_DOWN, Backoff, Outcome, Supervisor, backoff_for
from gpu_worker.warm import TrainingProcess, Warm, sweep_workdirs
from service import logs, queue, tenants
from service.contract import (
    Job,
    JobError,
    JobStatus,
)
from service.leases import requeue
from service.metrics import WorkerMetrics, record_job_duration
from service.settings import Settings, SettingsError
from service.store import Conflict, NotFound, Store, TerminalHook, new_id

log = logging.getLogger("ftune.worker")

REDIS_TIMEOUT_SECONDS = 10.0
"""Connect and reply timeout of the worker's Redis connections: a Redis host that vanished
(no refusal, no reply) must count as unreachable, not hang the supervisor for minutes."""
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
    worker: str = ctx["worker_id"]
    job = await claim_next(ctx, *legacy)
    if isinstance(job, str):
        return job
    job_id, attempt = job.id, job.attempt
    logs.update_context(job_id=job_id, tenant=job.tenant, attempt=attempt)
    log.info("job %s attempt %s started", job_id, attempt)
    warm: Warm = ctx["warm"]
    proc = warm.start(job)
    shutdown: _Shutdown = ctx["shutdown"]
    shutdown.watch(proc.stop)
    metrics: WorkerMetrics = ctx["metrics"]
    supervisor = Supervisor(store, job, settings, worker, metrics)
    metrics.busy.set(1)
    try:
        await supervisor.supervise(proc.process, proc.events, proc.cancel, _stop)
        status = await _finish(ctx, supervisor, proc)
        if status in TERMINAL:  # arq ends the token itself; forget which job it ran
            token: str = ctx["job_id"]
            await supervisor.backoff.retry(lambda: queue.finished(ctx["redis"], job_id, token))
    except asyncio.CancelledError:
        _stop(proc.process)
        if shutdown.requested:
            # The grace after SIGTERM ran out before the child checkpointed and stopped:
            # hand the job on; still a planned stop.
            await asyncio.shield(
                requeue(
                    store,
                    ctx["redis"],
                    settings,
                    job_id,
                    "the worker shut down before the job could checkpoint",
                    planned=True,
                    attempt=attempt,
                )
            )
        else:  # arq's job timeout: re-queued, the job would run out its time again, for ever
            await asyncio.shield(_time_out(ctx, supervisor))
        raise
    finally:
        shutdown.forget(proc.stop)
        metrics.idle()
        # The outcome is written: only now wait for the process to go (killed if it lingers).
        await warm.finished(proc, respawn=not shutdown.requested)
    metrics.finished.labels(status=status).inc()
    return status


async def _time_out(ctx: dict[str, Any], supervisor: Supervisor) -> None:
    """End the attempt that ran past FTUNE_JOB_TIMEOUT_HOURS: failed, saying so (cancelled if
    a cancel was asked for); its dispatch token goes, as a finished job's does."""
    store, job_id, attempt = supervisor.store, supervisor.job_id, supervisor.attempt
    hours = supervisor.settings.job_timeout_hours
    error = JobError(
        type="Timeout",
        message=f"the job ran past FTUNE_JOB_TIMEOUT_HOURS ({hours:g} h) and was stopped",
        phase=supervisor.phase,
    )

    def end(job: Job) -> Job:
        if job.status != JobStatus.running or job.attempt != attempt:
            raise Conflict(f"job {job.id} attempt {attempt} is no longer running")
        if job.cancel_requested:
            return msgspec.structs.replace(job, status=JobStatus.cancelled, finished_at=time.time())
        return msgspec.structs.replace(
            job, status=JobStatus.failed, finished_at=time.time(), error=error
        )

    try:
        job = await supervisor.backoff.retry(lambda: store.update_job(job_id, end))
    except (Conflict, NotFound) as exc:
        log.warning("%s", exc)
        return
    await supervisor.backoff.retry(lambda: store.drop_lease(job_id))
    await supervisor.backoff.retry(lambda: store.add_log(job_id, error.message))
    token: str = ctx["job_id"]
    await supervisor.backoff.retry(lambda: queue.finished(ctx["redis"], job_id, token))
    log.warning("job %s attempt %s %s: %s", job_id, attempt, job.status.value, error.message)


def _stop(child: Any) -> None:
    """SIGTERM (the child then stops at its next step, checkpointing unless cancelled), then
    SIGKILL if it is still there 10 s later."""
    if child.is_alive():
        child.terminate()
        child.join(10)
    if child.is_alive():
        child.kill()
        child.join(5)


async def _finish(ctx: dict[str, Any], supervisor: Supervisor, proc: TrainingProcess) -> str:
    """Write how the attempt ended (retrying while Redis is unreachable): a terminal status,
    or, after a planned stop (or a process that died before it read the job, killed while it
    waited: the job never started), the job back on the queue as its next attempt. A process
    that died while still importing re-queues the job spending an attempt: an image that
    cannot import would otherwise loop for ever."""
    store, backoff, job_id = supervisor.store, supervisor.backoff, supervisor.job_id
    child = proc.process
    if supervisor.taken:
        return "taken"
    outcome = supervisor.outcome
    never_took = outcome is None and not proc.took.is_set()
    if never_took and not proc.ready.is_set():
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        why = f"the training process died ({how}) while it imported the training stack"
        await backoff.retry(
            lambda: requeue(
                store, ctx["redis"], supervisor.settings, job_id, why, attempt=supervisor.attempt
            )
        )
        log.warning("job %s attempt %s: %s", job_id, supervisor.attempt, why)
        return "requeued"
    if never_took or (outcome is not None and outcome.stopped):
        why = (
            "the waiting training process died before it read the job; a fresh one takes it"
            if never_took
            else "the worker stopped (planned: checkpoint saved)"
        )
        await backoff.retry(
            lambda: requeue(
                store,
                ctx["redis"],
                supervisor.settings,
                job_id,
                why,
                planned=True,
                attempt=supervisor.attempt,
            )
        )
        log.info("job %s attempt %s re-queued: %s", job_id, supervisor.attempt, why)
        return "requeued"
    phase = supervisor.phase
    now = time.time()
    current = await backoff.retry(lambda: store.get_job(job_id, None))
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
    attempt = supervisor.attempt

    def finish(job: Job) -> Job:
        if job.status != JobStatus.running or job.attempt != attempt:
            raise Conflict(f"job {job.id} attempt {attempt} is no longer running")
        # Read in the transaction that ends the job: a cancel asked before it (the API has
        # answered `cancelled`) ends it cancelled, even one that came after the last step;
        # one asked after it is refused as too late.
        error: JobError | None = None
        if outcome.cancelled or job.cancel_requested:
            status = JobStatus.cancelled
        elif outcome.error is not None:
            status, error = JobStatus.failed, msgspec.structs.replace(outcome.error, phase=phase)
        else:
            status = JobStatus.succeeded
        return msgspec.structs.replace(
            job,
            status=status,
            finished_at=now,
            artifacts=outcome.artifacts,
            latest_metrics={**job.latest_metrics, **outcome.final_metrics},
            error=error,
            phase=None if status == JobStatus.succeeded else job.phase,
        )

    try:
        job = await backoff.retry(lambda: store.update_job(job_id, finish))
    except Conflict as exc:
        log.warning("%s", exc)
        return "taken"
    status = job.status
    if status == JobStatus.cancelled and job.artifacts:
        where = ", ".join(a.uri for a in job.artifacts)
        await backoff.retry(
            lambda: store.add_log(
                job_id, f"cancelled after its artifacts were published; they stay at {where}"
            )
        )
    await backoff.retry(lambda: store.drop_lease(job_id))
    if (started := job.started_at) is not None:
        await backoff.retry(lambda: record_job_duration(store.redis, now - started))
    log.info("job %s %s", job_id, status.value)
    return status.value


TERMINAL = {s.value for s in JobStatus if s.terminal}


def dispatch_shares(settings: Settings) -> Callable[[str], queue.Share]:
    """Each tenant's share of the workers and running-jobs limit, from the tenants file and
    the settings' defaults. The file is read again when it changes (the kubelet refreshes a
    mounted Secret in place), as grants are for each job: workers started at different times
    enforce the same limits. A file that no longer reads keeps the last good one, logged."""
    path = settings.api_keys_file
    stamp, known = _stamp(path), tenants.load(settings)

    def share(tenant: str) -> queue.Share:
        nonlocal stamp, known
        if (now := _stamp(path)) != stamp:
            stamp = now
            try:
                known = tenants.load(settings)
            except SettingsError as exc:
                log.error("the tenants file changed but cannot be used, keeping the last: %s", exc)
        limits = tenants.limits_for(settings, known, tenant)
        return queue.Share(weight=limits.share, max_running=limits.running_jobs)

    return share


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (None: no file)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# -- arq wiring --------------------------------------------------------------------------------


class _Shutdown:
    """What arq's signal handler shares with the running task (arq gives each task a copy of
    the worker's ctx, so a flag set in it later would not be seen)."""

    def __init__(self) -> None:
        self.requested = False
        self._stops: list[Any] = []

    def request(self) -> None:
        self.requested = True
        for stop in self._stops:
            stop.set()

    def watch(self, stop: Any) -> None:
        """`stop` (the child's multiprocessing Event) is set on a shutdown, even a past one."""
        self._stops.append(stop)
        if self.requested:
            stop.set()

    def forget(self, stop: Any) -> None:
        self._stops.remove(stop)


class _Worker(Worker):
    """arq's Worker with three changes for training jobs.

    SIGTERM (and SIGINT) ask the running job to checkpoint at its next step and stop, before
    arq waits up to `job_completion_wait` for it and then cancels what is left.

    arq lets a Redis error escape its polling loop, which ends the worker and with it the
    training child; here an unreachable Redis is retried with backoff while the job trains on.

    arq sleeps its poll delay between polls, so a job submitted to an idle worker waited half
    of it on average; here arq's delay is zero and `_pause` paces the polls instead: an idle
    worker polls as soon as a token is added (`queue.WakeUps`), or after
    `worker_poll_seconds` at the latest, and checks for aborts only while it runs a job.
    """

    _polled_free = False
    """Whether the last poll was made with a free job slot (then only a new token, or time,
    can give the next one anything to start)."""

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self._ask_job_to_stop()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self._ask_job_to_stop()
        super().handle_sig(signum)

    def _ask_job_to_stop(self) -> None:
        self.ctx["shutdown"].request()
        if (warm := self.ctx.get("warm")) is not None:
            warm.closing = True  # no new training process: the worker is going

    async def _poll_iteration(self) -> None:
        backoff: Backoff = self.ctx["poll_backoff"]
        await self._pause()
        if not backoff.ready():
            return
        try:
            await super()._poll_iteration()
        except REDIS_DOWN as exc:
            backoff.failed(exc)
        else:
            backoff.succeeded()

    async def _pause(self) -> None:
        """Before each poll: a busy worker waits the poll delay (it polls then for aborts) or
        until its job ends, then polls at once (tokens may have queued behind it); one that
        was free at its last poll waits for a wake-up, up to the poll delay."""
        seconds = self.ctx["settings"].worker_poll_seconds
        wake_ups: queue.WakeUps = self.ctx["wake_ups"]
        free = self.job_counter < self.max_jobs
        if not free:
            await wake_ups.drain()
            if running := [t for t in self.tasks.values() if not t.done()]:
                # arq's own done-callback, added first, frees the job slot before this returns
                await asyncio.wait(running, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(seconds)
        elif self._polled_free:
            await wake_ups.wait(seconds)
        self._polled_free = free

    async def _cancel_aborted_jobs(self) -> None:
        """arq's check for aborted jobs, only while this worker has one: an idle worker has
        nothing to abort, and the check was 4 of the 5 Redis commands of its every poll."""
        if self.tasks:
            await super()._cancel_aborted_jobs()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, one id at a time: a Redis error between taking a job slot and starting the
        task would otherwise keep the slot taken for good (with max_jobs=1, a worker that
        never picks a job again)."""
        for job_id in job_ids:
            before = self.tasks.get(job_id.decode())
            try:
                await super().start_jobs([job_id])
            except REDIS_DOWN:
                if self.tasks.get(job_id.decode()) is before:
                    self._release_sem_dec_counter_on_complete()
                raise


def build_worker(
    settings: Settings, *, on_terminal: Sequence[TerminalHook], burst: bool = False
) -> Worker:
    """A worker for one GPU: one job at a time, hours of timeout, retries owned by us.

    arq's retries stay off (max_tries=1): a lost attempt is re-queued by the reaper as a new
    attempt with its own arq id; arq re-running the old one would train twice. `on_terminal`
    are the store's hooks for a job's end (the caller registers the webhook one): the worker
    knows no feature. `burst`: take one job, finish it and return (one job per pod).
    """

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["store"] = Store.from_url(
            settings.redis_url,
            metrics_maxlen=settings.metrics_maxlen,
            on_terminal=on_terminal,
            timeout=REDIS_TIMEOUT_SECONDS,
        )
        ctx["worker_id"] = f"{socket.gethostname()}:{os.getpid()}"
        if swept := await sweep_workdirs(settings, ctx["store"]):
            log.info("removed %d attempt folders left by an earlier worker", swept)
        ctx["metrics"] = metrics
        ctx["limits"] = dispatch_shares(settings)
        ctx["wake_ups"] = queue.WakeUps(ctx["redis"], settings.queue_name)
        ctx["warm"] = warm = Warm(settings, once=burst)
        warm.ensure()
        ctx["warm_keeper"] = asyncio.create_task(warm.keep())

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "warm" in ctx:
            ctx["warm_keeper"].cancel()
            await ctx["warm"].close()
        await ctx["wake_ups"].close()
        await ctx["store"].close()

    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
    timeout = timedelta(hours=settings.job_timeout_hours)
    return _Worker(
        ctx={"settings": settings, "shutdown": _Shutdown(), "poll_backoff": backoff_for(settings)},
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
        poll_delay=0,  # _Worker._pause paces the polls
        burst=burst,
        max_burst_jobs=1 if burst else -1,
    )


def run_worker(
    settings: Settings, *, on_terminal: Sequence[TerminalHook], burst: bool = False
) -> None:
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    build_worker(settings, on_terminal=on_terminal, burst=burst).run()
