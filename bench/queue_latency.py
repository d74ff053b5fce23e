"""Queue latency: from `POST /v1/jobs` returning to a worker starting the job.

The moment measured is the job record's `started_at`, written when the worker claims the job
(before it starts the training process). Each job names a base model no worker can load (a
config.json and no weights: `Stack.unloadable_model`), so it would fail in `preparing`; but its
training process spends 8-15 s importing torch and transformers first, so once the claim is seen
the bench ends that process (by its pid, a child of the worker this bench started) and the
worker records the job as failed at once. Jobs go one at a time, each posted once the previous
one has ended and after a random pause of up to one poll delay (so posts do not fall in step
with polls): an idle worker is always waiting, and what is measured is queue-to-claim latency,
not time spent behind other jobs.

The baseline is a bare arq worker with the same poll delay and one job slot, running a no-op
task: `start_time` from arq's own job record minus the moment `enqueue_job` returned. Our
worker is woken by the enqueue instead of waiting for its poll (`queue.WakeUps`); what that
costs an idle worker is counted too: Redis commands per second (`INFO commandstats`) over 10 s
of a worker alone on its own Redis, ours beside the bare arq worker.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
import redis as redis_client
from arq.connections import RedisSettings, create_pool
from arq.jobs import Job as ArqJob

from bench.common import (
    PY,
    QUIET_ENV,
    ROOT,
    Figure,
    Section,
    Stack,
    percentile,
    scratch,
    stop_process,
)
from service.dev.localredis import LocalRedis
from service.settings import Settings
from tests.fixtures.tiny_model import preference_rows

POLL_DELAY = Settings().worker_poll_seconds
"""Our worker's poll delay (after which an idle one polls without a wake-up); the baseline
arq worker polls this often."""
QUEUE = Settings().queue_name
IDLE_SECONDS = 10.0


def _ours(root: Path, n: int) -> dict[str, list[float]]:
    """Seconds per job: POST return -> claim (`total`), -> arq starting our task (`arq`),
    arq's start -> our claim (`claim`), and the record's created_at -> claim (`created`)."""
    from_return, from_created, posted = [], [], []
    with Stack(root, workers=1) as stack:
        ds = stack.upload_rows(preference_rows(8))
        spec = {
            "base_model": stack.unloadable_model(),
            "dataset_id": ds["id"],
            "eval_fraction": 0.0,
        }
        time.sleep(3.0)  # let the worker finish starting before the first job
        worker = stack.workers[0].pid
        pause = random.Random(0)
        for _ in range(n):
            time.sleep(pause.uniform(0, POLL_DELAY))
            job = stack.submit(spec)
            returned = time.time()
            stack.wait(job["id"], lambda j: j["started_at"] is not None, timeout=60, poll=0.02)
            _end_training_process(worker)
            done = stack.wait_done(job["id"], timeout=120, poll=0.05)
            if done["started_at"] is None:
                raise RuntimeError(f"job never started: {done}\n{stack.logs()}")
            from_return.append(done["started_at"] - returned)
            from_created.append(done["started_at"] - done["created_at"])
            posted.append((f"{job['id']}:0", returned, done["started_at"]))
        starts = asyncio.run(_arq_starts(stack.redis.url, [arq_id for arq_id, _, _ in posted]))
    return {
        "total": from_return,
        "created": from_created,
        "arq": [starts[arq_id] - returned for arq_id, returned, _ in posted],
        "claim": [claimed - starts[arq_id] for arq_id, _, claimed in posted],
    }


async def _arq_starts(redis_url: str, arq_ids: list[str]) -> dict[str, float]:
    """When arq started each of our tasks, from arq's own result records."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        starts = {}
        for arq_id in arq_ids:
            info = await ArqJob(arq_id, pool, _queue_name=QUEUE).result_info()
            if info is None:
                raise RuntimeError(f"arq kept no result for {arq_id}")
            starts[arq_id] = info.start_time.timestamp()
        return starts
    finally:
        await pool.aclose()


