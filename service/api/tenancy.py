"""Tenants on the API: `GET /v1/usage`, the admins' audit log (`GET /v1/audit`) and the
`?tenant=` parameter by which an admin acts on another tenant's records.

Every request an admin key makes (but reading the log itself) is appended to one capped
Redis stream, whatever its answer: an admin reads and changes every tenant's records.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import ASGIMiddleware
from litestar.params import Parameter
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from redis.exceptions import RedisError

from service.api.auth import principal
from service.api.errors import BadRequest, FieldError, InvalidRequest
from service.api.limits import remaining
from service.api.openapi_docs import FORBIDDEN, PageSize, responses
from service.contract import AuditEntry, AuditPage, JobStatus, LimitUsage, Usage
from service.retraining import feedback, policies
from service.settings import Principal, Settings
from service.store import P, Store, is_stream_id
from service.tenants import TENANT_NAME_RE, Tenants, limits_for

log = logging.getLogger("ftune.api")

AUDIT = f"{P}audit"
AUDIT_MAXLEN = 100_000
"""Entries kept (the oldest go first): months of an operator's actions, a few MB."""
AUDIT_PATH = "/v1/audit"

TenantParam = Annotated[
    str | None,
    Parameter(
        min_length=1,
        max_length=128,
        pattern=TENANT_NAME_RE,
        description="Admin keys only: act on (or list) this tenant's records instead of their "
        "own; other keys may name only their own tenant. A tenant name has no ':' and no "
        "white space. Records are made only for a tenant with a key in the tenants file (422).",
    ),
]


ListCursor = Annotated[
    str | None,
    Parameter(
        max_length=512,
        description="The previous page's `next_cursor`; omit it for the first page.",
    ),
]


def acting_tenant(who: Principal, tenant: str | None) -> str:
    """The tenant a request acts on: the caller's, or for an admin the one it names."""
    if tenant is None or tenant == who.tenant:
        return who.tenant
    if not who.admin:
        raise PermissionDeniedException("only an admin key may name another tenant")
    return tenant


def owning_tenant(who: Principal, tenant: str | None, tenants: Tenants) -> str:
    """The tenant a new record goes to, as :func:`acting_tenant`; an admin may not make one
    for a tenant with no key in the tenants file (a typo, or a team removed): no key could
    ever read it, and its limits would be the defaults'."""
    name = acting_tenant(who, tenant)
    if name != who.tenant and not tenants.has_keys(name):
        raise InvalidRequest(
            f"tenant {name!r} has no API key in the tenants file (FTUNE_API_KEYS_FILE): "
            "nothing is made for a tenant that could never read it",
            [FieldError(loc=["query", "tenant"], msg="no such tenant")],
        )
    return name


def listed_tenant(who: Principal, tenant: str | None) -> str | None:
    """The tenant a listing covers: an admin sees every tenant (None) unless it names one."""
    if who.admin and tenant is None:
        return None
    return acting_tenant(who, tenant)


class Audit(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive)
        try:
            who = principal(request)
        except NotAuthorizedException:
            who = None
        if who is None or not who.admin or scope["path"].startswith(AUDIT_PATH):
            await next_app(scope, receive, send)
            return
        named = request.query_params.get("tenant")
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, sending)
        finally:
            entry = {"time": repr(time.time()), "actor": who.tenant, "method": request.method}
            entry |= {"path": scope["path"][:1024], "status": str(status[0])}
            if named is not None:
                entry["tenant"] = named[:128]
            store: Store = request.app.state.store
            try:
                await store.redis.xadd(AUDIT, entry, maxlen=AUDIT_MAXLEN, approximate=True)  # type: ignore[arg-type]
            except RedisError:
                log.exception("admin %s: %s %s not audited", who.tenant, request.method, entry)


class TenancyController(Controller):
    path = "/v1"
    tags = ["tenants"]

    @get(
        operation_id="GetUsage",
        path="/usage",
        summary="Where the tenant stands on each of its limits",
        responses=responses(FORBIDDEN),
    )
    async def usage(
        self,
        request: Request[Any, Any, Any],
        principal: Principal,
        store: Store,
        settings: Settings,
        tenants: Tenants,
        tenant: TenantParam = None,
    ) -> Usage:
        name = acting_tenant(principal, tenant)
        limits = limits_for(settings, tenants, name)
        datasets, stored = await store.dataset_usage(name)
        rate = None
        if limits.requests_per_second is not None:
            left = await remaining(request.app.state.rate_limiter, name, limits.requests_per_second)
            rate = limits.requests_per_second - left
        used: dict[str, int | None] = {
            "queued_jobs": await store.count_tenant_jobs(name, JobStatus.queued),
            "running_jobs": await store.count_tenant_jobs(name, JobStatus.running),
            "datasets": datasets,
            "dataset_bytes": stored,
            "feedback_streams": await feedback.stream_count(store, name),
            "feedback_bytes": await feedback.stored_bytes(store, name),
            "policies": await policies.policy_count(store, name),
            "jobs_per_policy_tick": None,
            "event_streams": request.app.state.event_hub.open.get(name, 0),  # this process
            "requests_per_second": rate,
        }
        return Usage(
            tenant=name,
            limits=[
                LimitUsage(name=key, used=value, limit=getattr(limits, key))
                for key, value in used.items()
            ],
            share=limits.share,
        )

    @get(
        operation_id="ListAudit",
        path="/audit",
        summary="Admin actions, newest first (admin keys only)",
        description="Every request an admin key made (but reading this log), whatever its "
        "answer, with the tenant it named (`?tenant=`). The log keeps the newest 100,000.",
        responses=responses(FORBIDDEN),
    )
    async def audit(
        self,
        principal: Principal,
        store: Store,
        limit: PageSize = 50,
        cursor: Annotated[
            str | None,
            Parameter(
                pattern=r"^\d{1,20}-\d{1,20}(?!\n)$",
                description="The previous page's `next_cursor`; omit it for the first page.",
            ),
        ] = None,
    ) -> AuditPage:
        if not principal.admin:
            raise PermissionDeniedException("the audit log is for admin keys only")
        if cursor is not None and not is_stream_id(cursor):  # e.g. past 2**64: Redis refuses it
            raise BadRequest(
                "cursor must be a next_cursor this log gave (e.g. 1700000000000-0)",
                [FieldError(loc=["query", "cursor"], msg="not an audit entry id")],
            )
        upper = f"({cursor}" if cursor else "+"
        found = await store.redis.xrevrange(AUDIT, max=upper, min="-", count=limit + 1)
        items = [
            AuditEntry(
                id=entry_id.decode(),
                time=float(fields[b"time"]),
                actor=fields[b"actor"].decode(),
                method=fields[b"method"].decode(),
                path=fields[b"path"].decode(),
                status=int(fields[b"status"]),
                tenant=fields[b"tenant"].decode() if b"tenant" in fields else None,
            )
            for entry_id, fields in found[:limit]
        ]
        next_cursor = items[-1].id if len(found) > limit else None
        return AuditPage(items=items, next_cursor=next_cursor)
