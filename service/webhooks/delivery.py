"""Webhooks: tell a job's owner when it ends, signed, retried, and never to a private address.

How it flows:

1. When a job reaches a terminal status, `enqueue_webhook` (or `stage_webhook`, inside the
   same Redis transaction as the status change) snapshots the event body and puts the event
   id in a sorted set scored by when it is due. The event id is derived from the job id and
   its terminal status, so enqueueing twice is a no-op and receivers can dedupe on it.
2. `run_deliveries`, a loop the API lifespan runs, claims due events and POSTs them. It runs
   in the API, not in the GPU worker: a worker's one arq slot is busy training, workers may be
   scaled to zero, and a queued job cancelled through the API ends with no worker at all. Any
   number of API replicas can run it: a claim atomically pushes the event's due time forward
   by a lease, so one replica sends it; a replica that dies mid-send lets the lease lapse and
   another one sends it again (at least once).
3. A non-2xx answer, a network error or a timeout is retried with exponential backoff; every
   attempt is appended to `ftune:webhook:{job_id}` (`delivery_log` reads it).

Address checks: the URL's host must resolve only to public addresses (no loopback, private,
link-local such as cloud metadata at 169.254.169.254, multicast or reserved), checked at submit
(`check_url`) and again at every delivery. The delivery then connects to the address it just
checked (the URL's host is replaced by the IP, the `Host` header and TLS SNI/certificate check
keep the original name), so a DNS answer that changes between check and connect (DNS
rebinding) cannot redirect it. Redirects are not followed and proxies from the environment
are ignored, for the same reason. `FTUNE_WEBHOOK_ALLOW_PRIVATE=true` lifts the address rule
for installations whose receivers live on the private network.

Signature (Stripe's scheme): the header ``ftune-signature: t=<unix seconds>,v1=<hex>`` where
``<hex>`` is HMAC-SHA256 with the tenant's webhook secret (UTF-8) as key over
``f"{t}.".encode() + body``, the raw request body. During a secret rotation there is one
``v1=`` per configured secret. A receiver recomputes it over the raw body, compares in
constant time and rejects a timestamp older than a few minutes (`verify` does all three).
``ftune-event-id`` is the same on every retry of one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
from redis.asyncio import Redis

from service.contract import WebhookDelivery
from service.webhooks.addresses import Target, UnsafeWebhookURL, resolve
from service.webhooks.events import DUE, EVENT_TTL_SECONDS, LOG_MAX, event_key, log_key, sign

_encoder = msgspec.json.Encoder()

log = logging.getLogger("ftune.webhooks")

USER_AGENT = "ftune-webhooks/1"


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookConfig:
    """How deliveries behave; built from Settings by the API."""

    secrets: Mapping[str, Sequence[str]] = field(default_factory=dict, repr=False)
    """Tenant -> its signing secrets (the first is current; more during a rotation)."""
    allow_private: bool = False
    """Allow receivers on loopback/private/link-local addresses."""
    max_attempts: int = 8
    """Attempts per event before it is given up."""
    backoff_seconds: float = 4.0
    """Delay after the first failed attempt; doubles after each further one."""
    max_backoff_seconds: float = 3600.0
    """Cap on one delay."""
    timeout_seconds: float = 10.0
    """Whole-request limit for one attempt (connect, send, response headers)."""
    poll_seconds: float = 1.0
    """How often the loop looks for due events."""
    claim_seconds: float = 60.0
    """A claimed event is due again after this long if its sender vanished."""
    batch: int = 16
    """Events sent concurrently per pass."""
    verify: ssl.SSLContext | bool = True
    """TLS verification of receivers: a context trusting a private CA, or True (system CAs)."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return float(min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds))


def load_secrets(path: Path | None) -> dict[str, tuple[str, ...]]:
    """Read FTUNE_WEBHOOK_SECRETS_FILE: JSON `{"tenant": "secret"}` or, while rotating,
    `{"tenant": ["new", "old"]}`. No file: deliveries go unsigned."""
    if path is None:
        return {}
    try:
        raw = msgspec.json.decode(path.read_bytes(), type=dict[str, str | list[str]])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"webhook secrets file {path}: {exc}") from exc
    out: dict[str, tuple[str, ...]] = {}
    for tenant, value in raw.items():
        secrets = (value,) if isinstance(value, str) else tuple(value)
        if not secrets or any(len(s) < 16 for s in secrets):
            raise ValueError(
                f"webhook secrets file {path}: tenant {tenant!r} needs secrets of 16+ characters"
            )
        out[tenant] = secrets
    return out


# -- address checks ------------------------------------------------------------------------


# -- events and signatures -----------------------------------------------------------------


# -- enqueue -------------------------------------------------------------------------------


# -- delivery ------------------------------------------------------------------------------

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def _client(config: WebhookConfig) -> httpx.AsyncClient:
    # No keep-alive: pooled connections are keyed by IP, and one IP may serve many hosts.
    return httpx.AsyncClient(
        timeout=config.timeout_seconds,
        verify=config.verify,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": USER_AGENT},
    )


