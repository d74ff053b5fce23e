"""The contract of webhooks: the body a receiver gets and the delivery log."""

from __future__ import annotations

from typing import Literal

import msgspec

from service.contract.jobs import Artifact, JobError, JobStatus

EventType = Literal["job.succeeded", "job.failed", "job.cancelled"]


class WebhookJobData(msgspec.Struct, kw_only=True):
    status: JobStatus
    error: JobError | None
    artifacts: list[Artifact]
    latest_metrics: dict[str, float]
    finished_at: float | None
    attempt: int
    labels: dict[str, str]


class WebhookEvent(msgspec.Struct, kw_only=True):
    """The JSON body a receiver gets. Built from the job record, which holds no secrets."""

    id: str
    type: EventType
    job_id: str
    status: JobStatus
    created_at: float
    data: WebhookJobData


class WebhookDelivery(msgspec.Struct, kw_only=True):
    """One delivery attempt, as kept in `ftune:webhook:{job_id}`."""

    event_id: str
    type: str
    attempt: int
    at: float
    ok: bool
    status_code: int | None = None
    error: str | None = None
    duration_ms: float = 0.0
    next_attempt_at: float | None = None
    """When the next attempt is due; null when none will follow (delivered or given up)."""
