"""Bearer API keys, stored as sha256 hashes, each mapped to a tenant."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import NotAuthorizedException

from service.settings import Principal, hash_api_key
from service.tenants import Tenants


def principal(request: Request[Any, Any, Any]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    # Looked up by its sha256: the plaintext key is never stored or compared.
    tenants: Tenants = request.app.state.tenants
    who = tenants.keys.get(hash_api_key(key.strip()))
    if who is None:
        raise NotAuthorizedException("unknown API key")
    return who


def scope(who: Principal) -> str | None:
    """The tenant whose records a caller sees; None (all) for an admin."""
    return None if who.admin else who.tenant
