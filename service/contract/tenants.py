"""What a tenant sees of its own limits (`GET /v1/usage`) and what admins did (`GET /v1/audit`)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class LimitUsage(msgspec.Struct, kw_only=True):
    """One limit and where the tenant stands on it."""

    name: Annotated[
        str,
        msgspec.Meta(
            description="The limit, as named in the tenants file and in 429 answers, e.g. "
            "`queued_jobs`."
        ),
    ]
    used: Annotated[
        int | None,
        msgspec.Meta(
            description="How much of it the tenant uses now; for `requests_per_second`, the "
            "requests in the last second; null where it is not counted here."
        ),
    ]
    limit: Annotated[int | None, msgspec.Meta(description="The tenant's limit; null: no limit.")]


class Usage(msgspec.Struct, kw_only=True):
    """A tenant's limits (its own, else the service's defaults) and its use of each."""

    tenant: Annotated[str, msgspec.Meta(description="The tenant these numbers are about.")]
    limits: Annotated[list[LimitUsage], msgspec.Meta(description="Every limit, by name.")]
    share: Annotated[
        float,
        msgspec.Meta(description="The tenant's weight when jobs are dispatched across tenants."),
    ]


class AuditEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One request an admin made."""

    id: Annotated[str, msgspec.Meta(description="The entry's id (its position in the log).")]
    time: Annotated[float, msgspec.Meta(description="When the request ended (Unix seconds).")]
    actor: Annotated[str, msgspec.Meta(description="The admin key's tenant.")]
    method: Annotated[str, msgspec.Meta(description="HTTP method.")]
    path: Annotated[str, msgspec.Meta(description="The request's path (no query string).")]
    status: Annotated[int, msgspec.Meta(description="The answer's HTTP status.")]
    tenant: Annotated[
        str | None,
        msgspec.Meta(description="The tenant the request named with `?tenant=`, if any."),
    ] = None


class AuditPage(msgspec.Struct, kw_only=True):
    """Admin actions, newest first."""

    items: Annotated[list[AuditEntry], msgspec.Meta(description="This page's entries.")]
    next_cursor: Annotated[
        str | None,
        msgspec.Meta(description="Pass as `cursor` for the next (older) page; null at the end."),
    ] = None
