"""The contract of webhooks: the body a receiver gets and the delivery log."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.contract.jobs import Artifact, JobError, JobStatus
from service.contract.policies import PolicyRun, Promoted

EventType = Literal["job.succeeded", "job.failed", "job.cancelled"]
OpenAIEventType = Literal[
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"
]

PolicyEventType = Literal["policy.run.promoted", "policy.run.rejected"]


class WebhookJobData(msgspec.Struct, kw_only=True):
    """What the job record says about how it ended."""

    status: Annotated[JobStatus, msgspec.Meta(description="The job's final status.")]
    error: Annotated[
        JobError | None, msgspec.Meta(description="Why it failed; null unless it failed.")
    ]
    artifacts: Annotated[
        list[Artifact], msgspec.Meta(description="What it published; empty unless it succeeded.")
    ]
    latest_metrics: Annotated[
        dict[str, float], msgspec.Meta(description="The newest value of each metric.")
    ]
    finished_at: Annotated[
        float | None, msgspec.Meta(description="When it ended, in seconds since the epoch.")
    ]
    attempt: Annotated[
        int, msgspec.Meta(description="0 for the first run; +1 per re-queue after a lost worker.")
    ]
    labels: Annotated[dict[str, str], msgspec.Meta(description="The spec's labels.")]


class WebhookEvent(msgspec.Struct, kw_only=True):
    """The JSON body a receiver gets. Built from the job record, which holds no secrets."""

    id: Annotated[
        str,
        msgspec.Meta(
            description="Stable per job and final status: a redelivery carries the same id, "
            "so receivers can drop repeats."
        ),
    ]
    type: Annotated[
        EventType, msgspec.Meta(description="`job.succeeded`, `job.failed` or `job.cancelled`.")
    ]
    job_id: Annotated[str, msgspec.Meta(description="The job that ended.")]
    status: Annotated[JobStatus, msgspec.Meta(description="The job's final status.")]
    created_at: Annotated[
        float, msgspec.Meta(description="When the event was made, in seconds since the epoch.")
    ]
    data: Annotated[WebhookJobData, msgspec.Meta(description="The job as it ended.")]


class PolicyWebhookEvent(msgspec.Struct, kw_only=True):
    """The body a policy's template `webhook_url` gets when the gate has decided a run (beside
    the run's job's own event, in either order): whether the retrained model is now the one
    to serve."""

    id: Annotated[
        str, msgspec.Meta(description="Stable per run: a redelivery carries the same id.")
    ]
    type: Annotated[
        PolicyEventType,
        msgspec.Meta(
            description="`policy.run.promoted` (the run's model is the policy's model now) or "
            "`policy.run.rejected` (the gate refused it, its job did not succeed, or the run "
            "could not start)."
        ),
    ]
    policy: Annotated[str, msgspec.Meta(description="The policy's name.")]
    job_id: Annotated[
        str | None,
        msgspec.Meta(
            description="The run's job (its delivery log lists this event too); null for a run "
            "that has none (`not_started`, `lost`)."
        ),
    ]
    created_at: Annotated[
        float, msgspec.Meta(description="When the event was made, in seconds since the epoch.")
    ]
    run: Annotated[
        PolicyRun,
        msgspec.Meta(description="The run as decided: its gate checks, metrics and reason."),
    ]
    promoted: Annotated[
        Promoted | None,
        msgspec.Meta(
            description="The policy's promoted model after this decision (this run's when "
            "promoted; otherwise the one still served, or null)."
        ),
    ]


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

    event_id: Annotated[str, msgspec.Meta(description="The event's id (`webhook-id`).")]
    type: Annotated[str, msgspec.Meta(description="The event type, e.g. `job.succeeded`.")]
    attempt: Annotated[int, msgspec.Meta(description="1 for the first attempt.")]
    at: Annotated[float, msgspec.Meta(description="When it was sent, in seconds since the epoch.")]
    ok: Annotated[bool, msgspec.Meta(description="Whether the receiver answered 2xx.")]
    status_code: Annotated[
        int | None, msgspec.Meta(description="The receiver's HTTP status; null if none came.")
    ] = None
    error: Annotated[
        str | None, msgspec.Meta(description="What went wrong (a status, a timeout, ...).")
    ] = None
    duration_ms: Annotated[float, msgspec.Meta(description="How long the attempt took.")] = 0.0
    next_attempt_at: Annotated[
        float | None,
        msgspec.Meta(
            description="When the next attempt is due; null when none will follow (delivered "
            "or given up)."
        ),
    ] = None


class WebhookDeliveries(msgspec.Struct, kw_only=True):
    """A job's webhook delivery attempts, oldest first (the newest 100 are kept)."""

    job_id: Annotated[str, msgspec.Meta(description="The job's id.")]
    deliveries: Annotated[list[WebhookDelivery], msgspec.Meta(description="The attempts.")]
