"""Following a job live (`ftune jobs watch`, `jobs submit --watch`, the demo): a progress
bar fed by the job's Server-Sent Events, or by polling where the API has none."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from service.cli.output import fmt_metrics, fmt_status, fmt_steps, fmt_when, out
from service.client import ApiError, Client, EventsUnsupported, Unreachable
from service.contract import Job, JobStatus, MetricPoint


class JobView:
    """A rich progress bar for one job: step/total, loss, reward accuracy, ETA.

    Status and phase changes are also printed as lines, so a log (no terminal) tells the story.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.last: tuple[str, str] | None = None
        self.last_step = -1
        self.metrics: dict[str, float] = {}

    def __enter__(self) -> JobView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def add_points(self, points: Sequence[MetricPoint]) -> None:
        for p in points:
            self.last_step = max(self.last_step, p.step)
            self.metrics.update(p.values)

    def announce(
        self, job_id: str, status: str, phase: str | None, when: float | None = None
    ) -> None:
        """Print a line when the status or phase differs from the last one printed (the phase
        counts only while running: an ended job keeps the one it ended in), stamped `when` it
        happened (an event replayed from the job's start: not now)."""
        state = (status, (phase or "") if status == JobStatus.running else "")
        if state != self.last:
            where = f" ({state[1]})" if state[1] and status == JobStatus.running else ""
            colored = fmt_status(JobStatus(status)) if status in STATUSES else escape(status)
            stamp = fmt_when(time.time() if when is None else when)
            self.console.print(f"{stamp} {job_id} {colored}{where}")
            self.last = state

    def update(self, job: Job, announce: bool = True) -> None:
        if announce:
            self.announce(job.id, job.status.value, job.phase.value if job.phase else None)
        self.metrics = {**job.latest_metrics, **self.metrics}
        total = job.progress.total_steps
        step = max(job.progress.step, self.last_step)
        eta = job.progress.eta_seconds
        metrics = fmt_metrics(self.metrics)
        eta_text = f"ETA {_duration(eta)}" if eta is not None and not job.status.terminal else ""
        # Once ended, the bar keeps the steps and metrics; its status line says how it ended.
        desc = "" if job.status.terminal else job.phase.value if job.phase else job.status.value
        if self.task is None:
            self.task = self.progress.add_task(
                desc, total=total, completed=step, metrics=metrics, eta=eta_text
            )
        else:
            self.progress.update(
                self.task,
                description=desc,
                total=total,
                completed=step,
                metrics=metrics,
                eta=eta_text,
            )


def watch_job(
    client: Client, job_id: str, console: Console | None = None, poll: float = 1.0
) -> Job:
    """Follow a job until it is terminal; Server-Sent Events when the API has them, else
    polling the job and its new metrics every `poll` seconds. Returns the final record."""
    console = console or out
    job = client.get_job(job_id)
    with JobView(console) as view:
        view.add_points(client.metrics(job_id).points)
        if not job.status.terminal:
            job = _follow_events(client, job, view) or _follow_polling(client, job, view, poll)
            view.add_points(client.metrics(job_id, view.last_step + 1).points)
        view.update(job)
    print_outcome(job, console)
    return job


def _follow_events(client: Client, job: Job, view: JobView) -> Job | None:
    """The final job, or None when there is no stream to follow (then poll): the server has
    none, or the tenant's open streams are at their limit (429).

    The stream replays the job's history first, so status and phase lines come from the
    events themselves; the record (progress, ETA) is re-read on those and at most once a
    second otherwise. A stream that ends before the job (the server's time limit, an API
    restarted) is followed again from the last event seen: polling would print no more log
    lines or phases.
    """
    fetched = time.monotonic()
    status, phase = job.status.value, job.phase.value if job.phase else None
    last: str | None = None
    while True:
        seen = False
        try:
            for event in client.events(job.id, last_event_id=last):
                seen, last = True, event.id or last
                data = event.data if isinstance(event.data, dict) else {}
                if event.event == "metrics":
                    with contextlib.suppress(msgspec.ValidationError):
                        view.add_points([msgspec.convert(data, MetricPoint)])
                elif event.event == "log":
                    view.console.print(f"  [dim]{escape(str(data.get('message', '')))}[/]")
                elif event.event in ("status", "phase"):
                    status = str(data.get("status", status))
                    phase = None if status != JobStatus.running else data.get("phase", phase)
                    view.announce(job.id, status, phase, event.time)
                if event.event in ("status", "phase") or time.monotonic() - fetched >= 1.0:
                    job, fetched = client.get_job(job.id), time.monotonic()
                view.update(job, announce=False)
                if status in TERMINAL_STATUSES and job.status.terminal:
                    return job
        except (EventsUnsupported, Unreachable):
            return None
        except ApiError as exc:
            if exc.status == 429:
                return None
            raise
        job, fetched = client.get_job(job.id), time.monotonic()
        if job.status.terminal:
            return job
        if not seen:
            time.sleep(1.0)  # closed before any event: not a reconnect loop


STATUSES = {s.value for s in JobStatus}
TERMINAL_STATUSES = {s.value for s in JobStatus if s.terminal}


def _follow_polling(client: Client, job: Job, view: JobView, poll: float) -> Job:
    while not job.status.terminal:
        time.sleep(poll)
        job = client.get_job(job.id)
        view.add_points(client.metrics(job.id, view.last_step + 1).points)
        view.update(job)
    return job


def print_outcome(job: Job, console: Console) -> None:
    """What the status line just printed does not say: the steps and where the artifacts
    went, or why the job failed."""
    if job.status == JobStatus.succeeded:
        console.print(f"  after {fmt_steps(job)} steps")
        for art in job.artifacts:
            console.print(f"  {art.kind}: {escape(art.uri)}")
    elif job.status == JobStatus.failed and job.error is not None:
        error = job.error
        phase = f" while {error.phase.value}" if error.phase else ""
        console.print(f"  [red]{escape(error.type)}{phase}[/]: {escape(error.message)}")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