def _end_training_process(worker_pid: int, timeout: float = 30) -> None:
    """Kill the worker's training child (multiprocessing's spawn_main), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(worker_pid).children():
            try:
                if any("spawn_main" in part for part in child.cmdline()):
                    child.kill()
                    return
            except psutil.Error:
                continue
        time.sleep(0.01)
    raise RuntimeError("the worker started no training process")


async def _arq_baseline(redis_url: str, queue: str, n: int) -> list[float]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    latencies = []
    try:
        pause = random.Random(0)
        for _ in range(n):
            await asyncio.sleep(pause.uniform(0, POLL_DELAY))
            job = await pool.enqueue_job("noop", _queue_name=queue)
            returned = time.time()
            assert isinstance(job, ArqJob)
            await job.result(timeout=30, poll_delay=0.05)
            info = await job.result_info()
            assert info is not None
            start: datetime = info.start_time
            latencies.append(start.timestamp() - returned)
    finally:
        await pool.aclose()
    return latencies


def _arq(root: Path, n: int) -> list[float]:
    redis = LocalRedis().start()
    log = (root / "arq-worker.log").open("wb")
    queue = "bench:noop"
    worker = subprocess.Popen(
        [PY, "-m", "bench.arq_noop", redis.url, queue, str(POLL_DELAY)],
        env={**QUIET_ENV, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(1.5)
        return asyncio.run(_arq_baseline(redis.url, queue, n))
    finally:
        stop_process(worker)
        redis.stop()
        log.close()


def _idle_commands_per_second(root: Path, command: Callable[[str], list[str]]) -> float:
    """Redis commands per second of one idle worker (`command(redis_url)`), alone on a Redis
    of its own, once it has started: `INFO commandstats` over `IDLE_SECONDS` (the two INFO
    calls themselves left out)."""
    redis = LocalRedis().start()
    client = redis_client.Redis.from_url(redis.url)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "idle-worker.log"
    log = log_path.open("wb")
    env = {
        **QUIET_ENV,
        "PATH": "/usr/bin:/bin",
        "FTUNE_REDIS_URL": redis.url,
        "FTUNE_STORE_URL": (root / "store").as_uri(),
        "FTUNE_WORK_DIR": str(root / "work"),
    }
    worker = subprocess.Popen(
        command(redis.url), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        time.sleep(3.0)  # started: imports, connections, its first poll
        if worker.poll() is not None:
            raise RuntimeError(f"the idle worker exited:\n{log_path.read_text()}")
        before = _commands(client)
        time.sleep(IDLE_SECONDS)
        return (_commands(client) - before) / IDLE_SECONDS
    finally:
        stop_process(worker)
        client.close()
        redis.stop()
        log.close()


def _commands(client: redis_client.Redis) -> int:
    stats: dict[str, dict[str, int]] = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def run(full: bool) -> Section:
    n = 100 if full else 20
    section = Section(
        "Queue latency: POST /v1/jobs returning -> a worker starts the job",
        f"python -m bench --{'full' if full else 'quick'} --only queue",
    )
    with scratch("queue") as root:
        ours = _ours(root / "ours", n)
        base = _arq(root, n)
        idle_ours = _idle_commands_per_second(
            root / "idle-ours", lambda _: [PY, "-m", "service.cli", "worker"]
        )
        idle_base = _idle_commands_per_second(
            root / "idle-arq",
            lambda url: [PY, "-m", "bench.arq_noop", url, "bench:noop", str(POLL_DELAY)],
        )
    for q in (50, 99):
        section.add(
            Figure(
                f"p{q} over {n} jobs",
                percentile(ours["total"], q),
                percentile(base, q),
                "s",
                f"bare arq worker, no-op task, poll_delay {POLL_DELAY} s",
            )
        )
    section.add(
        Figure(
            f"Redis commands per second of an idle worker (over {IDLE_SECONDS:.0f} s)",
            idle_ours,
            idle_base,
            "/s",
            f"bare arq worker, poll_delay {POLL_DELAY} s",
        )
    )
    section.facts.append(
        f"split by arq's own start time of our task: POST -> arq starts it p50 "
        f"{1000 * percentile(ours['arq'], 50):.1f} ms, p99 "
        f"{1000 * percentile(ours['arq'], 99):.1f} ms (the wake-up, then arq's poll and "
        f"start); arq's start -> our claim written (lease, compare-and-set on the record) p50 "
        f"{1000 * percentile(ours['claim'], 50):.1f} ms, p99 "
        f"{1000 * percentile(ours['claim'], 99):.1f} ms"
    )
    section.facts.append(
        f"measured from the record's created_at instead of the POST's return: p50 "
        f"{1000 * percentile(ours['created'], 50):.1f} ms, p99 "
        f"{1000 * percentile(ours['created'], 99):.1f} ms (the bare arq worker waits for its "
        f"poll every {POLL_DELAY} s: a p50 near {POLL_DELAY / 2} s and a p99 just under "
        f"{POLL_DELAY} s)"
    )
    return section
