"""Webhook delivery: claim due events, sign them, send them to the address just checked.

Any number of API replicas run `run_deliveries`: a claim atomically pushes the event's due
time forward by a lease, so one replica sends it; a replica that dies mid-send lets the lease
lapse and another one sends it again (at least once). A delivery connects to the address it
just checked (`addresses`; the URL's host is replaced by the IP, the `Host` header and TLS
SNI/certificate check keep the original name), so a DNS answer that changes between check and
connect (DNS rebinding) cannot redirect it; redirects are not followed and proxies from the
environment are ignored, for the same reason.

Signature (Standard Webhooks, https://www.standardwebhooks.com/, made by the
`standardwebhooks` library): every delivery carries ``webhook-id`` (the event id, the same on
every retry, so receivers dedupe on it) and ``webhook-timestamp`` (unix seconds of this
attempt); when the tenant has a secret, also ``webhook-signature: v1,<base64>``, the
HMAC-SHA256 of ``f"{id}.{timestamp}.{body}"``, with one space-separated ``v1,`` entry per
configured secret while a secret is rotated. A receiver checks all of it, including a
timestamp more than 5 minutes off, with ``standardwebhooks.Webhook(secret).verify(body,
headers)`` or any other Standard Webhooks library.

Secrets (FTUNE_WEBHOOK_SECRETS_FILE) are in the form those libraries take: ``whsec_`` and the
standard base64 of 24 to 64 random bytes (the HMAC key); the receiver gets the same string.
`load_secrets` refuses anything else at start-up, naming the tenant but never the value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
from redis.asyncio import Redis
from standardwebhooks import Webhook

from service.contract import WebhookDelivery
from service.metrics import WEBHOOK_OUTCOMES
from service.webhooks.addresses import Target, UnsafeWebhookURL, resolve
from service.webhooks.events import DUE, EVENT_TTL_SECONDS, LOG_MAX, event_key, log_key

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
    """Events sent at once (per pass of `deliver_due`; in flight, for `run_deliveries`)."""
    per_tenant: int = 4
    """Of those, at most this many for one tenant: a tenant whose receivers hang holds these
    slots for `timeout_seconds` each, never the others' (`run_deliveries`)."""
    verify: ssl.SSLContext | bool = True
    """TLS verification of receivers: a context trusting a private CA, or True (system CAs)."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return float(min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds))


PREFIX = "whsec_"
"""How a Standard Webhooks secret starts; the base64 of its key follows."""
KEY_BYTES = (24, 64)
"""Bounds on a secret's decoded key, as the Standard Webhooks specification asks."""

_MAKE_ONE = (
    'python -c "import base64, secrets; '
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


def _secret_problem(secret: str) -> str | None:
    """Why `secret` is not a Standard Webhooks secret, or None (never quotes the value)."""
    if not secret.startswith(PREFIX):
        return f"does not start with {PREFIX!r}"
    try:
        key = base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    except binascii.Error:
        return f"is not standard base64 (A-Z, a-z, 0-9, +, /, = padding) after {PREFIX!r}"
    low, high = KEY_BYTES
    if not low <= len(key) <= high:
        return f"decodes to {len(key)} bytes, not {low} to {high}"
    return None


def load_secrets(path: Path | None) -> dict[str, tuple[str, ...]]:
    """Read FTUNE_WEBHOOK_SECRETS_FILE: JSON `{"tenant": "whsec_..."}` or, while rotating,
    `{"tenant": ["whsec_new...", "whsec_old..."]}`. No file: deliveries go unsigned.

    Every secret is checked here, at start-up, so a bad one stops the API with a message
    instead of signing deliveries that no receiver can verify."""
    if path is None:
        return {}
    try:
        raw = msgspec.json.decode(path.read_bytes(), type=dict[str, str | list[str]])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"webhook secrets file {path}: {exc}") from exc
    out: dict[str, tuple[str, ...]] = {}
    for tenant, value in raw.items():
        secrets = (value,) if isinstance(value, str) else tuple(value)
        if not secrets:
            raise ValueError(f"webhook secrets file {path}: tenant {tenant!r} has no secret")
        for n, secret in enumerate(secrets, 1):
            problem = _secret_problem(secret)
            if problem is not None:
                raise ValueError(
                    f"webhook secrets file {path}: tenant {tenant!r}, secret {n} of "
                    f"{len(secrets)} {problem}; a Standard Webhooks secret is {PREFIX!r} "
                    f"and the base64 of {KEY_BYTES[0]} to {KEY_BYTES[1]} random bytes, "
                    f"made e.g. with: {_MAKE_ONE}"
                )
        out[tenant] = secrets
    return out


