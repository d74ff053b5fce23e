"""The API baseline: a bare Litestar app served exactly like ours (uvicorn, one process).

`GET /const` returns a constant JSON object; `POST /const` decodes a JSON body and returns a
constant with 201. No auth, no Redis, no middleware: what the framework and server cost alone.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, get, post

CONSTANT = {"id": "job_0", "status": "queued", "progress": {"step": 0}}


@get("/const", sync_to_thread=False)
def read_constant() -> dict[str, Any]:
    return CONSTANT


@post("/const", status_code=201, sync_to_thread=False)
def write_constant(data: dict[str, Any]) -> dict[str, Any]:
    return CONSTANT


def create_app() -> Litestar:
    return Litestar(route_handlers=[read_constant, write_constant], logging_config=None)
