"""Jobs: submit, list, inspect, cancel, metrics."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import msgspec
from arq.connections import ArqRedis
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from service import queue, vram, webhooks
from service.api import shown
from service.api.auth import scope
from service.api.errors import BadRequest, FieldError, InvalidRequest
from service.api.events import EventHub, Subscription, follow
from service.api.openapi_docs import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    Cursor,
    PageSize,
    responses,
)
from service.api.tenancy import TenantParam, listed_tenant
from service.contract import (
    Dataset,
    GpuMemoryEstimate,
    Job,
    JobList,
    JobSpec,
    JobStatus,
    JobTemplate,
    MetricSeries,
    Untrainable,
    WebhookDeliveries,
    check_trainable,
    kind_mismatch,
    local_model_path,
)
from service.init_from import InitFromError, resolve_init_adapter
from service.settings import Principal, Settings
from service.store import (
    Conflict,
    NotFound,
    Store,
    is_stream_id,
    new_id,
    request_fingerprint,
    stream_position,
)
from service.tenants import GrantMissing, Tenants, check_job, limits_for

JobId = Annotated[str, Parameter(description="The job's id (`job_...`).")]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=255,
        required=False,
        description="Any unique string: a repeat of the request with the same key returns the "
        "first job (header `Idempotent-Replayed: true`) instead of starting another.",
    ),
]
KEEPALIVE_MS = 15_000


def _check_kind(method: str, ds: Dataset, field: str) -> None:
    """A 422 when the method cannot train on the dataset's kind, saying what to do."""
    why = kind_mismatch(method, ds.kind)
    if why is not None:
        raise InvalidRequest(
            f"{field} {ds.id} is a {ds.kind} dataset: {why}",
            [FieldError(loc=["body", field], msg=why)],
        )


def _found(ds: Dataset | None, dataset_id: str, field: str) -> Dataset:
    if ds is None:
        raise InvalidRequest(
            f"{field} {dataset_id} does not exist",
            [FieldError(loc=["body", field], msg=f"dataset {dataset_id} does not exist")],
        )
    return ds


def _cancel(job: Job, *, again: bool = True) -> Job:
    if job.status.terminal:
        raise Conflict(f"job {job.id} is already {job.status.value}")
    if job.cancel_requested and not again:
        raise Conflict(f"job {job.id} is already cancelled")
    if job.status == JobStatus.queued:
        return msgspec.structs.replace(
            job, status=JobStatus.cancelled, cancel_requested=True, finished_at=time.time()
        )
    return msgspec.structs.replace(job, cancel_requested=True)


async def check_template(
    spec: JobTemplate, tenant: str, settings: Settings, tenants: Tenants, *, at: list[str]
) -> None:
    """What a job's spec or a policy's template must pass before anything is stored: the
    tenant's grants, the models dir, trainability, GPU memory and the webhook's address.
    Errors are located under `at` (the body, or the body's template)."""
    try:
        check_job(tenants, tenant, spec, settings.store_url)
    except GrantMissing as exc:
        exc.loc[1:1] = at[1:]
        raise

    def invalid(exc: Exception, *field: str) -> InvalidRequest:
        return InvalidRequest(str(exc), [FieldError(loc=[*at, *field], msg=str(exc))])

    if spec.base_model.startswith("file://"):
        try:
            path = local_model_path(spec.base_model, settings.models_dir)
        except ValueError as exc:
            raise invalid(exc, "base_model") from None
        # Where this process sees the workers' models dir (dev, or the chart's
        # api.mountModels), a model that is not there is refused now, not by a worker later.
        if await anyio.to_thread.run_sync(_missing_model, settings.models_dir, path):
            missing = ValueError(
                f"base_model {spec.base_model!r}: no model there (no config.json in {path}); "
                "file:// models are read from the workers' models dir (FTUNE_MODELS_DIR)"
            )
            raise invalid(missing, "base_model")
    try:
        check_trainable(spec, settings.worker_gpus)
    except Untrainable as exc:
        raise invalid(exc, *exc.field.split(".")) from None
    try:
        vram.check_fits(
            spec, settings.worker_gpu_memory_gb, settings.models_dir, gpus=settings.worker_gpus
        )
    except ValueError as exc:
        raise invalid(exc, "base_model") from None
    if spec.webhook_url is not None:
        try:
            await webhooks.check_url_async(
                spec.webhook_url, allow_private=settings.webhook_allow_private
            )
        except ValueError as exc:
            raise invalid(exc, "webhook_url") from None


def _missing_model(models_dir: Path, path: Path) -> bool:
    """Whether the models dir is here and the model is not in it (a file system call: run it
    off the event loop, it may be a network mount)."""
    return models_dir.is_dir() and not (path / "config.json").is_file()


