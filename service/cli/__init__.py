"""The `ftune` command: run the service (api, worker, dev, demo) and talk to it (datasets, jobs).

Client verbs reach the API over HTTP with `Client`; every failure ends in one readable
message on stderr and a non-zero exit code, never a traceback. The API key comes from
--api-key, FTUNE_API_KEY or the `.ftune/api_key` that `ftune dev` writes, and is never printed.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service.client import ApiError, Client, EventsUnsupported, Unreachable
from service.contract import Dataset, Job, JobStatus, MetricPoint

DEFAULT_URL = "http://127.0.0.1:8000"
STATE_DIR = Path(".ftune")

AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="ftune",
    help="Self-hosted QLoRA DPO fine-tuning: preference data in, adapters out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="Upload and manage preference datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, follow and manage fine-tuning jobs.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


@dataclass
class Options:
    url: str
    api_key: str | None

    def client(self) -> Client:
        return Client(self.url, self.api_key)


class Fail(Exception):
    """Stop with this message and exit code (raised by commands, printed by `handled`)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def read_key_file(state_dir: Path = STATE_DIR) -> str | None:
    try:
        return (state_dir / "api_key").read_text().strip() or None
    except OSError:
        return None


def report_api_error(exc: ApiError) -> None:
    err.print(f"[red]error:[/] {escape(str(exc))}")
    for line in exc.error_lines():
        if line not in exc.detail:  # the detail often quotes the first error already
            err.print(f"  {escape(line)}")
    if exc.status == 401:
        err.print(
            "  pass --api-key or set FTUNE_API_KEY (`ftune dev` writes one to .ftune/api_key)"
        )


def handled(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the client's exceptions into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Unreachable as exc:
            err.print(
                f"[red]error:[/] cannot reach the ftune API at {escape(exc.url)}: "
                f"is `ftune dev` running? ({escape(exc.reason)})"
            )
        except ApiError as exc:
            report_api_error(exc)
        except Fail as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.code) from None
        raise typer.Exit(1)

    return wrapper


def options(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    assert isinstance(obj, Options)
    return obj


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="FTUNE_URL", help="The ftune API's base URL.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="FTUNE_API_KEY",
            help="API key (default: .ftune/api_key, written by `ftune dev`).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = Options(url=url.rstrip("/"), api_key=api_key or read_key_file())


# -- running the service ----------------------------------------------------------------------


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (configured by FTUNE_* environment variables)."""
    import uvicorn

    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
    )


@app.command()
def worker() -> None:
    """Run one training worker (needs the `worker` extra: torch, transformers, trl ...)."""
    try:
        from gpu_worker.worker import run_worker
    except ImportError as exc:
        err.print(
            f"[red]error:[/] the worker needs the training stack ({exc}); "
            "install it with: pip install 'ftune[worker]'"
        )
        raise typer.Exit(1) from None
    from service import webhooks
    from service.settings import Settings

    # The worker knows no feature: the webhook staged with a job's end is registered here.
    run_worker(Settings.from_env(), on_terminal=(webhooks.stage_webhook,))


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the API listens on.")] = 8000,
    state_dir: Annotated[
        Path, typer.Option(help="Where Redis data, the store, models and the key live.")
    ] = STATE_DIR,
) -> None:
    """Start Redis, the API and one worker on this machine; Ctrl-C stops them."""
    from service.dev.stack import DevStack, StackError

    stack = DevStack(state_dir, port, host=host)
    with _stop_on_sigterm():
        try:
            with stack:
                out.print(f"ftune is running at [bold]{stack.url}[/] (docs: {stack.url}/docs)")
                if stack.key_created:
                    out.print(f"API key (shown once; also in {state_dir / 'api_key'}):")
                    out.print(f"  {stack.api_key}", soft_wrap=True)
                else:
                    out.print(f"API key: in {state_dir / 'api_key'} (the CLI reads it from there)")
                out.print(f"Worker metrics: {stack.worker_metrics_url}")
                out.print(f"State: {stack.root}. Press Ctrl-C to stop.")
                while True:
                    stack.check()
                    time.sleep(0.5)
        except (StackError, RuntimeError) as exc:  # LocalRedis raises RuntimeError
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            out.print("stopping worker, API and Redis ...")
    out.print("stopped")


@app.command()
@handled
def demo(
    ctx: typer.Context,
    state_dir: Annotated[
        Path, typer.Option(help="Where the dev stack keeps its state and models.")
    ] = STATE_DIR,
    max_steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the demo's tuned value).")
    ] = None,
) -> None:
    """Fine-tune SmolLM2-135M on a sample dataset end to end and show before/after answers."""
    from service.dev.demo import run_demo

    opts = options(ctx)
    code = run_demo(opts.url, opts.api_key, state_dir=state_dir, max_steps=max_steps)
    raise typer.Exit(code)


# -- datasets ---------------------------------------------------------------------------------


@datasets_app.command("upload")
@handled
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL file.")
    ],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: file name).")] = None,
    prompt_field: Annotated[str | None, typer.Option(help="Column holding the prompt.")] = None,
    chosen_field: Annotated[str | None, typer.Option(help="Column holding the chosen.")] = None,
    rejected_field: Annotated[
        str | None, typer.Option(help="Column holding the rejected answer.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Upload a JSONL preference dataset (streamed; validated by the server)."""
    size = file.stat().st_size
    with options(ctx).client() as client, _upload_progress(size, quiet=as_json) as advance:
        ds = client.upload_dataset(
            file,
            name,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            on_progress=advance,
        )
    if as_json:
        _print_json(ds)
        return
    out.print(
        f"uploaded [bold]{ds.id}[/] ({escape(ds.name)}): {ds.rows} rows, {ds.format}, "
        f"sha256 {ds.sha256[:12]}"
    )
    _print_warnings(ds)


@datasets_app.command("list")
@handled
def datasets_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    cursor: Annotated[str | None, typer.Option(help="From a previous page.")] = None,
    as_json: AsJson = False,
) -> None:
    """List datasets, newest first."""
    with options(ctx).client() as client:
        page = client.list_datasets(limit, cursor)
    if as_json:
        _print_json(page)
        return
    table = _table("ID", "NAME", "ROWS", "FORMAT", "SIZE", "CREATED")
    for ds in page.items:
        table.add_row(
            ds.id, escape(ds.name), str(ds.rows), ds.format, _size(ds.bytes), _when(ds.created_at)
        )
    out.print(table)
    if page.next_cursor:
        out.print(f"more: --cursor {page.next_cursor}")


