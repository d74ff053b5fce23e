"""A job survives the ordinary events of a cluster: SIGTERMs (rolling upgrade, drain,
scale-down) and a Redis restart cost it a checkpoint and a reload, never work or attempts.

Redis here is the test's own server with AOF on, so that its data outlives a restart as it
does in production.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.client import Client
from service.dev.localredis import LocalRedis
from tests.e2e.conftest import Stack
from tests.e2e.test_jobs_end_to_end import spec
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(aof_redis: LocalRedis) -> str:
    """The stack's Redis is this test's own, which the test may stop and start again."""
    return aof_redis.url


def training_child(worker: subprocess.Popen[bytes]) -> psutil.Process:
    for child in psutil.Process(worker.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):  # not the resource tracker
                return child
        except psutil.NoSuchProcess:  # exiting as it was listed
            continue
    raise AssertionError("the worker has no training process")


def job_logs(stack: Stack, job_id: str, pattern: str) -> list[int]:
    """The step numbers in the job's log lines that match `pattern` (one group), in order."""
    with Client(stack.api.url, "key-alice") as client:
        found = [
            re.search(pattern, e.data["message"]) for e in client.events(job_id) if e.event == "log"
        ]
    return [int(m.group(1)) for m in found if m]


def train_steps(stack: Stack, job_id: str) -> list[tuple[int, float]]:
    points = stack.http.get(f"/v1/jobs/{job_id}/metrics").json()["points"]
    return [(p["step"], p["time"]) for p in points if "loss" in p["values"]]


def test_four_sigterms_each_resume_at_the_step_reached(stack: Stack) -> None:
    """SIGTERM to the worker (Kubernetes), to the training process alone, and to the whole
    process group (systemd, dumb-init): each checkpoints the step reached and re-queues the
    job without spending one of its 3 attempts."""
    ds = stack.upload(preference_rows(64))
    # Enough steps that four stops land before the end even at ~0.02 s a step on a fast idle
    # machine (the test polls every 0.25 s, so a dozen steps may pass between a wait and a
    # signal): with 60, a job once finished at its third attempt, before the fourth stop.
    max_steps = 300
    # No periodic checkpoint: every resume must come from a checkpoint taken at a SIGTERM.
    hp = {"max_steps": max_steps, "checkpoint_steps": 1000}
    job_id = stack.submit(spec(stack, ds["id"], hyperparameters=hp))["id"]
    worker = stack.start_worker(own_group=True)
    reached = 0
    for attempt, target in enumerate(("worker", "child", "child", "group")):
        stack.wait(
            job_id,
            lambda j, a=attempt, r=reached: j["attempt"] == a and j["progress"]["step"] >= r + 1,
            timeout=120,
        )
        if target == "worker":
            worker.send_signal(signal.SIGTERM)
        elif target == "child":
            training_child(worker).send_signal(signal.SIGTERM)
        else:
            os.killpg(worker.pid, signal.SIGTERM)
        requeued = stack.wait(job_id, lambda j, a=attempt: j["attempt"] == a + 1, timeout=60)
        assert requeued["lost_attempts"] == 0, requeued
        reached = requeued["progress"]["step"]
        if target != "child":  # the worker itself was told to go: it goes, and another starts
            assert worker.wait(30) == 0
            worker = stack.start_worker(own_group=True)

    done = stack.wait_done(job_id, timeout=600)
    assert done["status"] == "succeeded", done
    assert (done["attempt"], done["lost_attempts"]) == (4, 0)
    stopped = job_logs(stack, job_id, r"planned stop: stopped at step (\d+)")
    resumed = job_logs(stack, job_id, r"resuming from the checkpoint at step (\d+)")
    assert len(stopped) == 4 and resumed == stopped, (stopped, resumed)
    # Every step trained once: no step lost, none trained twice.
    assert [s for s, _ in train_steps(stack, job_id)] == list(range(1, max_steps + 1))


def test_redis_restart_during_training_costs_no_attempt(
    stack: Stack, aof_redis: LocalRedis
) -> None:
    ds = stack.upload(preference_rows(64))
    worker = stack.start_worker()
    # Enough steps to outlast the first progress report by far (it comes half a second in:
    # ~25 steps at 0.02 s a step), so that Redis stops mid-training.
    max_steps = 300
    job_id = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": max_steps}))["id"]
    stack.wait(job_id, lambda j: j["progress"]["step"] >= 3, timeout=120)

    aof_redis.stop()
    down_at = time.time()
    time.sleep(10)  # the e2e lease is 3 s: it lapses, and no one may reap it on return
    aof_redis.start()  # same port, same AOF directory
    up_at = time.time()

    done = stack.wait_done(job_id, timeout=180)
    assert done["status"] == "succeeded", done
    assert (done["attempt"], done["lost_attempts"]) == (0, 0)
    assert worker.poll() is None, "the worker rode the outage out"
    steps = train_steps(stack, job_id)
    # Training went on while Redis was down, and what it reported then arrived afterwards.
    assert any(down_at < t < up_at for _, t in steps)
    assert sorted({s for s, _ in steps}) == list(range(1, max_steps + 1))


def test_a_job_past_the_job_timeout_fails_saying_so_once(stack: Stack) -> None:
    """FTUNE_JOB_TIMEOUT_HOURS is the hard limit of one job: a job that runs past it fails
    with a Timeout error. It was re-queued as if its worker had shut down, with no attempt
    spent, and so ran out its time again and again, holding a GPU for ever."""
    ds = stack.upload(preference_rows(64))
    worker = stack.start_worker({"FTUNE_JOB_TIMEOUT_HOURS": str(10 / 3600)})  # 10 s
    job_id = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 20000}))["id"]
    done = stack.wait_done(job_id, timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "Timeout", done["error"]
    assert "FTUNE_JOB_TIMEOUT_HOURS" in done["error"]["message"]
    assert (done["attempt"], done["lost_attempts"]) == (0, 0)
    assert worker.poll() is None  # the worker goes on to the next job


def test_a_training_process_killed_for_memory_fails_the_job_and_leaves_no_files(
    stack: Stack,
) -> None:
    """The kernel's OOM killer SIGKILLs the training process: the job fails saying so and what
    to change, the worker lives on, and the attempt's local files go with the process."""
    ds = stack.upload(preference_rows(64))
    worker = stack.start_worker(own_group=True)
    job_id = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 2000}))["id"]
    stack.wait(job_id, lambda j: j["progress"]["step"] >= 1, timeout=120)
    workdir = stack.settings.work_dir / f"{job_id}.0"
    assert (workdir / "output").is_dir()  # the attempt's own folder, while it trains
    training_child(worker).send_signal(signal.SIGKILL)
    done = stack.wait_done(job_id, timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "WorkerProcessDied"
    assert "signal 9" in done["error"]["message"] and "batch_size" in done["error"]["message"]
    deadline = time.monotonic() + 30  # removed once the process is reaped, after the status
    while workdir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workdir.exists()
    assert worker.poll() is None
