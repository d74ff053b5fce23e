"""The training process's reporter: progress throttled, yet watchers always see the end."""

from __future__ import annotations

import multiprocessing
import queue
from typing import Any

import msgspec

from gpu_worker.errors import JobFailure
from gpu_worker.reporter import QueueReporter
from gpu_worker.supervisor import Outcome
from service.contract import JobError, Progress


def drain(events: Any) -> list[tuple[str, Any]]:
    out = []
    while True:
        try:
            out.append(events.get(timeout=1))
        except queue.Empty:
            return out


def steps(events: list[tuple[str, Any]]) -> list[int]:
    return [payload.step for kind, payload in events if kind == "progress"]


def test_progress_of_every_step_is_thinned_but_the_last_step_is_always_sent() -> None:
    mp = multiprocessing.get_context("spawn")
    events = mp.Queue()
    reporter = QueueReporter(events, mp.Event())
    for step in range(1, 201):
        reporter.progress(Progress(step=step, total_steps=200))
    sent = steps(drain(events))
    assert sent[0] == 1 and sent[-1] == 200  # watchers see the start and 100%
    assert len(sent) < 200


def test_a_job_that_ends_early_reports_the_step_it_reached() -> None:
    """A cancel or a planned stop ends before the last step: the newest progress held back
    goes out before the outcome."""
    mp = multiprocessing.get_context("spawn")
    events = mp.Queue()
    reporter = QueueReporter(events, mp.Event())
    for step in range(1, 51):
        reporter.progress(Progress(step=step, total_steps=200))
    reporter.flush()
    assert steps(drain(events))[-1] == 50


def _abandon_after_progress(events: Any, cancel: Any) -> None:
    reporter = QueueReporter(events, cancel)
    for step in range(1, 51):
        reporter.progress(Progress(step=step, total_steps=200))
    reporter.abandon(JobFailure("rank 1 of 2 died (signal 9)"))


def test_an_abandoned_job_reports_its_error_last_and_its_process_ends() -> None:
    """Abandoning (another thread saw the job fail while training is stuck) sends the step
    reached, then the error as the outcome, and ends the process with an error code."""
    mp = multiprocessing.get_context("spawn")
    events, cancel = mp.Queue(), mp.Event()
    child = mp.Process(target=_abandon_after_progress, args=(events, cancel))
    child.start()
    child.join(60)  # the few events fit the pipe: the child's exit does not wait on a reader
    sent = drain(events)
    assert child.exitcode == 1
    assert steps(sent)[-1] == 50
    kind, payload = sent[-1]
    assert kind == "outcome"
    outcome = msgspec.json.decode(payload, type=Outcome)
    assert outcome.error is not None and outcome.error.type == "JobFailure"
    assert outcome.error.message == "rank 1 of 2 died (signal 9)"


def _finish_twice(events: Any, cancel: Any) -> None:
    reporter = QueueReporter(events, cancel)
    reporter.finish(Outcome(error=JobError(type="DistributedError", message="rank 1 died")))
    reporter.finish(Outcome())


def test_a_job_ended_twice_reports_the_first_outcome_only() -> None:
    """Rank 0's watch may abandon a job while its main thread ends it: one outcome goes out,
    and the later call neither sends another nor fails on the closed queue."""
    mp = multiprocessing.get_context("spawn")
    events, cancel = mp.Queue(), mp.Event()
    child = mp.Process(target=_finish_twice, args=(events, cancel))
    child.start()
    child.join(60)
    outcomes = [p for kind, p in drain(events) if kind == "outcome"]
    assert child.exitcode == 0
    assert len(outcomes) == 1
    error = msgspec.json.decode(outcomes[0], type=Outcome).error
    assert error is not None and error.type == "DistributedError"