@datasets_app.command("show")
@handled
def datasets_show(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(metavar="ID")],
    rows: Annotated[
        int,
        typer.Option(min=0, max=100, help="Also print the first N rows as training sees them."),
    ] = 0,
    as_json: AsJson = False,
) -> None:
    """Show one dataset: size, format, length statistics and warnings (and rows)."""
    with options(ctx).client() as client:
        ds = client.get_dataset(dataset_id)
        page = client.dataset_rows(dataset_id, 0, rows) if rows else None
    if as_json:
        _print_json({"dataset": ds, "rows": page.rows} if page else ds)
        return
    _kv(
        [
            ("id", ds.id),
            ("name", ds.name),
            ("rows", str(ds.rows)),
            ("format", f"{ds.format} (uploaded as {ds.source_format})"),
            ("size", f"{_size(ds.bytes)} normalized, {_size(ds.source_bytes)} uploaded"),
            ("sha256", ds.sha256),
            ("created", _when(ds.created_at)),
        ]
    )
    stats = Table("chars", "min", "mean", "p95", "max", box=None)
    for label, values in (
        ("prompt", ds.stats.prompt_chars),
        ("chosen", ds.stats.chosen_chars),
        ("rejected", ds.stats.rejected_chars),
    ):
        stats.add_row(label, *(_num(values.get(k)) for k in ("min", "mean", "p95", "max")))
    out.print(stats)
    _print_warnings(ds)
    for i, row in enumerate(page.rows if page else [], 1):
        out.print(f"[bold]row {i}[/]")
        for part in ("prompt", "chosen", "rejected"):
            value = getattr(row, part)
            turns = (
                [(None, value)] if isinstance(value, str) else [(m.role, m.content) for m in value]
            )
            for role, text in turns:
                tag = f"[{role}] " if role else ""
                out.print(f"  {part:<9}" + escape(tag + text), highlight=False)


@datasets_app.command("delete")
@handled
def datasets_delete(
    ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")]
) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with options(ctx).client() as client:
        client.delete_dataset(dataset_id)
    out.print(f"deleted {dataset_id}")


# -- jobs -------------------------------------------------------------------------------------


