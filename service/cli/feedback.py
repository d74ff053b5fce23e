"""`ftune feedback ...`: post user feedback to a stream from a JSONL file, list and show streams,
read their pairs, snapshot them into a dataset.

A file is checked whole before anything is sent, then posted in batches that fit the API's
limits. Each event keeps its `id`; one without an id gets one made of its content and its
occurrence in the file, so posting a file again (after a network error, or after fixing a
line the API refused) stores nothing twice: the API counts known ids as duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from service.cli.app import (
    AsJson,
    Fail,
    app,
    check_name,
    handled,
    options,
    report_api_error,
    report_unreachable,
)
from service.cli.output import err, fmt_when, listing, out, print_json, print_kv, print_table
from service.client import ApiError, Unreachable
from service.contract import MAX_BATCH, MAX_REQUEST_BYTES, FeedbackSnapshot, FeedbackStream

feedback_app = typer.Typer(
    help="Post user feedback to streams, read their pairs, snapshot them into datasets.",
    no_args_is_help=True,
)
app.add_typer(feedback_app, name="feedback")

Stream = Annotated[str, typer.Argument(metavar="STREAM", callback=check_name, show_default=False)]

_BODY_ROOM = MAX_REQUEST_BYTES - 64
"""Bytes a batch's events may take: the request limit less `{"events": []}` and headroom."""


class PostSummary(msgspec.Struct, kw_only=True):
    """What `feedback post` did, over all its batches (the API answers one receipt a batch)."""

    stream: str
    batches: int
    received: int
    accepted: int
    duplicates: int
    """Events whose id the stream had seen: a file posted again adds nothing."""
    pairs_added: int
    pairs_total: int
    pending_ratings: int
    """Ratings in the stream still waiting for an opposite rating of their prompt."""


@feedback_app.command("post")
@handled
def feedback_post(
    ctx: typer.Context,
    stream: Stream,
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE.jsonl",
            exists=True,
            dir_okay=False,
            readable=True,
            help="One event a line: a pair (prompt, chosen, rejected), a rating (prompt, "
            "response, rating: up|down) or an edit (prompt, response, edited).",
        ),
    ],
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Events per request at most.")
    ] = MAX_BATCH,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the receipt (totals over the batches) as JSON.")
    ] = False,
) -> None:
    """Post a JSONL file of feedback events to a stream (created by its first event)."""
    if sum(1 for _ in read_events(file)) == 0:  # every line is checked before any is sent
        raise Fail(f"{file} holds no events", 2)
    summary = PostSummary(
        stream=stream,
        batches=0,
        received=0,
        accepted=0,
        duplicates=0,
        pairs_added=0,
        pairs_total=0,
        pending_ratings=0,
    )
    stored_to = 0
    with options(ctx).client() as client:
        for batch in batches(read_events(file), batch_size):
            lines = [number for number, _ in batch]
            try:
                receipt = client.post_feedback(stream, [event for _, event in batch])
            except (ApiError, Unreachable) as exc:
                if isinstance(exc, ApiError):
                    report_api_error(_at_lines(exc, file, lines))
                else:  # a timeout may come after the API stored the batch: retrying is safe
                    report_unreachable(exc)
                if stored_to:
                    err.print(
                        f"  lines 1-{stored_to} were stored; post the file again once it is "
                        "fixed: the events already stored count as duplicates"
                    )
                raise typer.Exit(1) from None
            stored_to = lines[-1]
            summary.batches += 1
            summary.received += receipt.received
            summary.accepted += receipt.accepted
            summary.duplicates += receipt.duplicates
            summary.pairs_added += receipt.pairs_added
            summary.pairs_total = receipt.pairs_total
        summary.pending_ratings = client.get_feedback_stream(stream).pending_ratings
    if as_json:
        print_json(summary)
        return
    plural = "batch" if summary.batches == 1 else "batches"
    out.print(
        f"posted {summary.received} events to [bold]{escape(stream)}[/] ({summary.batches} "
        f"{plural}): {summary.accepted} accepted, {summary.duplicates} duplicates"
    )
    out.print(f"pairs: {summary.pairs_added} added, {summary.pairs_total} in the stream")
    if summary.pending_ratings:
        out.print(
            f"{summary.pending_ratings} ratings wait for an opposite rating of the same prompt"
        )


@feedback_app.command("list")
@handled
def feedback_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    cursor: Annotated[str | None, typer.Option(help="From a previous page.")] = None,
    as_json: AsJson = False,
) -> None:
    """List feedback streams by name."""
    with options(ctx).client() as client:
        page = client.list_feedback_streams(limit, cursor)
    if as_json:
        print_json(page)
        return
    table = listing(
        "NAME", "FORMAT", "EVENTS", "PAIRS", "WAITING", "SNAPSHOTS", "UPDATED", no_wrap=("UPDATED",)
    )
    for s in page.items:
        table.add_row(
            s.name,
            s.format or "",
            str(s.events),
            str(s.pairs),
            str(s.pending_ratings),
            str(s.snapshots),
            fmt_when(s.updated_at),
        )
    print_table(table)
    if page.next_cursor:
        out.print(f"more: --cursor {page.next_cursor}")


@feedback_app.command("show")
@handled
def feedback_show(ctx: typer.Context, stream: Stream, as_json: AsJson = False) -> None:
    """Show a stream: its counts and newest snapshots."""
    with options(ctx).client() as client:
        meta = client.get_feedback_stream(stream)
    if as_json:
        print_json(meta)
        return
    print_stream(meta)


