"""Liveness, readiness and Prometheus, for Kubernetes and the operator; who a key belongs to."""

from __future__ import annotations

from arq.connections import ArqRedis
from litestar import Controller, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service.contract import Caller
from service.settings import Principal, Settings
from service.store import Store


class SystemController(Controller):
    path = "/"
    tags = ["system"]

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

    @get(operation_id="GetCaller", path="/v1/me", summary="Who the API key belongs to")
    async def me(self, principal: Principal) -> Caller:
        return Caller(tenant=principal.tenant, admin=principal.admin)

    @get(
        operation_id="Metrics",
        path="/metrics",
        summary="Prometheus text format: requests, queue depth, jobs by status, durations",
        media_type=CONTENT_TYPE_LATEST,
    )
    async def metrics(self, state: State, arq: ArqRedis, settings: Settings) -> bytes:
        await state.collector.refresh(arq, settings.queue_name)
        return generate_latest(REGISTRY) + generate_latest(state.registry)
