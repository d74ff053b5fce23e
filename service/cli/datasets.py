"""`ftune datasets ...`: upload (streamed, with a progress bar when it is worth one), import
from the Hub or S3, list, show and delete datasets."""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service.cli.app import AsJson, app, handled, options
from service.cli.output import (
    err,
    fmt_num,
    fmt_when,
    listing,
    out,
    print_json,
    print_kv,
    print_table,
)
from service.contract import Dataset, DatasetImport, Message, numbered_as, trained_by


class OnInvalidChoice(enum.StrEnum):
    reject = "reject"
    skip = "skip"


datasets_app = typer.Typer(
    help="Upload, import and inspect datasets (preference, SFT and unpaired rows).",
    no_args_is_help=True,
)
app.add_typer(datasets_app, name="datasets")


Prompt = Annotated[str | None, typer.Option(help="Column holding the prompt.")]
Chosen = Annotated[str | None, typer.Option(help="Column holding the chosen answer.")]
Rejected = Annotated[str | None, typer.Option(help="Column holding the rejected answer.")]
System = Annotated[str | None, typer.Option(help="Column holding each prompt's system message.")]
History = Annotated[
    str | None, typer.Option(help="Column holding earlier turns placed before each prompt.")
]
Completion = Annotated[
    str | None, typer.Option(help="Column holding the completion (sft or unpaired rows).")
]
Label = Annotated[
    str | None, typer.Option(help="Column holding a true/false label (unpaired rows).")
]
Messages = Annotated[str | None, typer.Option(help="Column holding a whole chat (sft rows).")]
OnInvalidOpt = Annotated[
    OnInvalidChoice,
    typer.Option(help="reject: one bad row refuses the file; skip: bad rows are left out."),
]
MaxInvalid = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="With --on-invalid skip, the most rows that may be bad."),
]


@datasets_app.command("upload")
@handled
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="A JSONL, JSON, Parquet or CSV file, gzipped or not.",
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: file name).")] = None,
    prompt_field: Prompt = None,
    chosen_field: Chosen = None,
    rejected_field: Rejected = None,
    system_field: System = None,
    history_field: History = None,
    completion_field: Completion = None,
    label_field: Label = None,
    messages_field: Messages = None,
    on_invalid: OnInvalidOpt = OnInvalidChoice.reject,
    max_invalid_fraction: MaxInvalid = 0.01,
    as_json: AsJson = False,
) -> None:
    """Upload a dataset: preference, sft or unpaired rows (streamed; validated by the
    server)."""
    size = file.stat().st_size
    with options(ctx).client() as client, _upload_progress(size, quiet=as_json) as advance:
        ds = client.upload_dataset(file, name, on_progress=advance, **_reading(ctx))
    _print_stored(ds, "uploaded", as_json)


@datasets_app.command("import")
@handled
def datasets_import(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="hf://datasets/ORG/NAME, hf://datasets/ORG/NAME/FOLDER_OR_FILE, or s3://bucket/key.",
            show_default=False,
        ),
    ],
    split: Annotated[str | None, typer.Option(help="Hub split (default: train).")] = None,
    config: Annotated[
        str | None, typer.Option(help="Hub config, among those of the repo's README card.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub branch, tag or commit (default: main).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Dataset name (default: the repo's name and split).")
    ] = None,
    prompt_field: Prompt = None,
    chosen_field: Chosen = None,
    rejected_field: Rejected = None,
    system_field: System = None,
    history_field: History = None,
    completion_field: Completion = None,
    label_field: Label = None,
    messages_field: Messages = None,
    on_invalid: OnInvalidOpt = OnInvalidChoice.reject,
    max_invalid_fraction: MaxInvalid = 0.01,
    as_json: AsJson = False,
) -> None:
    """Import a dataset from where it is published (the Hub or S3): the server fetches it and
    validates it like an upload."""
    where: dict[str, Any] = {
        "source": source,
        "revision": revision,
        "split": split,
        "config": config,
    }
    req = DatasetImport(name=name, **where, **_reading(ctx))
    with options(ctx).client() as client:
        ds = client.import_dataset(req)
    _print_stored(ds, "imported", as_json)


_READING = (
    "prompt_field",
    "chosen_field",
    "rejected_field",
    "system_field",
    "history_field",
    "completion_field",
    "label_field",
    "messages_field",
    "on_invalid",
    "max_invalid_fraction",
)


