"""Webhook events: built from a job that ended and queued for delivery (signed when sent)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from service.contract import (
    EventType,
    Job,
    JobStatus,
    OpenAIEventType,
    OpenAIWebhookData,
    OpenAIWebhookEvent,
    Policy,
    PolicyWebhookEvent,
    WebhookDelivery,
    WebhookEvent,
    WebhookJobData,
)

P = "ftune:"


DUE = f"{P}webhooks:due"
"""Sorted set: event id -> unix time its next attempt is due (or its claim lapses)."""


LOG_MAX = 100
"""Delivery attempts kept per job."""


EVENT_TTL_SECONDS = 7 * 24 * 3600
"""How long a finished event is remembered (enqueueing it again within that time is a no-op)."""


def log_key(job_id: str) -> str:
    return f"{P}webhook:{job_id}"


def event_key(event_id: str) -> str:
    return f"{P}webhook-event:{event_id}"


_EVENT_TYPES: dict[JobStatus, EventType] = {
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.cancelled: "job.cancelled",
}
_OPENAI_TYPES: dict[JobStatus, OpenAIEventType] = {
    JobStatus.succeeded: "fine_tuning.job.succeeded",
    JobStatus.failed: "fine_tuning.job.failed",
    JobStatus.cancelled: "fine_tuning.job.cancelled",
}


_delivery_decoder = msgspec.json.Decoder(WebhookDelivery)


_encoder = msgspec.json.Encoder()


def event_id(job_id: str, status: JobStatus) -> str:
    """Stable per (job, terminal status): a job ends once, so this names its one event."""
    return _named(f"{job_id}:{status.value}")


def _named(what: str) -> str:
    return "evt_" + hashlib.sha256(what.encode()).hexdigest()[:24]


def build_event(job: Job, *, now: float | None = None) -> WebhookEvent:
    if not job.status.terminal:
        raise ValueError(f"job {job.id} is {job.status.value}, not finished")
    data = WebhookJobData(
        status=job.status,
        error=job.error,
        artifacts=job.artifacts,
        latest_metrics=job.latest_metrics,
        finished_at=job.finished_at,
        attempt=job.attempt,
        labels=job.spec.labels,
    )
    return WebhookEvent(
        id=event_id(job.id, job.status),
        type=_EVENT_TYPES[job.status],
        job_id=job.id,
        status=job.status,
        created_at=time.time() if now is None else now,
        data=data,
    )


_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', ARGV[3], 'tenant', ARGV[4], 'url', ARGV[5],
           'type', ARGV[6], 'body', ARGV[7], 'attempts', 0, 'state', 'pending')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


def build_openai_event(job: Job) -> OpenAIWebhookEvent:
    """The body for a job with `webhook_format: openai`: OpenAI's event, same id."""
    if not job.status.terminal:
        raise ValueError(f"job {job.id} is {job.status.value}, not finished")
    return OpenAIWebhookEvent(
        id=event_id(job.id, job.status),
        created_at=int(job.finished_at or time.time()),
        type=_OPENAI_TYPES[job.status],
        data=OpenAIWebhookData(id=job.id),
    )


def _enqueue_args(job: Job) -> tuple[Any, ...] | None:
    if job.spec.webhook_url is None:
        return None
    event: WebhookEvent | OpenAIWebhookEvent = (
        build_openai_event(job) if job.spec.webhook_format == "openai" else build_event(job)
    )
    return _queued(event, job.id, job.tenant, job.spec.webhook_url)


def _queued(
    event: WebhookEvent | OpenAIWebhookEvent | PolicyWebhookEvent,
    job_id: str,
    tenant: str,
    url: str,
) -> tuple[Any, ...]:
    """The script's call that queues `event` once (its attempts are logged with the job's)."""
    return (
        _ENQUEUE,
        2,
        event_key(event.id),
        DUE,
        event.id,
        repr(time.time()),
        job_id,
        tenant,
        url,
        event.type,
        _encoder.encode(event),
    )


def stage_verdict(pipe: Pipeline, policy: Policy, run_id: str) -> None:
    """Add the event of a decided run to the transaction that records the decision, for a
    template with a `webhook_url` (OpenAI's format has no such event: none is sent)."""
    template = policy.spec.template
    if template.webhook_url is None or template.webhook_format == "openai":
        return
    run = next(r for r in policy.runs if r.id == run_id)
    job_id = None if run.status in ("not_started", "lost") else run.job_id
    event = PolicyWebhookEvent(
        id=_named(f"{policy.tenant}:{policy.name}:{run.id}:decided"),
        type="policy.run.promoted" if run.decision == "promoted" else "policy.run.rejected",
        policy=policy.name,
        job_id=job_id,
        created_at=time.time(),
        run=run,
        promoted=policy.promoted,
    )
    # A run without a job has no delivery log to keep its attempts in ("" keeps none).
    pipe.eval(*_queued(event, job_id or "", policy.tenant, template.webhook_url))


async def enqueue_webhook(redis: Redis, job: Job) -> bool:
    """Queue the job's terminal event for delivery, if it has a webhook_url.

    Idempotent: True if queued now, False if there is no URL or it was already queued.
    Call after the terminal status is stored; `stage_webhook` does it inside that transaction.
    """
    args = _enqueue_args(job)
    if args is None:
        return False
    return bool(await redis.eval(*args))  # type: ignore[misc]  # redis-py#2399


def stage_webhook(pipe: Pipeline, job: Job) -> None:
    """Add the enqueue to a Redis transaction (e.g. the one that stores the terminal status),
    so a process dying right after the status change cannot lose the webhook."""
    args = _enqueue_args(job)
    if args is not None:
        pipe.eval(*args)


async def delivery_log(redis: Redis, job_id: str) -> list[WebhookDelivery]:
    """Every recorded delivery attempt for a job, oldest first."""
    return [_delivery_decoder.decode(raw) for raw in await redis.lrange(log_key(job_id), 0, -1)]  # type: ignore[misc]  # redis-py#2399
