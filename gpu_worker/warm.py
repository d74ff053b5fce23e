"""Training processes: one per job, spawned before the job so that it starts with its imports done.

Each job still trains in a process of its own that ends with it (a crashed or leaking job cannot
poison the next), but the worker spawns that process while it waits: at start, and again as soon
as the previous job's process is reaped. The waiting process imports the training stack (torch,
transformers, trl, peft, bitsandbytes, our pipeline; seconds of CPU), makes its CUDA context on a
GPU worker, and then blocks on a pipe, holding no Redis connection and no model, until the
worker hands it a job. The base model is not
kept loaded between jobs: the next job's base is unknown while the process waits, and loading
one inside it would mean a model outliving its job, which is what the process per job avoids.

The process reports how the job ended as its last event and leaves with `os._exit`, skipping the
interpreter's teardown (seconds with torch imported): the worker records the outcome as soon as
it arrives and reaps the process afterwards, killing it if it does not go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from gpu_worker.errors import JobFailure
from gpu_worker.reporter import JobCancelled, JobStopped, QueueReporter
from gpu_worker.supervisor import Outcome
from service import logs
from service.blobs import open_store
from service.contract import Job, JobError, JobStatus
from service.settings import Settings
from service.store import NotFound, Store

log = logging.getLogger("ftune.worker")

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends this process when its parent dies (Linux)."""
IDLE_POLL_SECONDS = 1.0
"""How often a waiting process looks whether it was told to go (its own SIGTERM)."""
MAX_RESPAWN_SECONDS = 60.0
"""The longest wait before replacing a waiting process that died (after several in a row)."""
REAP_SECONDS = 30.0
"""How long a process that reported its outcome gets to exit before it is killed."""


# -- the training process ------------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
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


def _stop_on_signals(stop: Any) -> None:
    """A SIGTERM (or Ctrl-C's SIGINT) sent to the whole process group (systemd, dumb-init, a
    terminal) reaches the child too: it must checkpoint and stop like its worker asks it to,
    not die and lose the steps since the last checkpoint. A process still waiting for its job
    leaves instead (the worker replaces it, or is going too)."""

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def _preload() -> None:
    """Import what every job needs, and run torch once, before any job is known."""
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401
    from trl.trainer.kto_trainer import KTOTrainer  # noqa: F401
    from trl.trainer.sft_trainer import SFTTrainer  # noqa: F401

    import gpu_worker.pipeline  # noqa: F401

    torch.ones(2, 2) @ torch.ones(2, 2)  # initialises torch's CPU kernels and thread pool
    if torch.cuda.is_available():
        # The CUDA context and cuBLAS (a second or more per process) are made on the first GPU,
        # the one a job's process trains on (rank 0 under data parallelism). Only one job
        # process exists at a time: the next is spawned once the last one is reaped, so this
        # holds no GPU memory a running job could need. Checked on paper (no GPU in CI).
        x = torch.ones(2, 2, device="cuda:0")
        (x @ x).sum().item()


def _wait_for_job(
    jobs: multiprocessing.connection.Connection, stop: Any
) -> tuple[bytes, float] | None:
    """The job and when it was handed over; None if the worker closed the pipe or this process
    was told to stop before any job came."""
    try:
        while not jobs.poll(IDLE_POLL_SECONDS):
            if stop.is_set():
                return None
        handed: tuple[bytes, float] = jobs.recv()
    except (EOFError, OSError):
        return None
    finally:
        jobs.close()
    return handed


def _main(
    jobs: multiprocessing.connection.Connection,
    settings: Settings,
    events: multiprocessing.Queue[tuple[str, Any]],
    cancel: Any,
    stop: Any,
    ready_event: Any,
    took: Any,
    parent: int,
) -> None:
    spawned = time.time()
    die_with_parent(parent)
    _stop_on_signals(stop)
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    _preload()
    ready = time.time()
    ready_event.set()
    handed = _wait_for_job(jobs, stop)
    if handed is not None:
        took.set()
        job_json, handed_at = handed
        if ready <= handed_at:
            how = (
                f"was ready {handed_at - ready:.1f} s before the job "
                f"(training stack imported in {ready - spawned:.1f} s)"
            )
        else:
            how = (
                f"was still importing the training stack: the job waited {ready - handed_at:.1f} s"
            )
        _train(job_json, settings, events, cancel, stop, f"training process {os.getpid()} {how}")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the interpreter's teardown would only delay the next process


