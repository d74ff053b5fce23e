"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs API over our jobs (see
`service.openai.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from arq.connections import ArqRedis
from litestar import Controller, Request, get, post
from litestar.datastructures import MultiDict
from litestar.params import Parameter

from service import vram
from service.api.auth import scope
from service.api.errors import InvalidRequest
from service.api.jobs import IdempotencyKey, JobId, cancel_job, submit_job
from service.api.openai.errors import responses
from service.blobs import BlobStore
from service.checkpoints import checkpoint_prefix, checkpoints_prefix, complete_steps
from service.contract import Dataset, Job, JobSpec
from service.contract.openai import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)
from service.openai import records
from service.openai.events import checkpoint_object, entry_of, event_object, step_of_checkpoint
from service.openai.hyperparameters import SpecError
from service.openai.jobs import (
    check_file_kind,
    hyperparameters_at,
    job_object,
    method_of,
    openai_param,
    to_spec,
)
from service.settings import Principal, Settings
from service.store import LABEL_SCAN, Conflict, NotFound, Store, request_fingerprint
from service.tenants import Tenants

RETRY_WINDOW_SECONDS = 600
"""A create retried by the SDK (it retries one that timed out or met a 409/429/5xx, without an
idempotency key) whose body repeats one from this long ago gets that job back while it has
not ended; so does a repeat from a client that does not number its tries. A job that has
ended is no retry's answer (a cancelled job created again is a new job). An
`Idempotency-Key` header, when sent, is honoured for 24 h instead, whatever became of the
job."""
JOB_ID = r"^job_[A-Za-z0-9]{1,64}(?!\n)$"
SDK_RETRY_COUNT = "x-stainless-retry-count"
"""The `openai` SDK numbers each try of a request (0 for the first): a first try is never a
retry, so the same create sent twice on purpose makes two jobs, as on OpenAI."""


async def _training_dataset(store: Store, file_id: str, tenant: str, param: str) -> Dataset:
    try:
        return await store.get_dataset(file_id, tenant)
    except NotFound:
        pass
    try:
        failed = await records.get_failed_upload(store, file_id, tenant)
    except NotFound:
        raise SpecError(
            param, f"{param} {file_id} does not exist; upload it with POST /v1/files"
        ) from None
    raise SpecError(
        param, f"{param} {file_id} failed validation and cannot be used: {failed.status_details}"
    )


MAX_FILTER_KEYS = 16
"""As many as a job may have labels (and as the label filter of GET /v1/jobs takes)."""
FILTER_CALLS = 10
"""Reads of up to LABEL_SCAN records each that a metadata filter may make for one page: past
them, with no match yet, the request is refused rather than read the whole index."""


def _metadata_filter(query: MultiDict[Any]) -> dict[str, str]:
    """OpenAI's `metadata[k]=v` query filter, as our label filter."""
    labels = {}
    for key, value in query.multi_items():
        if key == "metadata":
            raise SpecError(
                "metadata", "filter with metadata[key]=value; metadata=null is not supported here"
            )
        if key.startswith("metadata[") and key.endswith("]"):
            labels[key[len("metadata[") : -1]] = str(value)
    if len(labels) > MAX_FILTER_KEYS:
        raise SpecError("metadata", f"filter on at most {MAX_FILTER_KEYS} metadata keys")
    return labels


class FineTuningController(Controller):
    path = "/v1/fine_tuning/jobs"
    tags = ["openai"]

    @post(
        operation_id="CreateFineTuningJob",
        path="/",
        status_code=200,
        summary="Create a fine-tuning job (OpenAI's body; our options as extra fields)",
        description="The same path as POST /v1/jobs: the job is one of ours. Hyperparameters "
        'left out or "auto" are resolved from the dataset size and the model (the job '
        "object reports the values used). A retry of the same body within 10 minutes (the "
        "SDK's `x-stainless-retry-count` 1 or more, or a client that does not number its tries) "
        "returns the first job while it is queued or running; the SDK's first try, or a body "
        "whose job has ended, starts a new job.",
        responses=responses(429),
    )
    async def create_job(
        self,
        request: Request[Any, Any, Any],
        data: FineTuningJobCreate,
        principal: Principal,
        store: Store,
        settings: Settings,
        tenants: Tenants,
        idempotency_key: IdempotencyKey = None,
    ) -> FineTuningJob:
        training = await _training_dataset(
            store, data.training_file, principal.tenant, "training_file"
        )
        kind = method_of(data, training.kind)
        check_file_kind(kind, training.kind, "training_file", training.id)
        if data.validation_file is not None:
            validation = await _training_dataset(
                store, data.validation_file, principal.tenant, "validation_file"
            )
            check_file_kind(kind, validation.kind, "validation_file", validation.id)

        def fits(spec: JobSpec) -> bool:
            try:
                vram.check_fits(
                    spec,
                    settings.worker_gpu_memory_gb,
                    settings.models_dir,
                    gpus=settings.worker_gpus,
                )
            except ValueError:
                return False
            return True

        spec = to_spec(
            data,
            rows=training.rows,
            fits=fits,
            gpus=settings.worker_gpus,
            dataset_kind=training.kind,
        )
        fingerprint = request_fingerprint(await request.body())
        if idempotency_key:
            idem, seconds = (idempotency_key, fingerprint), 24 * 3600
        else:
            idem, seconds = (f"openai-body:{fingerprint}", fingerprint), RETRY_WINDOW_SECONDS

        async def submit() -> tuple[Job, bool]:
            try:
                return await submit_job(
                    spec,
                    tenant=principal.tenant,
                    store=store,
                    settings=settings,
                    tenants=tenants,
                    idempotency=idem,
                    idempotency_seconds=seconds,
                )
            except InvalidRequest as exc:  # named in the body's terms, under its method
                loc = [p for p in (exc.errors[0].loc or []) if p != "body"] if exc.errors else []
                param = openai_param(loc, hyperparameters_at(data, kind))
                raise SpecError(param, exc.detail) from None

        job, replayed = await submit()
        first_try = request.headers.get(SDK_RETRY_COUNT) == "0"
        if (
            replayed
            and not idempotency_key
            and (first_try or job.status.terminal or job.cancel_requested)
        ):
            # The body repeats an earlier one, but this is the SDK's first try (not a retry),
            # or that job has ended (or is shown `cancelled`, its worker stopping it): a new
            # job is asked for, and a retry of this request will find it.
            await store.forget_idempotency(principal.tenant, idem[0], job.id)
            job, replayed = await submit()
        if data.suffix and not replayed:
            await records.set_suffix(store, job.id, data.suffix)
        return job_object(job, suffix=data.suffix, gpus=settings.worker_gpus)

    @get(
        operation_id="ListFineTuningJobs",
        path="/",
        summary="List fine-tuning jobs, newest first",
        description="All of the tenant's jobs, whichever API created them. Filter by metadata "
        "(our labels) with `metadata[key]=value`, repeated to require several.",
        responses=responses(),
    )
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        principal: Principal,
        store: Store,
        settings: Settings,
        after: Annotated[
            str | None,
            Parameter(pattern=JOB_ID, description="A job id: list the jobs created before it."),
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=100, description="Jobs per page.")] = 20,
    ) -> FineTuningJobList:
        labels, next_cursor = _metadata_filter(request.query_params), after
        for _ in range(FILTER_CALLS):
            # OpenAI's pages go on from their last item: an empty page with more to read would
            # end a client's listing, so a metadata filter reads on to a match or the end.
            jobs, next_cursor = await store.list_jobs(
                scope(principal), status=None, labels=labels, limit=limit, cursor=next_cursor
            )
            if jobs or next_cursor is None:
                break
        else:
            raise SpecError(
                "metadata",
                f"no job matches this metadata filter among the {FILTER_CALLS * LABEL_SCAN} "
                f"newest{f' after {after}' if after else ''}, and more are left to read: "
                "page through them with GET /v1/jobs?label=KEY=VALUE (short pages and a "
                f"cursor), or pass after={next_cursor} to read on from there",
            )
        suffixes = await records.suffixes(store, [j.id for j in jobs])
        return FineTuningJobList(
            data=[
                job_object(j, suffix=suffixes.get(j.id), gpus=settings.worker_gpus) for j in jobs
            ],
            has_more=next_cursor is not None,
        )

    @get(
        operation_id="RetrieveFineTuningJob",
        path="/{job_id:str}",
        summary="A fine-tuning job",
        responses=responses(404),
    )
    async def retrieve_job(
        self, job_id: JobId, principal: Principal, store: Store, settings: Settings
    ) -> FineTuningJob:
        job = await store.get_job(job_id, scope(principal))
        return await _shown(store, job, settings)

    @post(
        operation_id="CancelFineTuningJob",
        path="/{job_id:str}/cancel",
        status_code=200,
        summary="Cancel a queued job at once, or ask a running one to stop",
        responses=responses(404, 409),
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        job_id: JobId,
        principal: Principal,
        store: Store,
        arq: ArqRedis,
        settings: Settings,
    ) -> FineTuningJob:
        # Shown `cancelled` since the first cancel, as OpenAI's are: a second is refused,
        # unless it is the SDK's retry of one whose answer was lost (that cancel worked).
        try:
            job = await cancel_job(
                job_id,
                tenant=scope(principal),
                store=store,
                arq=arq,
                settings=settings,
                again=False,
            )
        except Conflict:
            if request.headers.get(SDK_RETRY_COUNT, "0") == "0":
                raise
            job = await store.get_job(job_id, scope(principal))
            if not job.cancel_requested:  # ended otherwise: no cancel of ours to answer
                raise
        return await _shown(store, job, settings)

    @post(
        operation_id="PauseFineTuningJob",
        path="/{job_id:str}/pause",
        status_code=200,
        summary="Pause a job: not available here (400 saying so)",
        description="A job cannot be paused here: cancel it, and create it again when wanted. "
        "Answered in OpenAI's error envelope so that the SDK's `pause` says why.",
        responses=responses(404),
    )
    async def pause(self, job_id: JobId, principal: Principal, store: Store) -> FineTuningJob:
        raise await _no_pausing(store, job_id, principal, "paused")

    @post(
        operation_id="ResumeFineTuningJob",
        path="/{job_id:str}/resume",
        status_code=200,
        summary="Resume a paused job: not available here (400 saying so)",
        description="No job is ever paused here. Answered in OpenAI's error envelope so that "
        "the SDK's `resume` says why.",
        responses=responses(404),
    )
    async def resume(self, job_id: JobId, principal: Principal, store: Store) -> FineTuningJob:
        raise await _no_pausing(store, job_id, principal, "resumed")

    @get(
        operation_id="ListFineTuningEvents",
        path="/{job_id:str}/events",
        summary="A job's events, newest first: status, phases, log lines and metrics",
        responses=responses(404),
    )
    async def list_events(
        self,
        job_id: JobId,
        principal: Principal,
        store: Store,
        after: Annotated[
            str | None,
            Parameter(max_length=64, description="An event id: list the events older than it."),
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="Events per page.")] = 20,
    ) -> FineTuningJobEventList:
        job = await store.get_job(job_id, scope(principal))
        before = None
        if after is not None:
            before = entry_of(after)
            if before is None:
                raise SpecError("after", f"after must be an event id of this job, got {after!r}")
        entries = await store.events_before(job_id, before=before, count=limit + 1)
        total = job.progress.total_steps
        return FineTuningJobEventList(
            data=[event_object(*entry, total_steps=total) for entry in entries[:limit]],
            has_more=len(entries) > limit,
        )

    @get(
        operation_id="ListFineTuningJobCheckpoints",
        path="/{job_id:str}/checkpoints",
        summary="A job's stored checkpoints, newest first",
        responses=responses(404),
    )
    async def list_checkpoints(
        self,
        job_id: JobId,
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        after: Annotated[
            str | None,
            Parameter(max_length=100, description="A checkpoint id: list the ones before it."),
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=100, description="Checkpoints per page.")] = 10,
    ) -> FineTuningJobCheckpointList:
        job = await store.get_job(job_id, scope(principal))
        prefix = checkpoints_prefix(job.id)
        keys = await anyio.to_thread.run_sync(blobs.list, prefix)
        steps = sorted(complete_steps(keys, prefix), reverse=True)
        if after is not None:
            below = step_of_checkpoint(after, job.id)
            if below is None:
                raise SpecError(
                    "after", f"after must be a checkpoint id of this job, got {after!r}"
                )
            steps = [s for s in steps if s < below]
        page = steps[:limit]
        points = await store.get_metrics(job.id, since_step=min(page)) if page else []
        data = [
            checkpoint_object(
                job.id,
                step,
                blobs.uri(checkpoint_prefix(job.id, step).rstrip("/")) + "/",
                points,
                fallback_time=job.updated_at,
            )
            for step in page
        ]
        return FineTuningJobCheckpointList(
            data=data,
            has_more=len(steps) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )


async def _no_pausing(store: Store, job_id: str, principal: Principal, done: str) -> SpecError:
    job = await store.get_job(job_id, scope(principal))  # another tenant's: 404
    return SpecError(
        None,
        f"jobs cannot be paused or resumed on this service, so {job.id} cannot be {done}: "
        f"cancel it (POST /v1/fine_tuning/jobs/{job.id}/cancel) and create it again when wanted",
    )


async def _shown(store: Store, job: Job, settings: Settings) -> FineTuningJob:
    suffix = (await records.suffixes(store, [job.id])).get(job.id)
    return job_object(job, suffix=suffix, gpus=settings.worker_gpus)