def _signature(secrets: Sequence[str], event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    at = datetime.fromtimestamp(timestamp, UTC)
    text = body.decode()
    return " ".join(Webhook(secret).sign(event_id, at, text) for secret in secrets)


# -- delivery ------------------------------------------------------------------------------

_CLAIM = """
local free, cap = tonumber(ARGV[3]), tonumber(ARGV[5])
local held = {}
for i = 8, #ARGV, 2 do held[ARGV[i]] = tonumber(ARGV[i + 1]) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[4])
local out = {}
for _, id in ipairs(ids) do
  if free == 0 then break end
  local tenant = redis.call('HGET', ARGV[7] .. id, 'tenant') or ''
  local n = held[tenant] or 0
  if n < cap then
    held[tenant] = n + 1
    free = free - 1
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, id)
    table.insert(out, tenant)
  else
    redis.call('ZADD', KEYS[1], ARGV[6], id)
  end
end
return out
"""
SCAN = 1000
"""Due events one claim looks at: a tenant's backlog of more delays the others' events by a
pass (each skipped one goes behind them) but never makes a claim long."""


async def _claim(
    redis: Redis, config: WebhookConfig, free: int, held: Counter[str]
) -> list[tuple[str, str]]:
    """Claim up to `free` due events, oldest first, in one script: (event id, tenant) each.

    One tenant gets at most `config.per_tenant` slots counting `held` (those in flight): its
    further due events are skipped and put back due in a moment, behind those already due,
    so a tenant with a backlog of hanging receivers never fills a claim with events it cannot
    send. The script reads the events' records by name (no cluster mode: ftune's Redis is one
    primary)."""
    now = time.time()
    later = now + min(config.poll_seconds, 0.5)
    pairs = [str(x) for tenant, n in held.items() for x in (tenant, n)]
    claimed = await redis.eval(  # type: ignore[misc]  # redis-py#2399
        _CLAIM,
        1,
        DUE,
        repr(now),
        repr(now + config.claim_seconds),
        str(free),
        str(SCAN),
        str(config.per_tenant),
        repr(later),
        event_key(""),
        *pairs,
    )
    it = iter(claimed)
    return [(eid.decode(), tenant.decode()) for eid, tenant in zip(it, it, strict=True)]


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
    started, clock = time.time(), time.monotonic()
    headers = {
        "Content-Type": "application/json",
        "webhook-id": eid,
        "webhook-timestamp": str(int(started)),
        "ftune-event-type": kind,
        "ftune-delivery-attempt": str(attempt),
    }
    secrets = config.secrets.get(tenant, ())
    if secrets:
        headers["webhook-signature"] = _signature(secrets, eid, int(started), body)
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
        if job_id:  # a policy's run that never had a job has no log
            pipe.rpush(log_key(job_id), _encoder.encode(record))
            pipe.ltrim(log_key(job_id), -LOG_MAX, -1)
        pipe.hincrby(WEBHOOK_OUTCOMES, "delivered" if ok else "retrying" if more else "given_up")
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
    """One pass: claim the events due now (at most `config.batch`, `config.per_tenant` of
    one tenant) and send them."""
    claimed = await _claim(redis, config, config.batch, Counter())
    if not claimed:
        return []
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(_client(config))
        results = await asyncio.gather(
            *(_deliver(redis, config, client, eid) for eid, _ in claimed)
        )
    return [r for r in results if r is not None]


async def run_deliveries(redis: Redis, config: WebhookConfig, stop: asyncio.Event) -> None:
    """Deliver due webhooks until `stop` is set. Safe to run in every API replica.

    Each send holds a slot (of `config.batch`) only while it runs, so a receiver that never
    answers delays nobody else's events, and one tenant holds at most `config.per_tenant` of
    them (see :func:`_claim`)."""
    inflight: dict[asyncio.Task[WebhookDelivery | None], str] = {}

    def finished(task: asyncio.Task[WebhookDelivery | None]) -> None:
        inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())

    async with _client(config) as client:
        try:
            while not stop.is_set():
                started = 0
                if len(inflight) < config.batch:
                    try:
                        started = await _start_due(redis, config, client, inflight, finished)
                    except Exception:
                        log.exception("webhook delivery pass failed")
                if started and len(inflight) < config.batch:
                    continue  # more may be due
                waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()), *inflight}
                _, pending = await asyncio.wait(
                    waits, timeout=config.poll_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in pending - set(inflight):
                    waiter.cancel()
        finally:
            for task in list(inflight):
                task.cancel()  # its claim lapses and it is sent again later
            await asyncio.gather(*inflight, return_exceptions=True)


async def _start_due(
    redis: Redis,
    config: WebhookConfig,
    client: httpx.AsyncClient,
    inflight: dict[asyncio.Task[WebhookDelivery | None], str],
    finished: Callable[[asyncio.Task[WebhookDelivery | None]], None],
) -> int:
    """Claim what is due for the free slots and start sending it; how many were started."""
    claimed = await _claim(redis, config, config.batch - len(inflight), Counter(inflight.values()))
    for eid, tenant in claimed:
        task = asyncio.create_task(_deliver(redis, config, client, eid))
        inflight[task] = tenant
        task.add_done_callback(finished)
    return len(claimed)


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
