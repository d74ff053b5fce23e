"""How the pipeline tells the world what it is doing, without knowing about Redis.

The pipeline runs in a child process; in production its reporter forwards events over a
multiprocessing queue to the worker's event loop, which writes them to Redis. Tests use
`ListReporter`.
"""

from __future__ import annotations

import logging
import multiprocessing.queues
import multiprocessing.synchronize
import os
import sys
import threading
import time
from typing import Any, Protocol

import msgspec

from gpu_worker.errors import JobFailure
from gpu_worker.supervisor import Outcome
from service import logs
from service.contract import JobError, Phase, Progress


class JobCancelled(Exception):
    """Raised inside the pipeline when the cancel flag is seen."""


class JobStopped(Exception):
    """Raised inside the pipeline after a planned stop (the worker got SIGTERM): training
    saved a checkpoint at the step it reached, and the next attempt resumes there."""


class Reporter(Protocol):
    def phase(self, phase: Phase) -> None: ...

    def progress(self, progress: Progress) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log(self, message: str) -> None: ...

    def update(self, **fields: Any) -> None:
        """Set other job-record fields (`rows_dropped`, `eval_generations`)."""
        ...

    def cancelled(self) -> bool: ...

    def stop_requested(self) -> bool:
        """The worker is shutting down: checkpoint at the next step boundary and stop."""
        ...

    def abandon(self, error: JobFailure) -> None:
        """The job failed with `error`, seen by another thread while the pipeline's own thread
        is stuck where no exception reaches it (a collective waiting for a dead rank): report
        it and end the process. Called from that other thread."""
        ...


class ListReporter:
    """Keeps everything in lists; for tests and standalone runs."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.progresses: list[Progress] = []
        self.points: list[tuple[int, dict[str, float]]] = []
        self.logs: list[str] = []
        self.fields: dict[str, Any] = {}
        self.cancel_after_step: int | None = None
        self.stop_after_step: int | None = None
        self.abandoned: JobFailure | None = None

    def phase(self, phase: Phase) -> None:
        self.phases.append(phase)

    def progress(self, progress: Progress) -> None:
        self.progresses.append(progress)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.points.append((step, dict(values)))

    def log(self, message: str) -> None:
        self.logs.append(message)

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def cancelled(self) -> bool:
        step = self.progresses[-1].step if self.progresses else 0
        return self.cancel_after_step is not None and step >= self.cancel_after_step

    def stop_requested(self) -> bool:
        step = self.progresses[-1].step if self.progresses else 0
        return self.stop_after_step is not None and step >= self.stop_after_step

    def abandon(self, error: JobFailure) -> None:
        """Kept for the test to see; the process goes on (it is the test's)."""
        self.abandoned = error


PROGRESS_EVERY_SECONDS = 0.5
"""Progress goes to the worker at most this often (and always at the last step): an event per
step cost the worker's process CPU beside training, for a figure that watchers poll."""


class QueueReporter:
    """The child-process side: events go to the parent, cancel and stop come from it (stop
    also from a SIGTERM sent to the child itself). Progress is throttled: see `flush`."""

    def __init__(
        self,
        events: multiprocessing.queues.Queue[tuple[str, Any]],
        cancel: multiprocessing.synchronize.Event,
        stop: multiprocessing.synchronize.Event | None = None,
    ) -> None:
        self._events = events
        self._cancel = cancel
        self._stop = stop
        self._progress_sent = float("-inf")
        self._held: Progress | None = None
        self._ending = threading.Lock()
        self._ended = False

    def phase(self, phase: Phase) -> None:
        logs.bind(phase=phase.value)
        self._events.put(("phase", phase.value))

    def progress(self, progress: Progress) -> None:
        now = time.monotonic()
        last = progress.total_steps is not None and progress.step >= progress.total_steps
        if last or now - self._progress_sent >= PROGRESS_EVERY_SECONDS:
            self._events.put(("progress", progress))
            self._progress_sent, self._held = now, None
        else:
            self._held = progress

    def flush(self) -> None:
        """Send the newest progress held back, so that the record ends at the step reached (a
        cancel or a planned stop ends before the last step)."""
        if self._held is not None:
            self._events.put(("progress", self._held))
            self._held = None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._events.put(("metrics", (step, time.time(), dict(values))))

    def log(self, message: str) -> None:
        self._events.put(("log", message))

    def update(self, **fields: Any) -> None:
        self._events.put(("update", fields))

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stop_requested(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def finish(self, outcome: Outcome) -> None:
        """Send how the job ended, as the last event, and wait until it has left the process.
        Only the first call sends: rank 0's watch may abandon a job while its main thread
        ends it."""
        with self._ending:
            if self._ended:
                return
            self._ended = True
            self.flush()
            self._events.put(("outcome", msgspec.json.encode(outcome)))
            self._events.close()
            self._events.join_thread()

    def abandon(self, error: JobFailure) -> None:
        self.finish(Outcome(error=JobError(type=type(error).__name__, message=str(error))))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
