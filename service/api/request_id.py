"""`x-request-id` on every response: OpenAI's SDK reads it (`_request_id`), users quote it when
they report a problem, and the API's error log lines name the same id.

An id sent by the client or a proxy in front (nginx's `$request_id`) is kept when it is short
and plain, so one id follows a request through both; anything else gets a new one.

A `before_send` hook, not a middleware: Litestar runs middleware only on matched routes, and a
404 or 405 should carry an id as well.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from litestar import Request
from litestar.types import Message, Scope

HEADER = b"x-request-id"
_PLAIN = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _of(scope: Scope) -> str:
    """The scope's id, chosen on first use and kept in its state."""
    state = scope.setdefault("state", {})
    rid: str | None = state.get("request_id")
    if rid is None:
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER), b"")
        rid = given.decode() if _PLAIN.match(given) else f"req_{secrets.token_hex(16)}"
        state["request_id"] = rid
    return rid


def request_id(request: Request[Any, Any, Any]) -> str:
    return _of(request.scope)


async def add_request_id(message: Message, scope: Scope) -> None:
    """The app's `before_send` hook: the id on the response's headers."""
    if message["type"] == "http.response.start":
        message["headers"] = [*message.get("headers", ()), (HEADER, _of(scope).encode())]
