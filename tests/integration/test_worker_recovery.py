"""The reaper: running jobs whose worker stopped renewing the lease go back to the queue."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import msgspec
import redis

from gpu_worker import supervisor, worker
from gpu_worker.warm import sweep_workdirs
from gpu_worker.worker import dispatch_shares, run_job
from service import leases, queue
from service.blobs import open_store
from service.contract import Artifact, DatasetRef, Job, JobSpec, JobStatus, Phase
from service.metrics import WorkerMetrics
from service.openai.jobs import job_object
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import Store, new_id


def running_job(attempt: int = 0, **over: object) -> Job:
    now = time.time()
    return Job(
        id=new_id("job"),
        tenant="alice",
        status=JobStatus.queued,
        spec=JobSpec(base_model="org/model", dataset_id="ds_x"),
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=1, format="standard"),
        created_at=now,
        updated_at=now,
        attempt=attempt,
        **over,  # type: ignore[arg-type]
    )


async def put_running(store: Store, job: Job) -> None:
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    await store.update_job(
        job.id,
        lambda j: msgspec.structs.replace(j, status=JobStatus.running, phase=Phase.training),
    )


def settings(redis_url: str) -> Settings:
    return replace(Settings(), redis_url=redis_url, max_attempts=3, lease_seconds=2)


async def reap_once(store: Store, s: Settings) -> list[str]:
    pool = await queue.connect(s.redis_url)
    try:
        return await leases.reap(store, pool, s)
    finally:
        await pool.aclose()


async def test_expired_lease_requeues_as_next_attempt(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    job = running_job()
    await put_running(store, job)
    await store.renew_lease(job.id, "w1", 30)
    assert await reap_once(store, settings(redis_url)) == []  # lease alive: left alone
    await store.drop_lease(job.id)
    assert await reap_once(store, settings(redis_url)) == [job.id]
    after = await store.get_job(job.id, None)
    assert after.status == JobStatus.queued and after.attempt == 1 and after.phase is None
    queued = redis.Redis.from_url(redis_url).zrange("ftune:queue", 0, -1)
    assert queued == [f"{job.id}:1".encode()]
    await store.close()


async def test_last_attempt_fails_with_a_clear_error(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    job = running_job(attempt=4, lost_attempts=2)  # two planned stops did not count
    await put_running(store, job)
    await reap_once(store, settings(redis_url))
    after = await store.get_job(job.id, None)
    assert after.status == JobStatus.failed
    assert after.error is not None and after.error.type == "WorkerLost"
    assert "3 lost attempts" in after.error.message and after.error.phase == Phase.training
    await store.close()


async def test_planned_stops_do_not_spend_attempts(redis_url: str) -> None:
    """Upgrades, drains and scale-downs re-queue on SIGTERM: a new attempt number each time
    (arq needs a new id), but max_attempts counts only lost workers."""
    store = Store.from_url(redis_url)
    s = settings(redis_url)
    job = running_job()
    await put_running(store, job)
    pool = await queue.connect(redis_url)
    for attempt in range(5):  # more planned stops than max_attempts (3)
        moved = await leases.requeue(store, pool, s, job.id, "stopped", planned=True)
        assert moved is not None and moved.status == JobStatus.queued
        assert (moved.attempt, moved.lost_attempts) == (attempt + 1, 0)
        await store.update_job(
            job.id, lambda j: msgspec.structs.replace(j, status=JobStatus.running)
        )
    # A stale attempt's worker cannot re-queue the job another attempt now runs.
    assert await leases.requeue(store, pool, s, job.id, "stale", planned=True, attempt=0) is None
    lost = await leases.requeue(store, pool, s, job.id, "the worker running it was lost")
    assert lost is not None and (lost.attempt, lost.lost_attempts) == (6, 1)
    await pool.aclose()
    await store.close()


async def test_lost_job_with_cancel_requested_ends_cancelled(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    job = running_job(cancel_requested=True)
    await put_running(store, job)
    await reap_once(store, settings(redis_url))
    assert (await store.get_job(job.id, None)).status == JobStatus.cancelled
    await store.close()


async def test_reapers_racing_move_a_job_once(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    job = running_job()
    await put_running(store, job)
    s = settings(redis_url)
    results = await asyncio.gather(*(reap_once(store, s) for _ in range(3)))
    assert sorted(results) == [[], [], [job.id]]
    assert (await store.get_job(job.id, None)).attempt == 1
    queued = redis.Redis.from_url(redis_url).zrange("ftune:queue", 0, -1)
    assert queued == [f"{job.id}:1".encode()]
    await store.close()


async def test_stale_attempt_is_skipped_not_run(redis_url: str) -> None:
    """A queue entry of an old attempt (the record moved on to the next one) must not train."""
    store = Store.from_url(redis_url)
    s = settings(redis_url)
    pool = await queue.connect(redis_url)
    job = running_job()
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(msgspec.structs.replace(job, attempt=1))
    await queue.enqueue(pool, job, queue_name=s.queue_name)  # attempt 0's entry
    ctx = {
        "store": store,
        "settings": s,
        "redis": pool,
        "worker_id": "w",
        "job_id": f"{job.id}:0",
        "limits": dispatch_shares(s),
        "metrics": WorkerMetrics(),
    }
    assert await run_job(ctx) == "idle"
    after = await store.get_job(job.id, None)
    assert after.status == JobStatus.queued and after.attempt == 1
    assert await store.redis.get(f"ftune:lease:{job.id}") is None
    await pool.aclose()
    await store.close()


def start_worker(redis_url: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A real `ftune worker` process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "FTUNE_REDIS_URL": redis_url,
        "FTUNE_STORE_URL": f"file://{tmp_path / 'store'}",
        "FTUNE_WORK_DIR": str(tmp_path / "work"),
        "FTUNE_LEASE_SECONDS": "2",
        "FTUNE_MAX_ATTEMPTS": "5",
        "FTUNE_WORKER_METRICS_PORT": "0",
    }
    log = (tmp_path / "worker.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"], env=env, stdout=log, stderr=log
    )


async def test_hard_killed_workers_leave_no_stale_queue_entries(
    redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL the worker running a job twice: after each re-queue the arq queue (what KEDA
    counts) holds exactly the live jobs, and no attempt stays 'in progress'."""
    store, s = Store.from_url(redis_url), replace(settings(redis_url), max_attempts=5)
    pool = await queue.connect(redis_url)
    job = running_job()
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    await queue.enqueue(pool, job, queue_name=s.queue_name)
    for attempt in (0, 1):
        worker = start_worker(redis_url, tmp_path)
        try:
            deadline = time.monotonic() + 60
            while (await store.get_job(job.id, None)).status != JobStatus.running:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                await asyncio.sleep(0.05)
            assert await pool.exists(f"arq:in-progress:{job.id}:{attempt}")
        finally:
            worker.kill()  # SIGKILL: no clean-up of its own
            worker.wait(10)
        await store.drop_lease(job.id)  # as if the lease ran out
        assert await leases.reap(store, pool, s) == [job.id]
        after = await store.get_job(job.id, None)
        assert after.status == JobStatus.queued and after.attempt == attempt + 1
        assert await pool.zrange(s.queue_name, 0, -1) == [f"{job.id}:{attempt + 1}".encode()]
        assert await pool.keys("arq:in-progress:*") == []
        assert await pool.keys("arq:job:*") == [f"arq:job:{job.id}:{attempt + 1}".encode()]
    await pool.aclose()
    await store.close()


