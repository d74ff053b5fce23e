"""Snapshots: the first N pairs of a feedback stream (the list only grows, so "pairs 0..N"
names exactly what went in) frozen into a normal content-addressed dataset, validated like an
upload. A policy's runs are made of them, and so is `POST /v1/feedback/{stream}/snapshot`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec

from service.blobs import BlobStore
from service.contract import FeedbackSnapshot, Selection, SnapshotRows
from service.datasets.ingest import store_dataset
from service.datasets.validate import InvalidDataset, Limits
from service.retraining import feedback
from service.store import Conflict, DatasetQuota, Store

_encoder = msgspec.json.Encoder()


async def snapshot(
    store: Store,
    blobs: BlobStore,
    tenant: str,
    stream: str,
    *,
    limits: Limits,
    workdir: Path,
    end: int | None = None,
    select: Callable[[int, bytes], bool] | None = None,
    selection: Selection = "all",
    by: str = "api",
    name: str | None = None,
    rows: SnapshotRows = "pairs",
    quota: DatasetQuota | None = None,
) -> FeedbackSnapshot:
    """Freeze pairs 0 .. end-1 (all so far by default) into a dataset, and record it; with
    `rows="unpaired"`, the stream's ratings as labelled completions instead (for kto).
    `quota`: the tenant's dataset limits (LimitReached past them), for a snapshot asked for.

    The rows are written to a file in `workdir` (a slot of the host's upload space, which
    bounds how many such files there are at once), removed at the end.
    `select(index, canonical row JSON)` keeps a pair or leaves it out (a policy's held-out
    pairs). The rows go through the same validation as an upload, so the dataset has the
    same stats and warnings and the same sha256 as uploading those rows would give.
    Conflict if nothing is selected, or if it holds more than a dataset may (the operator's
    limits), found before the temp file grows past them.
    """
    meta = await feedback.get_stream(store, tenant, stream)
    total = await feedback.pair_count(store, tenant, stream, rows)
    end = total if end is None else min(end, total)
    what = "pairs" if rows == "pairs" else "ratings"
    raw_path = workdir / f"snapshot-{uuid.uuid4().hex}.jsonl"
    try:
        kept = size = 0
        with raw_path.open("wb") as out:
            for start in range(0, end, feedback.CHUNK):
                for i, pair in enumerate(
                    await feedback.read_pairs(
                        store, tenant, stream, start, min(start + feedback.CHUNK, end), rows
                    ),
                    start,
                ):
                    line = _encoder.encode(pair.row)
                    if len(line) > limits.max_line_bytes:  # stored before the limit was lowered
                        raise Conflict(
                            f"{what[:-1]} {i} of feedback stream {stream} is {len(line):,} bytes, "
                            f"past a dataset's line limit of {limits.max_line_bytes:,} "
                            "(the operator's FTUNE_MAX_LINE_BYTES)"
                        )
                    if select is None or select(i, line):
                        out.write(line + b"\n")
                        kept += 1
                        size += len(line) + 1
                        if kept > limits.max_rows or size > limits.max_bytes:
                            raise _too_large(stream, what, limits)
        if kept == 0:
            raise Conflict(
                f"feedback stream {stream} has no {what} to snapshot"
                + (f" ({selection} of the first {end})" if end else "")
                + (
                    f"; {meta.pending_ratings} ratings wait for an opposite rating (snapshot "
                    "rows=unpaired to train kto on them)"
                    if meta.pending_ratings and rows == "pairs"
                    else ""
                )
            )

        version = await feedback.next_version(store, tenant, stream)

        try:
            ds = await store_dataset(
                store,
                blobs,
                raw_path,
                tenant=tenant,
                name=name or f"{stream} v{version}",
                limits=limits,
                quota=quota,
            )
        except InvalidDataset as exc:  # the rows were checked on the way in; this is a bug
            raise RuntimeError(f"stored {what} of {stream} failed validation: {exc}") from exc
    finally:
        raw_path.unlink(missing_ok=True)
    now = time.time()
    record = FeedbackSnapshot(
        stream=stream,
        version=version,
        dataset=ds.ref(),
        selection=selection,
        rows=rows,
        pairs_end=end,
        excluded=end - kept,
        by=by,
        created_at=now,
    )
    await feedback.record_snapshot(store, tenant, stream, record)
    return record


def _too_large(stream: str, what: str, limits: Limits) -> Conflict:
    return Conflict(
        f"feedback stream {stream} holds more {what} than a dataset may: at most "
        f"{limits.max_rows:,} rows and {limits.max_bytes:,} bytes (the operator's "
        "FTUNE_MAX_DATASET_ROWS and FTUNE_MAX_DATASET_BYTES); start a new stream for new "
        "feedback, or ask the operator to raise them"
    )