def _train(
    job_json: bytes,
    settings: Settings,
    events: multiprocessing.Queue[tuple[str, Any]],
    cancel: Any,
    stop: Any,
    hello: str,
) -> None:
    """Run the job; its outcome is the last event sent, and flushed, before this returns."""
    from gpu_worker.pipeline import run

    job = msgspec.json.decode(job_json, type=Job)
    logs.bind(job_id=job.id, tenant=job.tenant, attempt=job.attempt)
    workdir = _workdir(settings, job)
    reporter = QueueReporter(events, cancel, stop)
    reporter.log(hello)
    try:
        store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        result = run(job, workdir, reporter, settings=settings, store=store)
    except Exception as exc:
        # Sent while `exc` is still held: letting it go frees the failed run its frames hold,
        # and freeing a DDP model can wait in gloo's destructor on a rank that died (measured:
        # the process stuck here, the job `running`, for minutes).
        reporter.finish(_outcome(exc, reporter, job.id))
        return
    reporter.finish(Outcome(artifacts=result.artifacts, final_metrics=result.final_metrics))


def _outcome(exc: Exception, reporter: QueueReporter, job_id: str) -> Outcome:
    """How a job that raised `exc` ended; a planned stop is told in the job's log, an error
    that is not one of ours goes to the worker's log with its traceback."""
    from service.publish import PublishError

    if isinstance(exc, JobCancelled):
        return Outcome(cancelled=True)
    if isinstance(exc, JobStopped):
        reporter.log(f"planned stop: {exc}")
        return Outcome(stopped=True)
    if not isinstance(exc, JobFailure | PublishError):
        logging.getLogger("ftune.worker").exception("job %s failed", job_id)
    return Outcome(error=JobError(type=type(exc).__name__, message=str(exc)))


def _workdir(settings: Settings, job: Job) -> Path:
    """The attempt's local files: removed by the worker once the process is gone, however it
    ended (an outcome, a kill for memory, an abandoned collective). One folder an attempt: a
    planned stop re-queues the job before its process is reaped, and the next attempt may
    start at once on another worker sharing this folder (`ftune dev`, a host's workers)."""
    return settings.work_dir / f"{job.id}.{job.attempt}"


async def sweep_workdirs(settings: Settings, store: Store) -> int:
    """Remove the attempt folders that no running attempt owns, at the worker's start: a
    worker that died between its training process's end and the removal left them, and no
    later attempt reuses a folder's name. Those of attempts running (on another worker
    sharing the folder) stay. Returns how many went."""
    if not settings.work_dir.is_dir():
        return 0
    removed = 0
    for path in settings.work_dir.iterdir():
        job_id, _, attempt = path.name.rpartition(".")
        if not (job_id.startswith("job_") and attempt.isdigit() and path.is_dir()):
            continue
        try:
            job: Job | None = await store.get_job(job_id, None)
        except NotFound:
            job = None
        if job and job.status == JobStatus.running and job.attempt == int(attempt):
            continue
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        removed += 1
    return removed


# -- the worker's side ---------------------------------------------------------------------------