async def submit_job(
    spec: JobSpec,
    *,
    tenant: str,
    store: Store,
    settings: Settings,
    tenants: Tenants,
    idempotency: tuple[str, str] | None = None,
    idempotency_seconds: int = 24 * 3600,
) -> tuple[Job, bool]:
    """Check a spec against the world (the tenant's grants, models dir, GPU memory, webhook
    address, datasets), record the job within the tenant's queued-jobs limit and queue it:
    the one path of `POST /v1/jobs` and the OpenAI-compatible `POST /v1/fine_tuning/jobs`.
    Returns the job and whether it is an earlier one replayed (same idempotency key), which
    is not queued again."""
    await check_template(spec, tenant, settings, tenants, at=["body"])
    ids = [spec.dataset_id, *([spec.eval_dataset_id] if spec.eval_dataset_id is not None else [])]
    found = await store.get_datasets(ids, tenant)  # both in one round trip
    dataset = _found(found[0], spec.dataset_id, "dataset_id")
    _check_kind(spec.method, dataset, "dataset_id")
    try:
        init_adapter = await resolve_init_adapter(store, spec, tenant)
    except InitFromError as exc:
        raise InvalidRequest(str(exc), [FieldError(loc=["body", *exc.loc], msg=str(exc))]) from None
    eval_dataset = None
    if spec.eval_dataset_id is not None:
        eval_dataset = _found(found[1], spec.eval_dataset_id, "eval_dataset_id")
        _check_kind(spec.method, eval_dataset, "eval_dataset_id")
        if eval_dataset.format != dataset.format:
            raise InvalidRequest(
                "the eval dataset's format differs from the training dataset's",
                [
                    FieldError(
                        loc=["body", "eval_dataset_id"],
                        msg=f"is {eval_dataset.format}, the dataset is {dataset.format}",
                    )
                ],
            )
    now = time.time()
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.queued,
        spec=spec,
        dataset=dataset.ref(),
        eval_dataset=eval_dataset.ref() if eval_dataset else None,
        init_adapter=init_adapter,
        created_at=now,
        updated_at=now,
    )
    try:
        stored = await store.create_job(
            job,
            idempotency=idempotency,
            idempotency_seconds=idempotency_seconds,
            max_queued=limits_for(settings, tenants, tenant).queued_jobs,
            then=lambda pipe, record: queue.enqueue_in(
                pipe, job, queue_name=settings.queue_name, requires=record
            ),
        )
    except NotFound as exc:  # the dataset was deleted while we looked
        raise InvalidRequest(str(exc)) from None
    return stored, stored.id != job.id


def estimate_memory(spec: JobTemplate, settings: Settings) -> GpuMemoryEstimate:
    """What `vram` makes of a spec, in the numbers the submit check compares."""
    try:
        found = vram.estimate(spec, settings.models_dir, gpus=settings.worker_gpus)
    except ValueError as exc:
        raise InvalidRequest(
            str(exc), [FieldError(loc=["body", "base_model"], msg=str(exc))]
        ) from None
    limit = settings.worker_gpu_memory_gb
    if found is None:
        return GpuMemoryEstimate(
            base_model=spec.base_model,
            gpu_memory_gb=limit,
            summary=f"the shape of {spec.base_model} is unknown: no estimate, and no check at "
            "submit",
        )
    parts = {
        "weights": found.weights,
        "adapter": found.adapter,
        "activations": found.activations,
        "lm_head": found.lm_head,
        "overhead": found.overhead,
    }
    return GpuMemoryEstimate(
        base_model=spec.base_model,
        architecture=found.architecture.name,
        total_gb=round(found.total_gb, 2),
        parts_gb={name: round(value / vram.GIB, 2) for name, value in parts.items()},
        gpu_memory_gb=limit,
        fits=None if limit is None else found.total_gb <= limit,
        summary=(
            f"per GPU of {settings.worker_gpus} ({spec.parallelism.strategy}): "
            if settings.worker_gpus > 1
            else ""
        )
        + found.describe(),
    )


async def cancel_job(
    job_id: str,
    *,
    tenant: str | None,
    store: Store,
    arq: ArqRedis,
    settings: Settings,
    again: bool = True,
) -> Job:
    """Cancel a queued job at once (and take it off the queue), or ask a running job's worker
    to stop; Conflict on a finished job, and (`again` false) on one already asked to stop."""
    job = await store.update_job(job_id, lambda j: _cancel(j, again=again), tenant=tenant)
    if job.status == JobStatus.cancelled:
        await queue.remove(
            arq, job.id, job.attempt, tenant=job.tenant, queue_name=settings.queue_name
        )
    return job


