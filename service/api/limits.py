"""Requests per second per tenant, counted in Redis so every API replica shares the count.

The `limits` library's moving window runs as one Lua script per request (atomic, exact over
the last second). Requests without a known key are not counted here: they are refused with
401 before they cost anything.
"""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from litestar import Request
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from service.api.auth import principal
from service.store import LimitReached, P, Store
from service.tenants import limits_for

UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics")
"""Probes and scrapes: never counted (a kubelet must not be refused)."""


def rate_limiter(store: Store, redis_url: str) -> MovingWindowRateLimiter:
    """A limiter on the store's own connection pool (no extra connections). `limits` reads
    a bare unix:// URL as Valkey's, so a socket is named as Redis's."""
    scheme = "async+redis+" if redis_url.startswith("unix://") else "async+"
    storage = RedisStorage(
        scheme + redis_url,
        implementation="redispy",
        connection_pool=store.redis.connection_pool,  # type: ignore[arg-type]  # limits types **options narrowly
        key_prefix=f"{P}rate",
    )
    return MovingWindowRateLimiter(storage)


async def remaining(limiter: MovingWindowRateLimiter, tenant: str, per_second: int) -> int:
    """Requests the tenant may still make in the current second."""
    stats = await limiter.get_window_stats(RateLimitItemPerSecond(per_second), tenant)
    return int(stats.remaining)


class RequestRate(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not scope["path"].startswith(UNLIMITED_PATHS):
            await _count(Request(scope, receive))
        await next_app(scope, receive, send)


async def _count(request: Request[Any, Any, Any]) -> None:
    try:
        tenant = principal(request).tenant
    except NotAuthorizedException:
        return
    state = request.app.state
    per_second = limits_for(state.settings, state.tenants, tenant).requests_per_second
    if per_second is None:
        return
    item = RateLimitItemPerSecond(per_second)
    limiter: MovingWindowRateLimiter = state.rate_limiter
    if await limiter.hit(item, tenant):
        return
    stats = await limiter.get_window_stats(item, tenant)
    wait = max(1, math.ceil(stats.reset_time - time.time()))
    raise LimitReached(
        f"tenant {tenant} is past its limit (requests_per_second) of {per_second} requests "
        "per second; slow down",
        limit="requests_per_second",
        quota=per_second,
        retry_after=wait,
        window=1,
    )
