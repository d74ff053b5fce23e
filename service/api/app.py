"""The app factory: settings in, a wired Litestar app out. Tests build theirs the same way."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from arq.connections import ArqRedis
from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.routes import HTTPRoute
from prometheus_client import CollectorRegistry

from service import queue, tenants, webhooks
from service.api.artifacts import ArtifactController
from service.api.auth import principal
from service.api.console import console_router
from service.api.datasets import DatasetController
from service.api.docs_ui import assets_router, render_plugins
from service.api.events import EventHub
from service.api.feedback import FeedbackController
from service.api.jobs import JobController
from service.api.limits import RequestRate, rate_limiter
from service.api.openai import FileController, FineTuningController
from service.api.openai import errors as openai_errors
from service.api.openapi_docs import ContractSchemas
from service.api.policies import PolicyController
from service.api.request_id import add_request_id
from service.api.request_metrics import RequestMetrics
from service.api.system import SystemController
from service.api.tenancy import Audit, TenancyController
from service.blobs import DATASETS, DRAFT_MAX_AGE_SECONDS, BlobStore, open_store
from service.contract import MAX_REQUEST_BYTES
from service.datasets.space import UploadSpace
from service.metrics import ServiceCollector
from service.scheduler import JOB_KEYS, Scheduler, scheduling
from service.settings import Settings
from service.store import Store

VERSION = "0.1.0"
log = logging.getLogger("ftune.api")


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="ftune",
        version=VERSION,
        description="Self-hosted QLoRA DPO fine-tuning: datasets in, adapters out.",
        components=Components(
            security_schemes={
                "BearerAuth": SecurityScheme(type="http", scheme="bearer", description="API key")
            }
        ),
        security=[{"BearerAuth": []}],
        tags=[
            Tag(
                name="openai",
                description="OpenAI-compatible fine-tuning: the official `openai` SDK, pointed "
                "here with `base_url`, drives files and DPO fine-tuning jobs unchanged. Same "
                "store, tenants, datasets and jobs as the rest of the API; errors in OpenAI's "
                "envelope.",
            )
        ],
        use_handler_docstrings=False,
        path="/docs",
        render_plugins=render_plugins(),
    )


def _lifespan(settings: Settings) -> Any:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = Store.from_url(
            settings.redis_url,
            metrics_maxlen=settings.metrics_maxlen,
            on_terminal=(webhooks.stage_webhook,),
            job_keys=JOB_KEYS,
            max_connections=settings.redis_max_connections,
        )
        arq = await queue.connect(settings.redis_url)
        blobs = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        app.state.store, app.state.arq, app.state.blobs = store, arq, blobs
        app.state.rate_limiter = rate_limiter(store, settings.redis_url)
        await _sweep(app.state.uploads, blobs)
        config = webhooks.WebhookConfig(
            secrets=webhooks.load_secrets(settings.webhook_secrets_file),
            allow_private=settings.webhook_allow_private,
            max_attempts=settings.webhook_max_attempts,
            backoff_seconds=settings.webhook_backoff_seconds,
        )
        try:
            async with contextlib.AsyncExitStack() as running:
                await running.enter_async_context(webhooks.delivering(store.redis, config))
                app.state.event_hub = await running.enter_async_context(
                    EventHub(settings.redis_url).running()
                )
                if settings.scheduler_enabled:
                    scheduler = Scheduler(store, arq, blobs, settings)
                    await running.enter_async_context(scheduling(scheduler))
                _freeze_startup_objects()
                yield
        finally:
            await arq.aclose()
            await store.close()

    return lifespan


def _freeze_startup_objects() -> None:
    """Take what the process holds once started (modules, the app, its routes and schemas:
    ~90,000 objects) out of the garbage collector's view, so that it scans only what requests
    make. Its full collections walked them all and paused every request for 50-70 ms under
    load here, half a GET's p99 at 64 clients. Once a process: a test session starts many
    apps, and what later ones leave is collected as usual."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


async def _sweep(uploads: UploadSpace, blobs: BlobStore) -> None:
    """Remove what uploads killed with an earlier process left: their temp directories, and
    drafts in the store old enough that no live upload can own them."""
    live = await anyio.to_thread.run_sync(uploads.sweep)
    try:
        swept = await anyio.to_thread.run_sync(blobs.sweep_drafts, DATASETS, DRAFT_MAX_AGE_SECONDS)
    except Exception:  # the store may be down; this waits for the next start
        log.warning("could not sweep old upload drafts from the store", exc_info=True)
        swept = 0
    log.info("upload space swept: %d uploads live, %d old drafts removed", live, swept)


def _dependencies(settings: Settings) -> dict[str, Provide]:
    def from_state(name: str) -> Provide:
        def get(state: State) -> Any:
            return state[name]

        return Provide(get, sync_to_thread=False)

    def get_settings() -> Settings:
        return settings

    def get_principal(request: Request[Any, Any, Any]) -> Any:
        return principal(request)

    def get_limits(request: Request[Any, Any, Any]) -> tenants.TenantLimits:
        """The caller's limits: one answer for every route (service/tenants.limits_for)."""
        return tenants.limits_for(settings, request.app.state.tenants, principal(request).tenant)

    return {
        "settings": Provide(get_settings, sync_to_thread=False),
        "principal": Provide(get_principal, sync_to_thread=False),
        "tenant_limits": Provide(get_limits, sync_to_thread=False),
        "tenants": from_state("tenants"),
        "store": from_state("store"),
        "arq": from_state("arq"),
        "blobs": from_state("blobs"),
        "uploads": from_state("uploads"),
    }


def _resolve_dependencies_in_order(app: Litestar) -> None:
    """Litestar resolves a handler's dependencies of one level concurrently, a task each in an
    anyio task group; ours (`_dependencies`) are all synchronous lookups, for which that group
    was a quarter of a `GET /v1/jobs/{id}`'s CPU. One dependency a batch resolves them in turn,
    each still after those it depends on."""
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for _, kwargs in route.route_handler_map.values():
                kwargs.dependency_batches = [
                    {d} for batch in kwargs.dependency_batches for d in batch
                ]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    app = Litestar(
        route_handlers=[
            SystemController,
            DatasetController,
            JobController,
            ArtifactController,
            FeedbackController,
            PolicyController,
            TenancyController,
            FileController,
            FineTuningController,
            assets_router(),
            console_router(),
        ],
        dependencies=_dependencies(settings),
        exception_handlers={Exception: openai_errors.by_path},
        lifespan=[_lifespan(settings)],
        before_send=[add_request_id],
        middleware=[
            RequestMetrics(),
            RequestRate(),
            Audit(),
        ],  # refused: not audited
        openapi_config=_openapi(),
        plugins=[ContractSchemas()],
        request_max_body_size=MAX_REQUEST_BYTES,
        signature_types=[
            Store,
            ArqRedis,
            BlobStore,
            Settings,
            UploadSpace,
            tenants.Tenants,
            tenants.TenantLimits,
        ],
        logging_config=None,
    )
    _resolve_dependencies_in_order(app)
    app.state.settings = settings
    app.state.tenants = tenants.load(settings)
    app.state.uploads = UploadSpace.from_settings(settings, tenants=app.state.tenants.count())
    app.state.row_readers = {}  # tenant -> its CapacityLimiter (api/datasets.py)
    app.state.collector = ServiceCollector()
    app.state.registry = CollectorRegistry()
    app.state.registry.register(app.state.collector)
    log.info("ftune API configured")
    return app