@feedback_app.command("pairs")
@handled
def feedback_pairs(
    ctx: typer.Context,
    stream: Stream,
    offset: Annotated[int, typer.Option(min=0, help="The first pair (0-based).")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: AsJson = False,
) -> None:
    """List a stream's pairs in the order gathered, with the events that made each."""
    with options(ctx).client() as client:
        page = client.feedback_pairs(stream, offset, limit)
    if as_json:
        print_json(page)
        return
    table = listing("#", "KIND", "PROMPT", "CHOSEN", "REJECTED", "EVENTS", no_wrap=("#", "KIND"))
    for number, pair in enumerate(page.items, page.offset):
        row = pair.row
        table.add_row(
            str(number),
            pair.kind,
            *(escape(_excerpt(row.get(key))) for key in ("prompt", "chosen", "rejected")),
            escape(", ".join(pair.events)),
        )
    print_table(table)
    end = page.offset + len(page.items)
    shown = f"pairs {page.offset}-{end - 1}" if page.items else "no pairs"
    out.print(f"{shown} of {page.total}")
    if end < page.total:
        out.print(f"more: --offset {end}")


@feedback_app.command("snapshot")
@handled
def feedback_snapshot(
    ctx: typer.Context,
    stream: Stream,
    unpaired: Annotated[
        bool,
        typer.Option(
            "--unpaired", help="Every rating as a labelled completion (for kto) instead of pairs."
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Freeze every pair so far into a new dataset (to train on with `ftune jobs submit`)."""
    with options(ctx).client() as client:
        snap = client.snapshot_feedback(stream, "unpaired" if unpaired else "pairs")
    if as_json:
        print_json(snap)
        return
    ds = snap.dataset
    out.print(
        f"snapshot {snap.version} of {escape(stream)}: [bold]{ds.id}[/] ({ds.rows} rows, "
        f"{ds.format}) from {'ratings' if unpaired else 'pairs'} 0-{snap.pairs_end - 1}"
    )


def print_stream(meta: FeedbackStream) -> None:
    print_kv(
        [
            ("stream", escape(meta.name)),
            ("format", meta.format or "(no event yet)"),
            ("events", f"{meta.events} ({meta.duplicates} duplicates ignored)"),
            ("pairs", str(meta.pairs)),
            ("ratings", f"{meta.ratings} (unpaired rows, for kto)"),
            ("waiting", f"{meta.pending_ratings} ratings without an opposite rating yet"),
            ("snapshots", str(meta.snapshots)),
            ("created", fmt_when(meta.created_at)),
            ("updated", fmt_when(meta.updated_at)),
        ]
    )
    if meta.recent_snapshots:
        out.print(_snapshot_table(meta.recent_snapshots))


def _snapshot_table(snapshots: list[FeedbackSnapshot]) -> Table:
    table = listing("VERSION", "DATASET", "ROWS", "SELECTION", "PAIRS", "BY", "CREATED")
    for s in snapshots:
        table.add_row(
            str(s.version),
            s.dataset.id,
            str(s.dataset.rows),
            s.selection + (f" ({s.excluded} left out)" if s.excluded else ""),
            f"0-{s.pairs_end - 1}",
            escape(s.by),
            fmt_when(s.created_at),
        )
    return table


def read_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, event) for every non-blank line; an event without an `id` gets one made
    of its content and how many times that content came before in the file."""
    seen: Counter[str] = Counter()
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Fail(f"{path}: line {number}: not valid JSON: {exc.msg}", 2) from None
            except UnicodeDecodeError:
                raise Fail(f"{path}: line {number}: not UTF-8 text", 2) from None
            if not isinstance(event, dict):
                raise Fail(f"{path}: line {number}: expected an event object", 2)
            if "id" not in event:
                content = msgspec.json.encode(event, order="sorted")
                digest = hashlib.sha256(content).hexdigest()[:32]
                seen[digest] += 1
                event = {"id": f"{digest}-{seen[digest]}", **event}
            size = len(msgspec.json.encode(event))
            if size > _BODY_ROOM:
                raise Fail(
                    f"{path}: line {number}: the event is {size} bytes; the API takes at most "
                    f"{_BODY_ROOM} in one request",
                    2,
                )
            yield number, event


def batches(
    events: Iterator[tuple[int, dict[str, Any]]], size: int
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """At most `size` events, and at most a request's worth of bytes, per batch."""
    batch: list[tuple[int, dict[str, Any]]] = []
    used = 0
    for item in events:
        cost = len(msgspec.json.encode(item[1])) + 1  # and its comma
        if batch and (len(batch) == size or used + cost > _BODY_ROOM):
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += cost
    if batch:
        yield batch


def _at_lines(exc: ApiError, path: Path, lines: list[int]) -> ApiError:
    """The API locates a bad event by its index in the batch; say its line in the file."""
    if exc.status != 422:
        return exc
    errors = []
    for e in exc.errors:
        loc = e.get("loc") or []
        if len(loc) >= 3 and loc[:2] == ["body", "events"] and str(loc[2]).isdigit():
            index = int(loc[2])
            if index < len(lines):
                e = {"line": lines[index], "field": e.get("field"), "msg": e.get("msg", "")}
        errors.append(e)
    detail = f"{path}: the batch of lines {lines[0]}-{lines[-1]} was refused; none of it was stored"
    return replace(exc, detail=detail, errors=errors)


def _excerpt(value: Any, width: int = 60) -> str:
    """A text or a conversation on one short line."""
    if isinstance(value, list):
        text = " | ".join(
            f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in value
        )
    else:
        text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
