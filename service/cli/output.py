"""How the CLI prints: the two consoles, JSON answers, tables, and the formats of values.

Results go to stdout (`out`), messages and warnings to stderr (`err`), so `--json` output
and CSV stay clean for pipes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from service.contract import Job, JobStatus

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

NO_WRAP = ("ID", "DATASET", "CREATED", "STATUS", "STEP", "ROWS", "SIZE")
"""Columns for copying (ids, dates) or short numbers: never wrapped or cut."""

STATE_COLORS = {
    "succeeded": "green",
    "promoted": "green",
    "failed": "red",
    "rejected": "red",
    "lost": "red",
    "not_started": "red",
    "cancelled": "yellow",
    "running": "cyan",
}


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def listing(*headers: str, no_wrap: Sequence[str] = NO_WRAP) -> Table:
    """A plain listing whose ids and dates never wrap or get cut: they are for copying (the
    other columns fold); print it with :func:`print_table`."""
    table = Table(box=None)
    for header in headers:
        table.add_column(header, no_wrap=header in no_wrap, min_width=len(header), overflow="fold")
    return table


def print_table(table: Table) -> None:
    """Print a table whole: wider than the terminal (or the 80 columns a pipe gets) rather
    than with an id cut short or a column left out."""
    need = Measurement.get(out, out.options.update(width=10_000), table).minimum
    wide = need > out.width
    (Console(highlight=False, soft_wrap=True, width=need) if wide else out).print(table)


def print_kv(rows: Sequence[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # a long URI folds, whole, rather than being cut
    for key, value in rows:
        table.add_row(key, value)
    print_table(table)


def fmt_metrics(metrics: dict[str, float], every: bool = False) -> str:
    if every:
        keys = sorted(metrics)
    else:
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins") if k in metrics]
    short = {"rewards/accuracies": "acc", "rewards/margins": "margin"}
    return "  ".join(f"{k if every else short.get(k, k)} {fmt_num(metrics[k])}" for k in keys)


def fmt_status(status: JobStatus | str) -> str:
    """A job's status, or a run's status or decision, in its color (green is good)."""
    value = str(status)
    color = STATE_COLORS.get(value)
    return f"[{color}]{value}[/]" if color else value


def fmt_steps(job: Job) -> str:
    total = job.progress.total_steps
    return f"{job.progress.step}/{total}" if total else str(job.progress.step)


def fmt_when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_num(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
