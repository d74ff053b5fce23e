"""Bearer API keys, stored as sha256 hashes, each mapped to a tenant."""

from __future__ import annotations

from typing import Any, cast

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException

from service.settings import Principal, hash_api_key
from service.tenants import Tenants

_FOUND = "ftune.principal"
"""Where a request's principal is kept once looked up: the rate limit, the audit and the
handler each ask for it, and the key is hashed once."""


def principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    scope = cast(dict[str, Any], request.scope)
    found: Principal | None = scope.get(_FOUND)
    if found is not None:
        return found
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    # Looked up by its sha256: the plaintext key is never stored or compared.
    tenants: Tenants = request.app.state.tenants
    who = tenants.keys.get(hash_api_key(key.strip()))
    if who is None:
        raise NotAuthorizedException("unknown API key")
    scope[_FOUND] = who
    return who


def scope(who: Principal) -> str | None:
    """The tenant whose records a caller sees; None (all) for an admin."""
    return None if who.admin else who.tenant