@jobs_app.command("submit")
@handled
def jobs_submit(
    ctx: typer.Context,
    spec_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="[SPEC.json]", exists=True, dir_okay=False, help="A JobSpec as JSON."
        ),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Hub id, s3://... or file:///... (overrides the spec).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset id (ds_...).")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    num_epochs: Annotated[float | None, typer.Option()] = None,
    beta: Annotated[float | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    artifacts: Annotated[str | None, typer.Option(help="adapter, merged or both.")] = None,
    destination: Annotated[
        str | None, typer.Option(help="store, s3://bucket/prefix or hf://org/name.")
    ] = None,
    eval_prompt: Annotated[
        list[str] | None, typer.Option(help="A prompt for before/after answers; repeatable.")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value; repeatable.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Repeat-safe submission.")] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
    as_json: AsJson = False,
) -> None:
    """Submit a job from a spec file and/or flags (flags override the file)."""
    spec = _load_spec(spec_file) if spec_file else {}
    hp: dict[str, Any] = dict(spec.get("hyperparameters") or {})
    for key, value in (
        ("max_steps", max_steps),
        ("num_epochs", num_epochs),
        ("beta", beta),
        ("learning_rate", learning_rate),
        ("batch_size", batch_size),
        ("max_length", max_length),
    ):
        if value is not None:
            hp[key] = value
    if hp:
        spec["hyperparameters"] = hp
    if base_model:
        spec["base_model"] = base_model
    if dataset:
        spec["dataset_id"] = dataset
    output: dict[str, Any] = dict(spec.get("output") or {})
    if artifacts:
        output["artifacts"] = artifacts
    if destination:
        output["destination"] = parse_destination(destination)
    if output:
        spec["output"] = output
    if eval_prompt:
        spec["eval_prompts"] = list(eval_prompt)
    if label:
        spec["labels"] = {**(spec.get("labels") or {}), **parse_labels(label)}
    missing = [
        flag
        for flag, key in (("--base-model", "base_model"), ("--dataset", "dataset_id"))
        if not spec.get(key)
    ]
    if missing:
        raise Fail(f"a job needs {' and '.join(missing)} (or a SPEC.json that sets them)", 2)
    with options(ctx).client() as client:
        job = client.submit_job(spec, idempotency_key=idempotency_key)
        if as_json:
            _print_json(job)
        else:
            out.print(f"submitted [bold]{job.id}[/] ({job.status.value})")
        if watch:
            final = watch_job(client, job.id)
            raise typer.Exit(0 if final.status == JobStatus.succeeded else 1)


@jobs_app.command("list")
@handled
def jobs_list(
    ctx: typer.Context,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value; repeatable.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    cursor: Annotated[str | None, typer.Option(help="From a previous page.")] = None,
    as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    labels = label or []
    parse_labels(labels)  # fail early and locally on a malformed filter
    with options(ctx).client() as client:
        page = client.list_jobs(status=status, labels=labels, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    table = _table("ID", "STATUS", "PHASE", "STEP", "BASE MODEL", "DATASET", "CREATED")
    for job in page.items:
        table.add_row(
            job.id,
            _status(job.status),
            job.phase.value if job.phase else "",
            _steps(job),
            escape(_short_model(job.spec.base_model)),
            job.dataset.id,
            _when(job.created_at),
        )
    out.print(table)
    if page.next_cursor:
        out.print(f"more: --cursor {page.next_cursor}")


@jobs_app.command("show")
@handled
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: AsJson = False,
) -> None:
    """Show one job: status, progress, latest metrics, artifacts, error."""
    with options(ctx).client() as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    print_job(job)


@jobs_app.command("cancel")
@handled
def jobs_cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a queued or running job."""
    with options(ctx).client() as client:
        job = client.cancel_job(job_id)
    if job.status == JobStatus.cancelled:
        out.print(f"cancelled {job.id}")
    else:
        out.print(f"cancel requested for {job.id}: the worker stops it at its next step")


@jobs_app.command("watch")
@handled
def jobs_watch(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Follow a job live; exit 0 when it succeeds, 1 when it fails or is cancelled."""
    with options(ctx).client() as client:
        job = watch_job(client, job_id)
    raise typer.Exit(0 if job.status == JobStatus.succeeded else 1)


@jobs_app.command("metrics")
@handled
def jobs_metrics(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    as_csv: Annotated[bool, typer.Option("--csv", help="Every metric as CSV on stdout.")] = False,
    since_step: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Print a job's metric series (TRL's names: loss, rewards/accuracies, ...)."""
    with options(ctx).client() as client:
        series = client.metrics(job_id, since_step)
    if as_csv:
        write_csv(series.points, sys.stdout)
        return
    keys = [k for k in TABLE_METRICS if any(k in p.values for p in series.points)]
    table = Table("step", *keys, box=None)
    for column in table.columns:
        column.no_wrap = True
    for point in series.points:
        table.add_row(str(point.step), *(_num(point.values.get(k)) for k in keys))
    out.print(table)


TABLE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "learning_rate",
    "grad_norm",
    "eval_loss",
    "eval_rewards/accuracies",
    "step_seconds",
)
"""The table's columns (when present); --csv has every key."""


def write_csv(points: Sequence[MetricPoint], stream: Any) -> None:
    """One row per point: step, time, then every metric name seen (sorted), blanks if absent."""
    keys = sorted({k for p in points for k in p.values})
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["step", "time", *keys])
    for p in points:
        writer.writerow([p.step, f"{p.time:.3f}", *(_csv_num(p.values.get(k)) for k in keys)])


# -- watching a job ---------------------------------------------------------------------------


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

    def announce(self, job_id: str, status: str, phase: str | None) -> None:
        """Print a line when the status or phase differs from the last one printed."""
        state = (status, phase or "")
        if state != self.last:
            where = f" ({state[1]})" if state[1] and status == JobStatus.running else ""
            colored = _status(JobStatus(status)) if status in STATUSES else escape(status)
            self.console.print(f"{_when(time.time())} {job_id} {colored}{where}")
            self.last = state

    def update(self, job: Job, announce: bool = True) -> None:
        if announce:
            self.announce(job.id, job.status.value, job.phase.value if job.phase else None)
        self.metrics = {**job.latest_metrics, **self.metrics}
        total = job.progress.total_steps
        step = max(job.progress.step, self.last_step)
        eta = job.progress.eta_seconds
        metrics = _metric_text(self.metrics)
        eta_text = f"ETA {_duration(eta)}" if eta is not None and not job.status.terminal else ""
        desc = job.phase.value if job.phase and not job.status.terminal else job.status.value
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
    """The final job, or None when the stream is unavailable or ended early (then poll).

    The stream replays the job's history first, so status and phase lines come from the
    events themselves; the record (progress, ETA) is re-read on those and at most once a
    second otherwise.
    """
    fetched = time.monotonic()
    status, phase = job.status.value, job.phase.value if job.phase else None
    try:
        for event in client.events(job.id):
            data = event.data if isinstance(event.data, dict) else {}
            if event.event == "metrics":
                with contextlib.suppress(msgspec.ValidationError):
                    view.add_points([msgspec.convert(data, MetricPoint)])
            elif event.event == "log":
                view.console.print(f"  [dim]{escape(str(data.get('message', '')))}[/]")
            elif event.event in ("status", "phase"):
                status = str(data.get("status", status))
                phase = None if status != JobStatus.running else data.get("phase", phase)
                view.announce(job.id, status, phase)
            if event.event in ("status", "phase") or time.monotonic() - fetched >= 1.0:
                job, fetched = client.get_job(job.id), time.monotonic()
            view.update(job, announce=False)
            if status in TERMINAL_STATUSES and job.status.terminal:
                return job
    except (EventsUnsupported, Unreachable):
        return None
    return None


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
    if job.status == JobStatus.succeeded:
        console.print(f"[green]{job.id} succeeded[/] after {_steps(job)} steps")
        for art in job.artifacts:
            console.print(f"  {art.kind}: {escape(art.uri)}")
    elif job.status == JobStatus.failed:
        error = job.error
        console.print(f"[red]{job.id} failed[/]")
        if error is not None:
            phase = f" while {error.phase.value}" if error.phase else ""
            console.print(f"  {escape(error.type)}{phase}: {escape(error.message)}")
    else:
        console.print(f"[yellow]{job.id} {job.status.value}[/]")


def print_job(job: Job) -> None:
    rows = [
        ("id", job.id),
        ("status", _status(job.status) + (f" ({job.phase.value})" if job.phase else "")),
        ("base model", escape(job.spec.base_model)),
        ("dataset", f"{job.dataset.id} ({job.dataset.rows} rows, {job.dataset.format})"),
        ("created", _when(job.created_at)),
    ]
    if job.started_at:
        rows.append(("started", _when(job.started_at)))
    if job.finished_at:
        rows.append(("finished", _when(job.finished_at)))
    rows.append(("progress", f"step {_steps(job)}, epoch {job.progress.epoch:.2f}"))
    if job.attempt:
        rows.append(("attempt", str(job.attempt)))
    if job.spec.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in job.spec.labels.items())))
    if job.latest_metrics:
        rows.append(("metrics", _metric_text(job.latest_metrics, every=True)))
    for art in job.artifacts:
        rows.append((art.kind, f"{escape(art.uri)} ({len(art.files)} files)"))
    if job.error:
        phase = f" while {job.error.phase.value}" if job.error.phase else ""
        rows.append(("error", f"{escape(job.error.type)}{phase}: {escape(job.error.message)}"))
    _kv(rows)
    if job.eval_generations:
        table = Table("prompt", "base", "tuned", show_lines=True)
        for g in job.eval_generations:
            table.add_row(escape(g.prompt), escape(g.base), escape(g.tuned))
        out.print(table)


