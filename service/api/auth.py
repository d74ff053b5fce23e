"""Bearer API keys, stored as sha256 hashes, each mapped to a tenant."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.params import Parameter

from service.settings import Principal, hash_api_key


def principal(request: Request[Any, Any, Any]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    # Looked up by its sha256: the plaintext key is never stored or compared.
    keys: dict[str, Principal] = request.app.state.api_keys
    who = keys.get(hash_api_key(key.strip()))
    if who is None:
        raise NotAuthorizedException("unknown API key")
    return who


TenantFilter = Annotated[
    str | None,
    Parameter(
        min_length=1,
        max_length=128,
        description="Admin keys: only this tenant's records (default: every tenant's). Other "
        "keys always see their own; naming another tenant is refused (403).",
    ),
]


def scope(who: Principal, tenant: str | None = None) -> str | None:
    """The tenant whose records a caller sees: its own; for an admin, `tenant` (None: all)."""
    if who.admin:
        return tenant
    if tenant is not None and tenant != who.tenant:
        raise PermissionDeniedException("only admin keys may read another tenant's records")
    return who.tenant