async def test_reaper_waits_a_lease_period_after_it_first_reaches_redis(
    redis_url: str, tmp_path: Path
) -> None:
    """After a Redis outage (or at start-up) leases look lapsed that workers are about to
    renew: the reaper gives them one lease period before it takes their jobs."""
    store = Store.from_url(redis_url)
    job = running_job()
    await put_running(store, job)  # no lease at all: as after a long outage
    s = replace(settings(redis_url), lease_seconds=1.0)
    pool = await queue.connect(redis_url)
    scheduler = Scheduler(store, pool, open_store(tmp_path.as_uri()), s)
    assert await scheduler.tick() == []
    await store.renew_lease(job.id, "w1", 30)  # the worker renews within the grace
    await asyncio.sleep(1.1)
    assert await scheduler.tick() == []
    assert (await store.get_job(job.id, None)).status == JobStatus.running
    await store.drop_lease(job.id)  # now it is really gone
    assert await scheduler.tick() == [f"re-queued jobs of lost workers: {job.id}"]
    await pool.aclose()
    await store.close()


async def test_a_starting_worker_removes_attempt_folders_no_running_attempt_owns(
    redis_url: str, tmp_path: Path
) -> None:
    """A worker that died before removing its attempt's folder left it behind (merged models
    are gigabytes): the next worker to start removes it, and keeps the folder of an attempt
    running on another worker sharing the directory, and anything that is not an attempt's."""
    s = replace(settings(redis_url), work_dir=tmp_path / "work")
    store = Store.from_url(redis_url)
    running = running_job(attempt=1)
    await put_running(store, running)
    finished = running_job()
    await store.create_job(finished)
    await store.update_job(
        finished.id, lambda j: msgspec.structs.replace(j, status=JobStatus.cancelled)
    )
    keep = [s.work_dir / f"{running.id}.1", s.work_dir / "hf-cache"]
    gone = [
        s.work_dir / f"{running.id}.0",  # its earlier attempt, lost with its worker
        s.work_dir / f"{finished.id}.0",
        s.work_dir / f"{new_id('job')}.0",  # a job forgotten since
    ]
    for folder in keep + gone:
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "weights.bin").write_bytes(b"0" * 1024)

    assert await sweep_workdirs(s, store) == 3
    assert [f.exists() for f in keep + gone] == [True, True, False, False, False]
    await store.close()


def _exit_at_once() -> None:
    os._exit(9)  # dies as a waiting process killed for memory does: no outcome, no event


