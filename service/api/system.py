"""Liveness and readiness for Kubernetes probes."""

from __future__ import annotations

from litestar import Controller, Response, get

from service.store import Store


class SystemController(Controller):
    path = "/"
    tags = ["system"]
    include_in_schema = True

    @get(operation_id="Healthz", path="/healthz", summary="The process is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(operation_id="Readyz", path="/readyz", summary="Redis is reachable")
    async def readyz(self, store: Store) -> Response[dict[str, str]]:
        try:
            await store.redis.ping()
        except Exception as exc:
            return Response({"status": "unavailable", "redis": type(exc).__name__}, status_code=503)
        return Response({"status": "ok"})
