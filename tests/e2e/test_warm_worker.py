"""Warm workers: each job trains in a process of its own, spawned before the job came."""

from __future__ import annotations

import signal
import subprocess
import time
from functools import partial
from urllib.parse import urlsplit

import psutil
import pytest

from tests.e2e.conftest import Stack, soon
from tests.e2e.test_jobs_end_to_end import spec, training_pid
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def waiting_process(worker: subprocess.Popen[bytes], other_than: set[int]) -> int:
    """The pid of the worker's training process that waits for a job (a new one, not in
    `other_than`)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(worker.pid).children():
            try:
                cmdline, status = " ".join(child.cmdline()), child.status()
            except psutil.NoSuchProcess:
                continue
            # Matched by what it runs: the resource tracker, or any child caught between its
            # fork and its exec, still shows the worker's own command line.
            waits = "spawn_main" in cmdline and status != psutil.STATUS_ZOMBIE
            if waits and child.pid not in other_than:
                return int(child.pid)
        time.sleep(0.1)
    raise AssertionError(f"the worker spawned no training process besides {other_than}")


def left(worker: subprocess.Popen[bytes], pid: int) -> bool:
    """Whether ``pid`` is no longer a child of the worker: it exited and was reaped."""
    try:
        return psutil.Process(pid).ppid() != worker.pid
    except psutil.NoSuchProcess:
        return True


def test_jobs_in_a_row_each_run_in_a_process_spawned_before_they_were_queued(
    stack: Stack,
) -> None:
    ds = stack.upload(preference_rows(32))
    worker = stack.start_worker()
    seen: set[int] = set()
    for _ in range(2):
        waiting = waiting_process(worker, seen)  # exists before the job is queued
        seen.add(waiting)
        redis_port = urlsplit(stack.settings.redis_url).port
        connections = psutil.Process(waiting).net_connections()
        assert not [c for c in connections if c.raddr and c.raddr.port == redis_port]
        job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 4}))
        done = stack.wait_done(job["id"])
        assert done["status"] == "succeeded", done
        assert training_pid(stack, job["id"]) == waiting
        # The job's process is gone with its job; the worker waits with a new one.
        assert soon(partial(left, worker, waiting))
    assert len(seen) == 2


def test_a_waiting_process_killed_is_replaced_and_the_next_job_succeeds(stack: Stack) -> None:
    ds = stack.upload(preference_rows(32))
    worker = stack.start_worker()
    killed = {waiting_process(worker, set())}
    psutil.Process(next(iter(killed))).send_signal(signal.SIGKILL)  # as the OOM killer does
    replacement = waiting_process(worker, killed)  # replaced with no job asking for it
    killed.add(replacement)
    psutil.Process(replacement).send_signal(signal.SIGKILL)
    # Queued at once: the worker may claim it before it replaced the dead process itself.
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 4}))
    done = stack.wait_done(job["id"])
    assert done["status"] == "succeeded", done
    # Handed to a process that was dying but not yet dead (the kill and the claim raced), the
    # job is queued again as attempt 1, never failed, and spends no attempt.
    assert done["attempt"] in (0, 1) and done["lost_attempts"] == 0
    assert training_pid(stack, job["id"]) not in killed
    assert worker.poll() is None
    # The next waiting process dies with its worker, even one killed without a word.
    waiting = psutil.Process(waiting_process(worker, killed))
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    gone, _ = psutil.wait_procs([waiting], timeout=30)
    assert gone
