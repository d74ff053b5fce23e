"""Files both ways. Pure: the API looks the records up and passes them in.

Three kinds of file, told apart by their id:

- `ds_...`: an upload that passed validation is one of our datasets (same validation, same
  storage as `POST /v1/datasets`); its content is the normalized JSONL we train on.
- `file_...`: an upload that failed validation; nothing of it was stored but a record with its
  line-numbered errors, so that `wait_for_processing` ends on `error` and says why.
- `res_...`: a succeeded job's per-step metrics as CSV, made from its metrics stream on
  request; `res_X` belongs to `job_X`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence

from service.contract import Dataset, MetricPoint, numbered_as
from service.contract.openai import FileObject

RESULT_PREFIX = "res_"
JOB_PREFIX = "job_"
MAX_DETAILS = 20
"""Validation errors spelled out in status_details; the total is always given."""
_NAME_CHARS = re.compile(r"[^\w .,:()+-]+")
FIRST_COLUMNS = ("step", "train_loss", "valid_loss")


def result_file_id(job_id: str) -> str:
    return RESULT_PREFIX + job_id.removeprefix(JOB_PREFIX)


def job_of_result_file(file_id: str) -> str | None:
    """The job a `res_...` file belongs to, else None."""
    if not file_id.startswith(RESULT_PREFIX):
        return None
    return JOB_PREFIX + file_id.removeprefix(RESULT_PREFIX)


def dataset_name(filename: str | None) -> str:
    """A dataset name (our pattern: word characters and ` .,:()+-`) for an uploaded file's
    name: anything else becomes `_`."""
    name = _NAME_CHARS.sub("_", (filename or "").strip())[:128].strip()
    return name or "upload.jsonl"


def dataset_file(ds: Dataset) -> FileObject:
    notes = [w.msg for w in ds.warnings]  # each says its count of rows
    if ds.skipped_rows:  # on_invalid=skip: what was left out is said, as a warning is
        errors = [(e.line, e.field, e.msg) for e in ds.skipped]
        unit = numbered_as(ds.container)
        notes.insert(0, f"left out {status_details(errors, ds.skipped_rows, unit)}")
    warnings = "; ".join(notes)
    return FileObject(
        id=ds.id,
        bytes=ds.bytes,
        created_at=int(ds.created_at),
        filename=ds.name,
        purpose="fine-tune",
        status="processed",
        status_details=f"processed with warnings: {warnings}" if warnings else None,
    )


def result_file(job_id: str, *, created_at: float, size: int) -> FileObject:
    return FileObject(
        id=result_file_id(job_id),
        bytes=size,
        created_at=int(created_at),
        filename=f"{job_id}-metrics.csv",
        purpose="fine-tune-results",
        status="processed",
    )


def status_details(
    errors: Sequence[tuple[int | None, str | None, str]], total: int, unit: str = "line"
) -> str:
    """`(line, field, message)` validation errors as one line of text, the first few spelled out
    (``unit``: what the numbers count, :func:`service.contract.numbered_as`)."""
    shown = [
        " ".join(
            part
            for part in (f"{unit} {line}:" if line else "", f"{field}:" if field else "", msg)
            if part
        )
        for line, field, msg in errors[:MAX_DETAILS]
    ]
    more = f"; and {total - len(shown)} more" if total > len(shown) else ""
    return f"{total} invalid rows: " + "; ".join(shown) + more


def metrics_csv(points: Sequence[MetricPoint]) -> bytes:
    """One row per step: step, train_loss (TRL's loss), valid_loss (eval_loss), then every
    other metric under TRL's name, train and eval points of a step merged."""
    rows: dict[int, dict[str, float]] = {}
    for point in points:
        row = rows.setdefault(point.step, {})
        for key, value in point.values.items():
            name = {"loss": "train_loss", "eval_loss": "valid_loss"}.get(key, key)
            row[name] = value
    others = sorted({k for row in rows.values() for k in row} - set(FIRST_COLUMNS))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIRST_COLUMNS, *others])
    for step in sorted(rows):
        row = rows[step]
        writer.writerow([step, *(_cell(row.get(k)) for k in (*FIRST_COLUMNS[1:], *others))])
    return out.getvalue().encode()


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)