class JobController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]

    @post(
        operation_id="CreateJob",
        path="/",
        status_code=201,
        summary="Submit a fine-tuning job",
        responses=responses(CONFLICT, FORBIDDEN),
    )
    async def create_job(
        self,
        request: Request[Any, Any, Any],
        data: JobSpec,
        principal: Principal,
        store: Store,
        settings: Settings,
        tenants: Tenants,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Job]:
        idem = None
        if idempotency_key:
            idem = (idempotency_key, request_fingerprint(await request.body()))
        job, replayed = await submit_job(
            data,
            tenant=principal.tenant,
            store=store,
            settings=settings,
            tenants=tenants,
            idempotency=idem,
        )
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return Response(shown.job(job), status_code=201, headers=headers)

    @post(
        operation_id="EstimateJobMemory",
        path="/estimate",
        status_code=200,
        summary="The GPU memory a job would need, before submitting it",
        description="The same estimate the submit check compares with the workers' GPU memory "
        "(`FTUNE_WORKER_GPU_MEMORY_GB`). The body is a job spec without its datasets.",
        responses=responses(),
    )
    async def estimate(
        self,
        data: Annotated[JobTemplate, Body(description="The job spec, without dataset ids.")],
        principal: Principal,
        settings: Settings,
    ) -> GpuMemoryEstimate:
        return estimate_memory(data, settings)

    @get(
        operation_id="ListJobs",
        path="/",
        summary="List jobs, newest first (an admin's: every tenant's)",
        responses=responses(FORBIDDEN),
    )
    async def list_jobs(
        self,
        principal: Principal,
        store: Store,
        status: Annotated[
            JobStatus | None, Parameter(description="Only jobs in this status.")
        ] = None,
        label: Annotated[
            list[str] | None,
            Parameter(
                description="Only jobs with this label, as `key=value`; repeat to require "
                "several. A page may then hold fewer than `limit` jobs (at most 2,000 are "
                "looked at per request): go on while `next_cursor` is not null.",
                max_items=16,
            ),
        ] = None,
        limit: PageSize = 20,
        cursor: Cursor = None,
        tenant: TenantParam = None,
    ) -> JobList:
        labels: dict[str, str] = {}
        for item in label or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidRequest(
                    f"label filter {item!r} must be key=value",
                    [FieldError(loc=["query", "label"], msg="expected key=value")],
                )
            labels[key] = value
        items, next_cursor = await store.list_jobs(
            listed_tenant(principal, tenant),
            status=status,
            labels=labels,
            limit=limit,
            cursor=cursor,
        )
        return JobList(items=[shown.job(j) for j in items], next_cursor=next_cursor)

    @get(operation_id="GetJob", path="/{job_id:str}", responses=responses(NOT_FOUND))
    async def get_job(self, job_id: JobId, principal: Principal, store: Store) -> Job:
        return shown.job(await store.get_job(job_id, scope(principal)))

    @post(
        operation_id="CancelJob",
        path="/{job_id:str}/cancel",
        status_code=202,
        summary="Cancel a queued or running job",
        responses=responses(NOT_FOUND, CONFLICT),
    )
    async def cancel(
        self, job_id: JobId, principal: Principal, store: Store, arq: ArqRedis, settings: Settings
    ) -> Job:
        job = await cancel_job(
            job_id, tenant=scope(principal), store=store, arq=arq, settings=settings
        )
        return shown.job(job)

    @get(
        operation_id="GetJobMetrics",
        path="/{job_id:str}/metrics",
        summary="The job's metric time series (TRL's keys)",
        responses=responses(NOT_FOUND),
    )
    async def job_metrics(
        self,
        job_id: JobId,
        principal: Principal,
        store: Store,
        since_step: Annotated[
            int, Parameter(ge=0, description="Only points at this step or later; 0: all of them.")
        ] = 0,
    ) -> MetricSeries:
        await store.get_job(job_id, scope(principal))
        points = await store.get_metrics(job_id, since_step=since_step)
        return MetricSeries(job_id=job_id, points=points)

    @get(
        operation_id="ListJobWebhookDeliveries",
        path="/{job_id:str}/webhook-deliveries",
        summary="The attempts to deliver the job's webhook: what the receiver answered",
        description="Each attempt with its status code or error and when the next one is due "
        "(none once delivered or given up after FTUNE_WEBHOOK_MAX_ATTEMPTS): a receiver that "
        "never got its event can see why here.",
        responses=responses(NOT_FOUND),
    )
    async def webhook_deliveries(
        self, job_id: JobId, principal: Principal, store: Store
    ) -> WebhookDeliveries:
        await store.get_job(job_id, scope(principal))
        return WebhookDeliveries(
            job_id=job_id, deliveries=await webhooks.delivery_log(store.redis, job_id)
        )

    @get(
        operation_id="StreamJobEvents",
        path="/{job_id:str}/events",
        media_type="text/event-stream",
        summary="Server-Sent Events: status, phase, metrics and log lines, until the job ends",
        description="Each event's `id` is its position; reconnect with `Last-Event-ID` to "
        "resume exactly after it (400 for an id past the newest event). The stream closes "
        "after the terminal status event, or after `FTUNE_EVENT_STREAM_SECONDS` (an hour) "
        "with a comment saying so: resume then. Each open stream takes one of the caller's "
        "`event_streams` (429 past them).",
        responses=responses(BAD_REQUEST, NOT_FOUND),
    )
    async def job_events(
        self,
        job_id: JobId,
        principal: Principal,
        store: Store,
        state: State,
        settings: Settings,
        tenants: Tenants,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID",
                max_length=64,
                required=False,
                description="The `id` of the last event received: the stream resumes right "
                "after it (browsers send it when they reconnect).",
            ),
        ] = None,
    ) -> ServerSentEvent:
        job = await store.get_job(job_id, scope(principal))
        if last_event_id is not None and not is_stream_id(last_event_id):
            raise BadRequest(
                "Last-Event-ID must be an id this stream sent (e.g. 1700000000000-0)",
                [FieldError(loc=["header", "Last-Event-ID"], msg="not an event id")],
            )
        after = last_event_id or "0-0"
        if last_event_id is not None:
            await _sent_by_stream(store, job_id, last_event_id)
        hub: EventHub = state.event_hub
        # Counted for the caller: an admin's streams must not take a tenant's slots.
        limit = limits_for(settings, tenants, principal.tenant).event_streams
        sub = await hub.subscribe(store, principal.tenant, job_id, limit=limit)
        if job.status.terminal:  # complete: what is left, without following
            events = _rest(store, job_id, after)
        else:
            events = _live(hub, store, sub, after, settings.event_stream_seconds)
        stream = _held(hub, sub, events)
        weakref.finalize(stream, hub.unsubscribe, sub)  # in case it is never iterated
        return ServerSentEvent(stream)


