"""`ftune jobs ...`: submit (from a spec file and/or flags), list, show, cancel, watch, and
read a job's metrics as a table or CSV."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from service.cli.app import AsJson, Fail, app, handled, load_object, options
from service.cli.output import (
    err,
    fmt_metrics,
    fmt_num,
    fmt_status,
    fmt_steps,
    fmt_when,
    listing,
    out,
    print_json,
    print_kv,
    print_table,
)
from service.cli.watch import TERMINAL_STATUSES, watch_job
from service.client import ApiError, ChecksumMismatch, Event, EventsUnsupported
from service.contract import Artifact, ArtifactKind, Job, JobStatus, Method, MetricPoint

jobs_app = typer.Typer(help="Submit, follow and manage fine-tuning jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


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
    method: Annotated[
        Method | None,
        typer.Option(help="The training method (default dpo); it must fit the dataset's kind."),
    ] = None,
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
    spec = load_object(spec_file, "a JobSpec") if spec_file else {}
    hp: dict[str, Any] = dict(spec.get("hyperparameters") or {})
    # One length of training: a flag for one drops the file's other (the API refuses both,
    # as it does both flags).
    if max_steps is not None:
        hp.pop("num_epochs", None)
    if num_epochs is not None:
        hp.pop("max_steps", None)
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
    if method:
        spec["method"] = method
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
        if as_json and not watch:
            print_json(job)
            return
        # With --json --watch, stdout holds one JSON document, the job as it ended: what is
        # said while it runs goes to stderr.
        said = err if as_json else out
        said.print(f"submitted [bold]{job.id}[/] ({job.status.value})")
        if watch:
            final = watch_job(client, job.id, console=said)
            if as_json:
                print_json(final)
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
        print_json(page)
        return
    table = listing("ID", "STATUS", "PHASE", "STEP", "BASE MODEL", "DATASET", "CREATED")
    for job in page.items:
        table.add_row(
            job.id,
            fmt_status(job.status),
            job.phase.value if job.phase else "",
            fmt_steps(job),
            escape(_short_model(job.spec.base_model)),
            job.dataset.id,
            fmt_when(job.created_at),
        )
    print_table(table)
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
        print_json(job)
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


@jobs_app.command("download")
@handled
def jobs_download(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    kind: Annotated[
        ArtifactKind | None,
        typer.Option(help="Which artifact (default: the adapter, else the merged model)."),
    ] = None,
    to: Annotated[Path, typer.Option(file_okay=False, help="Where to save it: TO/<kind>/.")] = Path(
        "."
    ),
) -> None:
    """Save a job's adapter or merged model kept in the service's store, each file checked
    against its sha256 (one published to the Hub or S3 is fetched from there)."""
    with options(ctx).client() as client:
        job = client.get_job(job_id)
        made: dict[str, Artifact] = {a.kind: a for a in job.artifacts}
        name = kind or ("adapter" if "adapter" in made else "merged")
        artifact = made.get(name)
        if artifact is None:
            said = ", ".join(made) or "none yet"
            raise Fail(f"job {job_id} ({job.status.value}) has no {name}; its artifacts: {said}")
        folder = (to / name).resolve()
        for file in artifact.files:
            dest = (folder / file).resolve()
            if not dest.is_relative_to(folder):  # names come from the server
                raise Fail(f"{file!r} would be saved outside {folder}: not saved")
            try:
                client.download_artifact_file(job_id, name, file, dest, artifact.sha256.get(file))
            except ChecksumMismatch as exc:
                raise Fail(f"{exc}; not saved") from None
        size = sum(artifact.sizes.values())
        out.print(
            f"saved the {name} of {job_id} to {escape(str(folder))} ({len(artifact.files)} files"
            + (f", {size / 1e6:.1f} MB" if size else "")
            + "), each checked against its sha256"
        )


@jobs_app.command("logs")
@handled
def jobs_logs(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a job's log from its start (log lines, status and phase changes); while it runs,
    follow it until it ends (Ctrl-C stops following)."""
    with options(ctx).client() as client:
        last: str | None = None
        while True:
            # Read before the stream: an ended job's stream gives what is left, then closes.
            ended = client.get_job(job_id).status.terminal  # a 404 before anything else
            try:
                for event in client.events(job_id, last_event_id=last):
                    last = event.id or last
                    if (line := _log_line(event)) is not None:
                        out.print(line, highlight=False)
                    if event.event == "status" and event.data.get("status") in TERMINAL_STATUSES:
                        return
            except EventsUnsupported:
                raise Fail(
                    "the server does not stream job events (a proxy in between?): "
                    f"`ftune jobs watch {job_id}` follows the job by polling"
                ) from None
            except ApiError as exc:  # the tenant's open streams are at their limit: wait
                if exc.status != 429:
                    raise
                time.sleep(exc.retry_after or 5)
                continue
            if ended:
                return
            # The stream closed before the job's end (a server's time limit): resume.


def _log_line(event: Event) -> str | None:
    """One event as a line of the log, when it was written (its id is the ms timestamp)."""
    data = event.data if isinstance(event.data, dict) else {}
    when = fmt_when(event.time) if event.time is not None else ""
    if event.event == "log":
        return f"{when} {escape(str(data.get('message', '')))}"
    if event.event in ("status", "phase") and data.get(event.event):
        return f"{when} [bold]{event.event}[/] {escape(str(data[event.event]))}"
    return None


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
        table.add_row(str(point.step), *(fmt_num(point.values.get(k)) for k in keys))
    print_table(table)


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


def print_job(job: Job) -> None:
    rows = [
        ("id", job.id),
        ("status", fmt_status(job.status) + (f" ({job.phase.value})" if job.phase else "")),
        ("base model", escape(job.spec.base_model)),
        ("dataset", f"{job.dataset.id} ({job.dataset.rows} rows, {job.dataset.format})"),
        ("created", fmt_when(job.created_at)),
    ]
    if job.started_at:
        rows.append(("started", fmt_when(job.started_at)))
    if job.finished_at:
        rows.append(("finished", fmt_when(job.finished_at)))
    rows.append(("progress", f"step {fmt_steps(job)}, epoch {job.progress.epoch:.2f}"))
    if job.attempt:
        rows.append(("attempt", f"{job.attempt} ({job.lost_attempts} lost to failed workers)"))
    if job.spec.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in job.spec.labels.items())))
    if job.latest_metrics:
        rows.append(("metrics", fmt_metrics(job.latest_metrics, every=True)))
    for art in job.artifacts:
        rows.append((art.kind, f"{escape(art.uri)} ({len(art.files)} files)"))
    if job.error:
        phase = f" while {job.error.phase.value}" if job.error.phase else ""
        rows.append(("error", f"{escape(job.error.type)}{phase}: {escape(job.error.message)}"))
    print_kv(rows)
    if job.eval_generations:
        table = Table("prompt", "base", "tuned", show_lines=True)
        for g in job.eval_generations:
            table.add_row(escape(g.prompt), escape(g.base), escape(g.tuned))
        print_table(table)


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


def _short_model(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1] if ref.startswith("file://") else ref


def _csv_num(value: float | None) -> str:
    return "" if value is None else repr(value)
