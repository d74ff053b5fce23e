"""The training process's reporter: progress throttled, yet watchers always see the end."""

from __future__ import annotations

import multiprocessing
import queue
from typing import Any

from gpu_worker.reporter import QueueReporter
from service.contract import Progress


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