class TrainingProcess:
    """One spawned training process and what the worker talks to it with."""

    def __init__(self, settings: Settings) -> None:
        mp = multiprocessing.get_context("spawn")
        self.events: multiprocessing.Queue[tuple[str, Any]] = mp.Queue()
        self.cancel, self.stop = mp.Event(), mp.Event()
        self.ready, self.took = mp.Event(), mp.Event()
        """`ready`: the training stack is imported; `took`: the job is read. One that dies
        ready but before it took the job never started it; one that dies still importing is
        broken (or short of memory) and must not be retried for free."""
        reader, self._jobs = mp.Pipe(duplex=False)
        self.settings = settings
        self.workdir: Path | None = None
        self.process = mp.Process(
            target=_main,
            args=(
                reader,
                settings,
                self.events,
                self.cancel,
                self.stop,
                self.ready,
                self.took,
                os.getpid(),
            ),
            name="ftune-train",
            daemon=True,
        )
        self.process.start()
        reader.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def hand(self, job: Job) -> bool:
        """Give it the job; False if it is gone."""
        if not self.alive():
            return False
        try:
            self._jobs.send((msgspec.json.encode(job), time.time()))
        except OSError:
            return False
        self.workdir = _workdir(self.settings, job)
        return True

    async def reap(self, seconds: float = REAP_SECONDS) -> None:
        """Wait for it to exit (after its outcome, or with no job to run), else kill it."""
        with contextlib.suppress(OSError):
            self._jobs.close()  # a process still waiting reads the end of the pipe and leaves
        if self.alive():
            await asyncio.to_thread(self.process.join, seconds)
        if self.alive():
            log.warning("training process %s did not exit; killing it", self.pid)
            self.process.kill()
            self.process.join(5)
        self.events.close()
        if self.workdir is not None and not self.alive():  # else the next start sweeps it
            await asyncio.to_thread(shutil.rmtree, self.workdir, ignore_errors=True)


class Warm:
    """The worker's next training process, spawned ahead of its job.

    `once`: a burst worker (one job, then exit) spawns one at start and none after its job."""

    def __init__(self, settings: Settings, *, once: bool = False) -> None:
        self.settings, self.once = settings, once
        self.next: TrainingProcess | None = None
        self.busy = False
        self.closing = False
        self.deaths = 0
        """Waiting processes that died in a row: replacements back off (a broken install would
        otherwise spawn one every few seconds forever)."""
        self.retry_at = 0.0

    def ensure(self) -> None:
        """Spawn the next process unless one waits, a job runs or the worker is going. One that
        died while waiting (killed for memory, say) is replaced."""
        if self.busy or self.closing:
            return
        if self.next is not None:
            if self.next.alive():
                return
            if self.retry_at == 0.0:
                self.deaths += 1
                self.retry_at = time.monotonic() + min(2.0**self.deaths, MAX_RESPAWN_SECONDS)
                log.warning(
                    "the waiting training process %s died (exit code %s); spawning another",
                    self.next.pid,
                    self.next.process.exitcode,
                )
            if time.monotonic() < self.retry_at:
                return
            self.next.events.close()
        self.retry_at = 0.0
        self.next = TrainingProcess(self.settings)

    def start(self, job: Job) -> TrainingProcess:
        """Hand `job` to the waiting process (a fresh one if it is gone)."""
        self.busy, self.retry_at = True, 0.0
        if self.once:
            self.closing = True
        proc, self.next = self.next, None
        if proc is None or not proc.hand(job):
            if proc is not None:
                log.warning("the waiting training process %s was gone; spawning another", proc.pid)
            proc = TrainingProcess(self.settings)
            proc.hand(job)
        proc.process.name = f"ftune-train-{job.id}"
        return proc

    async def finished(self, proc: TrainingProcess, *, respawn: bool) -> None:
        """Reap the job's process, then spawn the next one (`respawn`: the worker stays)."""
        await proc.reap()
        self.busy, self.deaths = False, 0
        if respawn:
            self.ensure()

    async def keep(self, every: float = 2.0) -> None:
        """Replace a waiting process that died, for as long as the worker runs."""
        while True:
            await asyncio.sleep(every)
            self.ensure()

    async def close(self) -> None:
        """The worker is going: the waiting process has no job and nothing to save."""
        self.closing = True
        proc, self.next = self.next, None
        if proc is not None:
            proc.process.kill()
            await proc.reap(5.0)
