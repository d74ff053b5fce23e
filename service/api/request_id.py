"""`x-request-id` on every response: OpenAI's SDK reads it (`_request_id`), users quote it when
they report a problem, and the API's error log lines name the same id.

An id sent by the client or a proxy in front (nginx's `$request_id`) is kept when it is short
and plain, so one id follows a request through both; anything else gets a new one.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from litestar import Request
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_PLAIN = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def request_id(request: Request[Any, Any, Any]) -> str:
    """The request's id ('-' outside of this middleware, e.g. in a unit test's app)."""
    return str(request.scope.get("state", {}).get("request_id", "-"))


class RequestId(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        given = next((v for k, v in scope["headers"] if k == HEADER), b"")
        rid = given if _PLAIN.match(given) else f"req_{secrets.token_hex(16)}".encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        await next_app(scope, receive, sending)