async def _sent_by_stream(store: Store, job_id: str, last_event_id: str) -> None:
    """A 400 for an id past the stream's newest event: the stream never sent it, and a
    follower waiting for events after it would miss the terminal one and stay open for good."""
    newest = await store.events_before(job_id, before=None, count=1)
    tip = newest[0][0] if newest else "0-0"
    if stream_position(last_event_id) > stream_position(tip):
        raise BadRequest(
            f"Last-Event-ID {last_event_id} is past this job's newest event ({tip}): "
            "this stream did not send it; reconnect without it to read from the start",
            [FieldError(loc=["header", "Last-Event-ID"], msg="past the newest event")],
        )


async def _rest(store: Store, job_id: str, after: str) -> AsyncIterator[ServerSentEventMessage]:
    while entries := await store.read_events(job_id, after=after, block_ms=None):
        for entry_id, kind, data in entries:
            after = entry_id
            yield ServerSentEventMessage(event=kind, data=data.decode(), id=entry_id)


async def _held(
    hub: EventHub, sub: Subscription, events: AsyncIterator[ServerSentEventMessage]
) -> AsyncIterator[ServerSentEventMessage]:
    """``events``, holding the caller's stream slot until they end or the client leaves."""
    try:
        async for event in events:
            yield event
    finally:
        hub.unsubscribe(sub)


async def _live(
    hub: EventHub, store: Store, sub: Subscription, after: str, seconds: float
) -> AsyncIterator[ServerSentEventMessage]:
    ends = time.monotonic() + seconds
    async for event in follow(store, sub, after, KEEPALIVE_MS / 1000, until=ends):
        if event is None:
            if time.monotonic() < ends:  # else the stream ends just below
                yield ServerSentEventMessage(comment="keep-alive", data=None)  # not empty
        else:
            entry_id, kind, data = event
            yield ServerSentEventMessage(event=kind, data=data.decode(), id=entry_id)
            if kind == "status" and msgspec.json.decode(data)["status"] in TERMINAL:
                return
        if time.monotonic() >= ends:  # a comment: the job is not over, the client resumes
            yield ServerSentEventMessage(
                comment=f"this stream ends after {seconds:g} s; resume with Last-Event-ID"
            )
            return
    if hub.closing:  # a comment, so that a client knows the job is not over: it resumes
        yield ServerSentEventMessage(
            comment="the server is shutting down; resume with Last-Event-ID"
        )


TERMINAL = {s.value for s in JobStatus if s.terminal}