async def _post(
    client: httpx.AsyncClient, target: Target, url: str, body: bytes, headers: dict[str, str]
) -> int:
    """POST to the checked addresses in turn (the next only if connecting failed)."""
    original = httpx.URL(url)
    netloc = original.netloc.decode("ascii")
    error: httpx.ConnectError | None = None
    for address in target.addresses:
        pinned = original.copy_with(host=address)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            async with client.stream(
                "POST",
                pinned,
                content=body,
                headers={**headers, "Host": netloc},
                extensions=extensions,
            ) as resp:
                return resp.status_code  # the body is never read: a receiver cannot flood us
        except httpx.ConnectError as exc:
            error = exc
    assert error is not None
    raise error


async def _deliver(
    redis: Redis, config: WebhookConfig, client: httpx.AsyncClient, eid: str
) -> WebhookDelivery | None:
    key = event_key(eid)
    fields = {k.decode(): v for k, v in (await redis.hgetall(key)).items()}  # type: ignore[misc]  # redis-py#2399
    if not fields or fields.get("state", b"pending") != b"pending":
        await redis.zrem(DUE, eid)
        return None
    attempt = int(await redis.hincrby(key, "attempts", 1))  # type: ignore[misc]  # redis-py#2399
    job_id, tenant = fields["job_id"].decode(), fields["tenant"].decode()
    url, kind, body = fields["url"].decode(), fields["type"].decode(), fields["body"]
    headers = {
        "Content-Type": "application/json",
        "ftune-event-id": eid,
        "ftune-event-type": kind,
        "ftune-delivery-attempt": str(attempt),
    }
    secrets = config.secrets.get(tenant, ())
    if secrets:
        headers["ftune-signature"] = sign(secrets, body)
    started, clock = time.time(), time.monotonic()
    status_code: int | None = None
    error: str | None = None
    retry = True
    try:
        async with asyncio.timeout(config.timeout_seconds):
            target = await resolve(url, allow_private=config.allow_private)
            status_code = await _post(client, target, url, body, headers)
        if not 200 <= status_code < 300:
            redirect = " (redirects are not followed)" if 300 <= status_code < 400 else ""
            error = f"HTTP {status_code}{redirect}"
    except UnsafeWebhookURL as exc:
        error, retry = str(exc), False
    except TimeoutError:
        error = f"timed out after {config.timeout_seconds:g} s"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    ok = error is None
    more = retry and not ok and attempt < config.max_attempts
    next_at = time.time() + config.delay(attempt) if more else None
    record = WebhookDelivery(
        event_id=eid,
        type=kind,
        attempt=attempt,
        at=started,
        ok=ok,
        status_code=status_code,
        error=error,
        duration_ms=round((time.monotonic() - clock) * 1000, 1),
        next_attempt_at=next_at,
    )
    async with redis.pipeline(transaction=True) as pipe:
        pipe.rpush(log_key(job_id), _encoder.encode(record))
        pipe.ltrim(log_key(job_id), -LOG_MAX, -1)
        if next_at is not None:
            pipe.zadd(DUE, {eid: next_at})
        else:
            pipe.zrem(DUE, eid)
            pipe.hset(key, mapping={"state": "delivered" if ok else "failed"})
            pipe.expire(key, EVENT_TTL_SECONDS)
        await pipe.execute()
    where = {"job_id": job_id, "tenant": tenant}
    if not ok:
        then = "retrying" if more else "giving up"
        log.warning("webhook %s attempt %d failed: %s; %s", eid, attempt, error, then, extra=where)
    if ok and not secrets:
        log.warning("webhook %s went unsigned: no secret for the tenant", eid, extra=where)
    return record


async def deliver_due(
    redis: Redis, config: WebhookConfig, *, client: httpx.AsyncClient | None = None
) -> list[WebhookDelivery]:
    """One pass: claim the events due now (at most `config.batch`) and send them."""
    now = time.time()
    claimed = await redis.eval(  # type: ignore[misc]  # redis-py#2399
        _CLAIM, 1, DUE, repr(now), repr(now + config.claim_seconds), str(config.batch)
    )
    if not claimed:
        return []
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(_client(config))
        results = await asyncio.gather(
            *(_deliver(redis, config, client, raw.decode()) for raw in claimed)
        )
    return [r for r in results if r is not None]


async def run_deliveries(redis: Redis, config: WebhookConfig, stop: asyncio.Event) -> None:
    """Deliver due webhooks until `stop` is set. Safe to run in every API replica."""
    async with _client(config) as client:
        while not stop.is_set():
            sent: list[WebhookDelivery] = []
            try:
                sent = await deliver_due(redis, config, client=client)
            except Exception:
                log.exception("webhook delivery pass failed")
            if len(sent) < config.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), config.poll_seconds)


@contextlib.asynccontextmanager
async def delivering(redis: Redis, config: WebhookConfig) -> AsyncIterator[None]:
    """Run the delivery loop for the duration of the block (the API lifespan).

    On exit, a send in flight is cancelled; its claim lapses and it is sent again later.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(run_deliveries(redis, config, stop), name="ftune-webhooks")
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