def _reading(ctx: typer.Context) -> dict[str, Any]:
    """How to read the rows: the options upload and import share, as given."""
    given = {k: ctx.params[k] for k in _READING if ctx.params[k] is not None}
    return {k: str(v) if isinstance(v, enum.Enum) else v for k, v in given.items()}


def _print_stored(ds: Dataset, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(ds)
        return
    out.print(
        f"{verb} [bold]{ds.id}[/] ({escape(ds.name)}): {ds.rows} rows, {ds.kind}, {ds.format}, "
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
        print_json(page)
        return
    table = listing("ID", "NAME", "KIND", "ROWS", "FORMAT", "SIZE", "CREATED")
    for ds in page.items:
        table.add_row(
            ds.id,
            escape(ds.name),
            ds.kind,
            str(ds.rows),
            ds.format,
            _size(ds.bytes),
            fmt_when(ds.created_at),
        )
    print_table(table)
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
        print_json({"dataset": ds, "rows": page.rows} if page else ds)
        return
    print_kv(
        [
            ("id", ds.id),
            ("name", ds.name),
            ("rows", str(ds.rows)),
            ("kind", f"{ds.kind}: trains {', '.join(trained_by(ds.kind))}"),
            ("format", f"{ds.format} (uploaded as {ds.source_format})"),
            ("size", f"{_size(ds.bytes)} normalized, {_size(ds.source_bytes)} uploaded"),
            ("sha256", ds.sha256),
            ("created", fmt_when(ds.created_at)),
        ]
    )
    stats = Table("chars", "min", "mean", "p95", "max", box=None)
    for label, values in _length_rows(ds):
        stats.add_row(label, *(fmt_num(values.get(k)) for k in ("min", "mean", "p95", "max")))
    out.print(stats)
    if ds.stats.desirable_rows is not None:
        out.print(f"desirable rows: {ds.stats.desirable_rows} of {ds.rows}")
    _print_warnings(ds)
    for i, row in enumerate(page.rows if page else [], 1):
        out.print(f"[bold]row {i}[/]")
        for part in ("prompt", "chosen", "rejected", "completion"):
            value = getattr(row, part)
            if value is None:
                continue
            turns = (
                [(None, value)]
                if isinstance(value, str)
                else [(m.role + (", trained" if m.weight else ""), _said(m)) for m in value]
            )
            for role, text in turns:
                tag = f"[{role}] " if role else ""
                out.print(f"  {part:<11}" + escape(tag + text), highlight=False)
        if row.label is not None:
            out.print(f"  {'label':<11}{'desirable' if row.label else 'undesirable'}")


def _said(m: Message) -> str:
    """A message's text, and the functions it calls as name(arguments)."""
    calls = [
        f"{c.function.name}({json.dumps(c.function.arguments, ensure_ascii=False)})"
        for c in m.tool_calls or []
    ]
    return " ".join([m.content, *calls] if m.content else calls)


def _length_rows(ds: Dataset) -> list[tuple[str, dict[str, float]]]:
    """The answer columns a dataset's kind has: a pair for preference rows, one otherwise."""
    answers = (
        [("chosen", ds.stats.chosen_chars), ("rejected", ds.stats.rejected_chars)]
        if ds.kind == "preference"
        else [("completion", ds.stats.completion_chars)]
    )
    return [("prompt", ds.stats.prompt_chars), *answers]


@datasets_app.command("delete")
@handled
def datasets_delete(
    ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(metavar="ID")]
) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with options(ctx).client() as client:
        client.delete_dataset(dataset_id)
    out.print(f"deleted {dataset_id}")


def _print_warnings(ds: Dataset) -> None:
    """What the upload left out or probably did not mean, on stderr."""
    unit = numbered_as(ds.container)
    if ds.skipped_rows:
        err.print(f"[yellow]skipped {ds.skipped_rows} invalid rows:[/]")
        for problem in ds.skipped[:10]:
            where = f"{problem.field}: " if problem.field else ""
            err.print(f"  {unit} {problem.line}: " + escape(where + problem.msg))
    for w in ds.warnings:  # each message says its count of rows
        at = ", ".join(str(n) for n in w.lines[:5]) + (", ..." if w.count > 5 else "")
        err.print(f"[yellow]warning:[/] {escape(w.msg)}" + (f" ({unit}s {at})" if w.lines else ""))


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


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
