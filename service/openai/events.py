"""A job's event stream and checkpoints as OpenAI's events and checkpoint objects. Pure.

Every entry of our per-job stream (the same one `GET /v1/jobs/{id}/events` serves as SSE) is
one event, its id the entry's position: status changes, phases and log lines are `message`
events, metric points `metrics` events whose data carry OpenAI's names (`step`,
`total_steps`, `train_loss`, `valid_loss`) beside every metric under TRL's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from service.contract import MetricPoint
from service.contract.openai import CheckpointMetrics, FineTuningJobCheckpoint, FineTuningJobEvent
from service.store import is_stream_id

EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
_CHECKPOINT = re.compile(r"^(?P<job>job_[A-Za-z0-9]{1,64})-(?P<step>\d{1,12})\Z")
_STATUS_WORDS = {
    "queued": "Job queued",
    "running": "Job started",
    "succeeded": "Job succeeded",
    "cancelled": "Job cancelled",
    "failed": "Job failed",
}


def event_id(entry_id: str) -> str:
    return EVENT_PREFIX + entry_id


def entry_of(event: str) -> str | None:
    """The stream position an event id names, else None."""
    entry = event.removeprefix(EVENT_PREFIX)
    return entry if event.startswith(EVENT_PREFIX) and is_stream_id(entry) else None


def checkpoint_id(job_id: str, step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{job_id}-{step}"


def step_of_checkpoint(checkpoint: str, job_id: str) -> int | None:
    """The step a checkpoint id of `job_id` names, else None."""
    match = _CHECKPOINT.match(checkpoint.removeprefix(CHECKPOINT_PREFIX))
    if not checkpoint.startswith(CHECKPOINT_PREFIX) or not match or match["job"] != job_id:
        return None
    return int(match["step"])


def event_object(
    entry_id: str, kind: str, data: bytes, *, total_steps: int | None
) -> FineTuningJobEvent:
    """One stream entry (id, type, JSON data) as an event."""
    at = int(entry_id.partition("-")[0]) // 1000
    body: dict[str, Any] = msgspec.json.decode(data)
    level: Literal["info", "warn", "error"] = "info"
    if kind == "metrics":
        point = msgspec.convert(body, MetricPoint)
        return FineTuningJobEvent(
            id=event_id(entry_id),
            created_at=at,
            level=level,
            message=_metrics_message(point, total_steps),
            type="metrics",
            data=_metrics_data(point, total_steps),
        )
    if kind == "status":
        status, attempt = body["status"], body.get("attempt", 0)
        message = _STATUS_WORDS.get(status, f"Job {status}")
        if status == "queued" and attempt:
            message, level = f"Job re-queued as attempt {attempt}: its worker was lost", "warn"
        elif status == "running" and attempt:
            message = f"Job started (attempt {attempt})"
        elif status == "failed":
            error = body.get("error") or {}
            message = f"Job failed: {error.get('type', 'error')}: {error.get('message', '')}"
            level = "error"
        elif status == "cancelled":
            level = "warn"
    elif kind == "phase":
        message = f"Phase: {body['phase']}"
    else:
        message = str(body.get("message", ""))
    return FineTuningJobEvent(
        id=event_id(entry_id),
        created_at=at,
        level=level,
        message=message,
        type="message",
        data=body if kind == "status" else None,
    )


def _metrics_data(point: MetricPoint, total_steps: int | None) -> dict[str, Any]:
    values = point.values
    return {
        "step": point.step,
        "total_steps": total_steps,
        "train_loss": values.get("loss"),
        "valid_loss": values.get("eval_loss"),
        **values,
    }


def _metrics_message(point: MetricPoint, total_steps: int | None) -> str:
    of = f"/{total_steps}" if total_steps else ""
    parts = [f"Step {point.step}{of}"]
    for key, label in (
        ("loss", "training loss"),
        ("eval_loss", "validation loss"),
        ("rewards/accuracies", "reward accuracy"),
    ):
        if key in point.values:
            parts.append(f"{label}={point.values[key]:.4f}")
    return ", ".join(parts)


def checkpoint_object(
    job_id: str, step: int, uri: str, points: Sequence[MetricPoint], *, fallback_time: float
) -> FineTuningJobCheckpoint:
    """A stored checkpoint; `points` are the job's metric points (those of `step` are used)."""
    at_step = [p for p in points if p.step == step]
    values: dict[str, float] = {}
    for point in at_step:
        values |= point.values
    return FineTuningJobCheckpoint(
        id=checkpoint_id(job_id, step),
        created_at=int(at_step[0].time if at_step else fallback_time),
        fine_tuned_model_checkpoint=uri,
        fine_tuning_job_id=job_id,
        step_number=step,
        metrics=CheckpointMetrics(
            step=float(step),
            train_loss=values.get("loss"),
            train_mean_token_accuracy=values.get("mean_token_accuracy"),
            valid_loss=values.get("eval_loss"),
            valid_mean_token_accuracy=values.get("eval_mean_token_accuracy"),
            train_rewards_accuracies=values.get("rewards/accuracies"),
            train_rewards_margins=values.get("rewards/margins"),
        ),
    )
