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
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec

from service.specs import Artifact, Job, JobError, JobStatus

log = logging.getLogger("ftune.webhooks")

P = "ftune:"
DUE = f"{P}webhooks:due"
"""Sorted set: event id -> unix time its next attempt is due (or its claim lapses)."""
LOG_MAX = 100
"""Delivery attempts kept per job."""
EVENT_TTL_SECONDS = 7 * 24 * 3600
"""How long a finished event is remembered (enqueueing it again within that time is a no-op)."""
USER_AGENT = "ftune-webhooks/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def log_key(job_id: str) -> str:
    return f"{P}webhook:{job_id}"


def event_key(event_id: str) -> str:
    return f"{P}webhook-event:{event_id}"


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


class UnsafeWebhookURL(ValueError):
    """The URL is malformed or its host is not a public address: never retried."""


class UnresolvableHost(ValueError):
    """The host did not resolve (at submit: refused; at delivery: retried)."""


_ALLOW_HINT = (
    "webhooks go only to public addresses (an operator can set "
    "FTUNE_WEBHOOK_ALLOW_PRIVATE=true to allow private ones)"
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _why_not_public(ip: IPAddress) -> str | None:
    """Why an address is not a public one, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = _why_not_public(embedded)
            return f"{why} (embedded in {ip})" if why else None
    checks = (
        ("is_unspecified", "the unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    )
    for attr, why in checks:
        if getattr(ip, attr):
            return why
    return None if ip.is_global else "not a public address"


class _Target(msgspec.Struct, frozen=True):
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _parse(url: str) -> tuple[str, str, int]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookURL(f"webhook_url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookURL(f"webhook_url must be http:// or https://, got {url!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeWebhookURL(f"webhook_url {url!r} has no host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _check(host: str, port: int, infos: Iterable[Any], *, allow_private: bool) -> list[str]:
    addresses: list[str] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        ip = ipaddress.ip_address(text)
        why = None if allow_private else _why_not_public(ip)
        if why is not None:
            is_literal = text == host.strip("[]")
            where = f"is {why}" if is_literal else f"resolves to {ip}, {why}"
            raise UnsafeWebhookURL(f"webhook_url host {host!r} {where}; {_ALLOW_HINT}")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise UnresolvableHost(f"webhook_url host {host!r} has no address")
    return addresses


def _localhost(host: str, allow_private: bool) -> None:
    # RFC 6761: *.localhost is loopback whatever a resolver says.
    if not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise UnsafeWebhookURL(f"webhook_url host {host!r} is a loopback name; {_ALLOW_HINT}")


def _unresolvable(host: str, exc: BaseException) -> UnresolvableHost:
    return UnresolvableHost(
        f"webhook_url host {host!r} does not resolve ({exc}); check the name, or that the "
        "API can reach DNS"
    )


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a webhook URL whose host is not public (every address it resolves to must be).

    Raises ValueError (UnsafeWebhookURL or UnresolvableHost) with a message for the user.
    Blocking (DNS); from async code use `check_url_async`.
    """
    _scheme, host, port = _parse(url)
    _localhost(host, allow_private)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _unresolvable(host, exc) from None
    _check(host, port, infos, allow_private=allow_private)


DNS_TIMEOUT_SECONDS = 5.0


async def _resolve(url: str, *, allow_private: bool) -> _Target:
    scheme, host, port = _parse(url)
    _localhost(host, allow_private)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DNS_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError) as exc:
        raise _unresolvable(host, exc) from None
    addresses = _check(host, port, infos, allow_private=allow_private)
    return _Target(scheme=scheme, host=host, port=port, addresses=tuple(addresses))


async def check_url_async(url: str, *, allow_private: bool) -> None:
    """`check_url` without blocking the event loop (DNS limited to 5 s)."""
    await _resolve(url, allow_private=allow_private)


# -- events and signatures -----------------------------------------------------------------

EventType = Literal["job.succeeded", "job.failed", "job.cancelled"]
_EVENT_TYPES: dict[JobStatus, EventType] = {
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.cancelled: "job.cancelled",
}


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


# -- enqueue -------------------------------------------------------------------------------

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


async def enqueue_webhook(redis: Any, job: Job) -> bool:
    """Queue the job's terminal event for delivery, if it has a webhook_url.

    Idempotent: True if queued now, False if there is no URL or it was already queued.
    Call after the terminal status is stored; `stage_webhook` does it inside that transaction.
    """
    args = _enqueue_args(job)
    if args is None:
        return False
    return bool(await redis.eval(*args))


def stage_webhook(pipe: Any, job: Job) -> None:
    """Add the enqueue to a Redis transaction (e.g. the one that stores the terminal status),
    so a process dying right after the status change cannot lose the webhook."""
    args = _enqueue_args(job)
    if args is not None:
        pipe.eval(*args)


async def delivery_log(redis: Any, job_id: str) -> list[WebhookDelivery]:
    """Every recorded delivery attempt for a job, oldest first."""
    return [_delivery_decoder.decode(raw) for raw in await redis.lrange(log_key(job_id), 0, -1)]


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
    client: httpx.AsyncClient, target: _Target, url: str, body: bytes, headers: dict[str, str]
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
    redis: Any, config: WebhookConfig, client: httpx.AsyncClient, eid: str
) -> WebhookDelivery | None:
    key = event_key(eid)
    fields = {k.decode(): v for k, v in (await redis.hgetall(key)).items()}
    if not fields or fields.get("state", b"pending") != b"pending":
        await redis.zrem(DUE, eid)
        return None
    attempt = int(await redis.hincrby(key, "attempts", 1))
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
            target = await _resolve(url, allow_private=config.allow_private)
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
    redis: Any, config: WebhookConfig, *, client: httpx.AsyncClient | None = None
) -> list[WebhookDelivery]:
    """One pass: claim the events due now (at most `config.batch`) and send them."""
    now = time.time()
    claimed = await redis.eval(
        _CLAIM, 1, DUE, repr(now), repr(now + config.claim_seconds), config.batch
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


async def run_deliveries(redis: Any, config: WebhookConfig, stop: asyncio.Event) -> None:
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
async def delivering(redis: Any, config: WebhookConfig) -> AsyncIterator[None]:
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
