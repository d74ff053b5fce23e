"""Webhooks: tell a job's owner when it ends, signed, retried, and never to a private address.

How it flows:

1. When a job reaches a terminal status, `enqueue_webhook` (or `stage_webhook`, which the
   store runs inside the same Redis transaction as the status change: the API and the worker
   register it as the store's terminal hook) snapshots the event body and puts the event id
   in a sorted set scored by when it is due. The event id is derived from the job id and its
   terminal status, so enqueueing twice is a no-op and receivers can dedupe on it. A policy's
   gate decision on a run is an event too (`stage_verdict`, staged by the scheduler in the
   transaction that records the decision), to the run's template's URL, logged with its job.
2. `run_deliveries`, a loop every API replica runs, claims due events and POSTs them. A claim
   atomically pushes the event's due time forward by a lease, so one replica sends it; a
   replica that dies mid-send lets the lease lapse and another one sends it again (at least
   once). Workers may be scaled to zero, so delivery never depends on one.
3. A non-2xx answer, a network error or a timeout is retried with exponential backoff; every
   attempt is appended to `ftune:webhook:{job_id}` (`delivery_log` reads it).

Signing follows Standard Webhooks (https://www.standardwebhooks.com/), done by the
`standardwebhooks` library, so a receiver verifies a delivery with any Standard Webhooks
library; `delivery` documents the headers and the secret format.

The seams: `addresses` (which hosts a webhook may reach), `events` (the event body and its
queueing), `delivery` (secrets, signing and the loop that sends).
"""

from service.webhooks.addresses import (
    UnresolvableHost,
    UnsafeWebhookURL,
    check_url,
    check_url_async,
)
from service.webhooks.delivery import (
    WebhookConfig,
    deliver_due,
    delivering,
    load_secrets,
    run_deliveries,
)
from service.webhooks.events import (
    DUE,
    build_event,
    delivery_log,
    enqueue_webhook,
    event_id,
    event_key,
    log_key,
    stage_verdict,
    stage_webhook,
)

__all__ = [
    "DUE",
    "UnresolvableHost",
    "UnsafeWebhookURL",
    "WebhookConfig",
    "build_event",
    "check_url",
    "check_url_async",
    "deliver_due",
    "delivering",
    "delivery_log",
    "enqueue_webhook",
    "event_id",
    "event_key",
    "load_secrets",
    "log_key",
    "run_deliveries",
    "stage_verdict",
    "stage_webhook",
]
