"""Webhook events: built from a job that ended, signed, queued for delivery."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from service.contract import (
    EventType,
    Job,
    JobStatus,
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


_delivery_decoder = msgspec.json.Decoder(WebhookDelivery)


_encoder = msgspec.json.Encoder()


def event_id(job_id: str, status: JobStatus) -> str:
    """Stable per (job, terminal status): a job ends once, so this names its one event."""
    return "evt_" + hashlib.sha256(f"{job_id}:{status.value}".encode()).hexdigest()[:24]


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


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int | None = None) -> str:
    """The `ftune-signature` header value for `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    parts = [f"t={t}"]
    for secret in secrets:
        digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        parts.append(f"v1={digest}")
    return ",".join(parts)


def verify(
    secret: str, body: bytes, header: str, tolerance: float = 300, *, now: float | None = None
) -> bool:
    """For receivers: True if `header` signs exactly `body` with `secret`, made within
    `tolerance` seconds of now (which stops an old, captured request being replayed)."""
    t: int | None = None
    given: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            with contextlib.suppress(ValueError):
                t = int(value)
        elif key == "v1":
            given.append(value)
    if t is None or not given:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, g) for g in given)


_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', ARGV[3], 'tenant', ARGV[4], 'url', ARGV[5],
           'type', ARGV[6], 'body', ARGV[7], 'attempts', 0, 'state', 'pending')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


def _enqueue_args(job: Job) -> tuple[Any, ...] | None:
    if job.spec.webhook_url is None:
        return None
    event = build_event(job)
    return (
        _ENQUEUE,
        2,
        event_key(event.id),
        DUE,
        event.id,
        repr(event.created_at),
        job.id,
        job.tenant,
        job.spec.webhook_url,
        event.type,
        _encoder.encode(event),
    )


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
