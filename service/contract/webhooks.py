"""The contract of webhooks: the body a receiver gets and the delivery log."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.contract import Artifact, JobError, JobStatus

EventType = Literal["job.succeeded", "job.failed", "job.cancelled"]
OpenAIEventType = Literal[
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"
]


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


class OpenAIWebhookData(msgspec.Struct, kw_only=True):
    id: Annotated[str, msgspec.Meta(description="The fine-tuning job's id.")]


class OpenAIWebhookEvent(msgspec.Struct, kw_only=True):
    """The body a receiver gets for a job with `webhook_format: openai`: OpenAI's event, which
    the `openai` SDK's `client.webhooks.unwrap` parses."""

    id: Annotated[str, msgspec.Meta(description="The event id, the same on every retry.")]
    object: Annotated[Literal["event"], msgspec.Meta(description="Always `event`.")] = "event"
    created_at: Annotated[int, msgspec.Meta(description="Unix seconds the job ended at.")]
    type: Annotated[OpenAIEventType, msgspec.Meta(description="What happened to the job.")]
    data: Annotated[OpenAIWebhookData, msgspec.Meta(description="Which job.")]


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