# -- helpers ----------------------------------------------------------------------------------


def parse_destination(value: str) -> dict[str, Any]:
    """`store`, `s3://bucket/prefix` or `hf://org/name` (also `hub:org/name`)."""
    if value == "store":
        return {"type": "store"}
    if value.startswith("s3://"):
        return {"type": "s3", "uri": value}
    for prefix in ("hf://", "hub:"):
        if value.startswith(prefix):
            return {"type": "hub", "repo_id": value.removeprefix(prefix)}
    raise Fail(f"--destination {value!r}: use store, s3://bucket/prefix or hf://org/name", 2)


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Fail(f"label {item!r} must be key=value", 2)
        labels[key] = value
    return labels


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Fail(f"{path} is not valid JSON: line {exc.lineno}: {exc.msg}", 2) from None
    if not isinstance(data, dict):
        raise Fail(f"{path} must hold a JSON object (a JobSpec)", 2)
    return data


class _Upload:
    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self.progress, self.task = progress, task

    def __call__(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)


@contextlib.contextmanager
def _upload_progress(size: int, quiet: bool) -> Iterator[_Upload]:
    """A byte progress bar on a terminal for uploads big enough to wait for."""
    if quiet or size < 8 * 1024 * 1024 or not err.is_terminal:
        yield _Upload(None, None)
        return
    progress = Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    )
    with progress:
        task = progress.add_task("upload", total=size)
        yield _Upload(progress, task)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `with DevStack` unwinds and stops the children."""

    def raise_interrupt(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def _print_warnings(ds: Dataset) -> None:
    for w in ds.warnings:
        lines = ", ".join(str(n) for n in w.lines[:5])
        err.print(f"[yellow]warning:[/] {escape(w.msg)} ({w.count} rows; lines {lines})")


def _table(*headers: str) -> Table:
    """A plain listing whose ids and dates never wrap or get cut: they are for copying."""
    table = Table(box=None)
    for header in headers:
        keep = header in ("ID", "DATASET", "CREATED", "STATUS", "STEP", "ROWS", "SIZE")
        table.add_column(header, no_wrap=keep, min_width=len(header))
    return table


def _kv(rows: Sequence[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _metric_text(metrics: dict[str, float], every: bool = False) -> str:
    if every:
        keys = sorted(metrics)
    else:
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins") if k in metrics]
    short = {"rewards/accuracies": "acc", "rewards/margins": "margin"}
    return "  ".join(f"{k if every else short.get(k, k)} {_num(metrics[k])}" for k in keys)


def _status(status: JobStatus) -> str:
    color = {
        JobStatus.succeeded: "green",
        JobStatus.failed: "red",
        JobStatus.cancelled: "yellow",
        JobStatus.running: "cyan",
    }.get(status)
    return f"[{color}]{status.value}[/]" if color else status.value


def _steps(job: Job) -> str:
    total = job.progress.total_steps
    return f"{job.progress.step}/{total}" if total else str(job.progress.step)


def _short_model(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1] if ref.startswith("file://") else ref


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _num(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _csv_num(value: float | None) -> str:
    return "" if value is None else repr(value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