async def test_a_process_that_died_before_reading_its_job_requeues_it(redis_url: str) -> None:
    """Killed while waiting, in the moment its job was handed over (it still looked alive):
    the job never started, so it is queued again without spending an attempt; it failed as
    'the training process died' before. One that died still importing the training stack
    (a broken image, too little memory) re-queues spending an attempt, so it cannot loop for
    ever. One that read its job and died still fails."""
    s = settings(redis_url)
    store = Store.from_url(redis_url)
    pool = await queue.connect(redis_url)
    mp = multiprocessing.get_context("spawn")
    cases = (
        (True, False, JobStatus.queued, 0),
        (False, False, JobStatus.queued, 1),
        (True, True, JobStatus.failed, 0),
    )
    try:
        for ready, took, expected, lost in cases:
            job = running_job()
            await put_running(store, job)
            process = mp.Process(target=_exit_at_once)
            process.start()
            process.join(30)
            proc = SimpleNamespace(process=process, ready=mp.Event(), took=mp.Event())
            if ready:
                proc.ready.set()
            if took:
                proc.took.set()
            sup = supervisor.Supervisor(store, job, s, "w", WorkerMetrics())
            status = await worker._finish({"redis": pool}, sup, proc)  # type: ignore[arg-type]
            after = await store.get_job(job.id, None)
            assert after.status == expected, (ready, took, after)
            assert after.lost_attempts == lost, (ready, took, after)
            if not took:
                assert status == "requeued" and after.attempt == 1 and after.error is None
                events = await store.read_events(job.id, after="0", block_ms=None)
                said = [
                    msgspec.json.decode(data).get("message")
                    for _, kind, data in events
                    if kind == "log"
                ]
                assert ("while it imported" in said[-1]) == (not ready), said
            else:
                assert after.error is not None and after.error.type == "WorkerProcessDied"
    finally:
        await pool.aclose()
        await store.close()


async def test_a_cancel_asked_after_the_last_step_still_ends_the_job_cancelled(
    redis_url: str,
) -> None:
    """The API answers `cancelled` at once: a job its training process finished anyway (the
    cancel came while it merged or uploaded) must not end `succeeded`. A cancel the record
    never saw leaves a finished job succeeded."""
    s = settings(redis_url)
    store = Store.from_url(redis_url)
    pool = await queue.connect(redis_url)
    adapter = Artifact(
        kind="adapter",
        uri="file:///store/jobs/x/artifacts/adapter/",
        files=["adapter_config.json"],
        sha256={"adapter_config.json": "0" * 64},
    )
    try:
        for asked, expected in ((True, JobStatus.cancelled), (False, JobStatus.succeeded)):
            job = running_job()
            await put_running(store, job)
            if asked:  # what POST /v1/jobs/{id}/cancel writes for a running job
                await store.update_job(
                    job.id, lambda j: msgspec.structs.replace(j, cancel_requested=True)
                )
            sup = supervisor.Supervisor(store, job, s, "w", WorkerMetrics())
            sup.outcome = supervisor.Outcome(artifacts=[adapter], final_metrics={"loss": 0.5})
            events = multiprocessing.get_context("spawn")
            proc = SimpleNamespace(process=None, ready=events.Event(), took=events.Event())
            proc.ready.set()
            proc.took.set()
            status = await worker._finish({"redis": pool}, sup, proc)  # type: ignore[arg-type]
            after = await store.get_job(job.id, None)
            assert (status, after.status) == (expected.value, expected), after
            assert after.artifacts == [adapter] and after.finished_at is not None
            shown = job_object(after).fine_tuned_model  # as the openai SDK reads the job
            assert shown == (None if asked else adapter.uri)
            logged = [
                msgspec.json.decode(data).get("message")
                for _, kind, data in await store.read_events(job.id, after="0", block_ms=None)
                if kind == "log"
            ]
            assert any("cancelled after its artifacts were published" in m for m in logged) is asked
    finally:
        await pool.aclose()
        await store.close()


class _Alive:
    """A training process that stays alive until a moment (then ends without an outcome)."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def is_alive(self) -> bool:
        return time.monotonic() < self.until


async def test_a_cancel_reaches_the_training_process_before_the_next_lease_renewal(
    redis_url: str,
) -> None:
    """The lease is renewed every 10 s at the default 30 s lease; a cancel is seen sooner."""
    s = replace(Settings(), redis_url=redis_url, lease_seconds=30.0)
    store = Store.from_url(redis_url)
    job = running_job()
    await put_running(store, job)
    sup = supervisor.Supervisor(store, job, s, "w", WorkerMetrics())
    spawn = multiprocessing.get_context("spawn")
    cancel = spawn.Event()

    async def cancel_soon() -> None:  # what POST /v1/jobs/{id}/cancel writes
        await asyncio.sleep(0.3)
        await store.update_job(job.id, lambda j: msgspec.structs.replace(j, cancel_requested=True))

    asked = asyncio.create_task(cancel_soon())
    await sup.supervise(_Alive(2.5), spawn.Queue(), cancel, lambda child: None)
    await asked
    assert cancel.is_set()  # handed to the process within the 2.5 s it lived
    await store.close()
