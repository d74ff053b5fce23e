"""`/v1/files`: OpenAI's Files API over our datasets (see `service.openai.files`)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any, Literal

import anyio.to_thread
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import Stream

from service.api.auth import scope
from service.api.body_stream import stream_upload
from service.api.downloads import attachment, blob_chunks
from service.api.openai.errors import responses
from service.api.spool import Form, Upload, declared_size, receive_upload, spool
from service.blobs import BlobStore, dataset_blob_key
from service.contract import InvalidRows, Job, JobStatus, numbered_as
from service.contract.openai import FileDeleted, FileList, FileObject
from service.datasets.ingest import delete_dataset, store_dataset
from service.datasets.offload import worth_a_child
from service.datasets.space import UploadSpace
from service.datasets.validate import InvalidDataset, Limits
from service.openai import records
from service.openai.files import (
    dataset_file,
    dataset_name,
    job_of_result_file,
    metrics_csv,
    result_file,
    status_details,
)
from service.openai.hyperparameters import SpecError
from service.settings import Principal, Settings
from service.store import NotFound, Store
from service.tenants import TenantLimits, dataset_quota

Page = Callable[[str, int], Awaitable[list[tuple[str, FileObject]]]]
"""A source of files: (id after which to start, how many) -> (sort key, file), newest first."""

FileId = Annotated[
    str,
    Parameter(
        description="The file's id: a dataset (`ds_...`), a failed upload (`file_...`) or a "
        "result file (`res_...`)."
    ),
]


FILE_ID = r"^(ds|file|res)_[A-Za-z0-9]{1,64}(?!\n)$"
"""Ours, as `after`: another id would list from the start again, and a client paging on would
loop."""


def _ours(file_id: str) -> None:
    """NotFound, saying what our ids look like, for an id that cannot be one (an OpenAI
    `file-...` id kept from elsewhere): not "dataset file-abc does not exist"."""
    if re.match(FILE_ID, file_id) is None:
        raise NotFound(
            f"file {file_id} does not exist: this service's file ids start with ds_, file_ or "
            "res_ (ids from another service are not known here)"
        )


def _suffix(file_id: str) -> str:
    """The time-sortable part of any of our ids (`ds_<suffix>`, `file_...`, `res_...`)."""
    return file_id.partition("_")[2]


async def _failed(
    store: Store, tenant: str, name: str, body: Upload | Form, exc: InvalidDataset
) -> FileObject:
    """A file that failed validation: stored as nothing but a failed upload, in status
    `error` with its numbered errors, as OpenAI answers one."""
    errors = [(e.line, e.field, e.msg) for e in exc.errors]
    failed = await records.add_failed_upload(
        store,
        tenant=tenant,
        filename=name,
        size=body.size,
        created_at=time.time(),
        details=status_details(errors, exc.total, numbered_as(exc.container)),
    )
    return failed.file()


async def _result_job(store: Store, file_id: str, tenant: str | None) -> Job:
    """A result file's job; NotFound unless it succeeded."""
    job_id = job_of_result_file(file_id)
    if job_id is not None:
        try:
            job = await store.get_job(job_id, tenant)
        except NotFound:
            job = None
        if job is not None and job.status == JobStatus.succeeded:
            return job
    raise NotFound(f"no file {file_id}")


class FileController(Controller):
    path = "/v1/files"
    tags = ["openai"]

    @post(
        operation_id="CreateFile",
        path="/",
        status_code=200,
        request_max_body_size=None,
        summary="Upload a JSONL file (multipart `file` + `purpose=fine-tune`)",
        description="Validated and stored as a dataset, like POST /v1/datasets. A file that "
        "fails validation stores nothing but comes back in status `error` with its "
        "line-numbered errors in `status_details`.",
        responses=responses(503),
    )
    async def create_file(
        self,
        request: Request[Any, Any, Any],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        uploads: UploadSpace,
        tenant_limits: TenantLimits,
    ) -> FileObject:
        upload = receive_upload(request, settings)
        body = Form(upload) if upload.boundary else upload
        store_as = partial(
            store_dataset,
            store,
            blobs,
            tenant=principal.tenant,
            limits=Limits.from_settings(settings),
            quota=dataset_quota(tenant_limits),
        )
        # Admitted before the body is read, with no room taken: the SDK (httpx) sends its
        # fields before the file, so the file is checked as it arrives once they pass...
        async with uploads.slot(principal.tenant, 0) as tmp:
            head = await body.peek(4)
            rows = _passing(body.fields) if isinstance(body, Form) else None
            if isinstance(body, Form) and rows is not None and not head.startswith(b"PAR1"):
                name = dataset_name(body.filename)
                store_rows = partial(
                    store_as,
                    name=name,
                    on_invalid=rows.on_invalid,
                    max_invalid_fraction=rows.max_invalid_fraction,
                    in_child=worth_a_child(declared_size(request)),
                )
                try:
                    ds = await stream_upload(body, store_rows)
                except InvalidDataset as exc:
                    _read_as_sent(body, rows)
                    return await _failed(store, principal.tenant, name, body, exc)
                try:
                    _read_as_sent(body, rows)
                except SpecError:
                    with anyio.CancelScope(shield=True):  # the answer says nothing is stored
                        await delete_dataset(store, blobs, ds.id, principal.tenant)
                    raise
                return dataset_file(ds)
            # ...else (no purpose yet, Parquet) it is saved first, its fields read to the end.
            await anyio.to_thread.run_sync(uploads.ensure_room, declared_size(request))
            raw = tmp / "raw.jsonl"
            with raw.open("wb") as out:
                spooled = await spool(body, out)
            rows = _fields(spooled.fields)
            name = dataset_name(spooled.filename)
            try:
                ds = await store_as(
                    raw,
                    name=name,
                    on_invalid=rows.on_invalid,
                    max_invalid_fraction=rows.max_invalid_fraction,
                )
            except InvalidDataset as exc:
                return await _failed(store, principal.tenant, name, body, exc)
        return dataset_file(ds)

    @get(
        operation_id="ListFiles",
        path="/",
        summary="List files, newest first",
        responses=responses(),
    )
    async def list_files(
        self,
        principal: Principal,
        store: Store,
        after: Annotated[
            str | None,
            Parameter(
                pattern=FILE_ID,
                description="A file id (`ds_...`, `file_...` or `res_...`): list the files "
                "after it.",
            ),
        ] = None,
        limit: Annotated[
            int, Parameter(ge=1, le=10_000, description="Files per page (at most 10,000).")
        ] = 10_000,
        order: Annotated[
            Literal["asc", "desc"],
            Parameter(description="Order by creation time; only `desc` (newest first) here."),
        ] = "desc",
        purpose: Annotated[
            str | None,
            Parameter(max_length=64, description="Only files of this purpose (`fine-tune`)."),
        ] = None,
    ) -> FileList:
        if order != "desc":
            raise SpecError("order", "only order=desc (newest first) is supported here")
        tenant = scope(principal)

        async def datasets(cursor: str, n: int) -> list[tuple[str, FileObject]]:
            items, _ = await store.list_datasets(tenant, limit=n, cursor=cursor and f"ds_{cursor}")
            return [(_suffix(ds.id), dataset_file(ds)) for ds in items]

        async def failed(cursor: str, n: int) -> list[tuple[str, FileObject]]:
            index = records.failed_index(tenant)
            ids, _ = await store.page_newest(index, n, cursor and f"file_{cursor}")
            return [(_suffix(f.id), f.file()) for f in await records.failed_uploads(store, ids)]

        async def results(cursor: str, n: int) -> list[tuple[str, FileObject]]:
            jobs, _ = await store.list_jobs(
                tenant,
                status=JobStatus.succeeded,
                labels={},
                limit=n,
                cursor=cursor and f"job_{cursor}",
            )
            sizes = await records.result_sizes(store, [job.id for job in jobs])
            return [
                (_suffix(job.id), result_file(job.id, created_at=job.created_at, size=size))
                for job, size in zip(jobs, sizes, strict=True)
            ]

        sources: dict[str | None, list[Page]] = {
            None: [datasets, failed, results],
            "fine-tune": [datasets, failed],
            "fine-tune-results": [results],
        }
        found: list[tuple[str, FileObject]] = []
        for source in sources.get(purpose, []):
            found += await source(_suffix(after) if after else "", limit + 1)
        found.sort(key=lambda item: item[0], reverse=True)
        page = [f for _, f in found[:limit]]
        return FileList(
            data=page,
            has_more=len(found) > limit,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
        )

    @get(
        operation_id="RetrieveFile",
        path="/{file_id:str}",
        summary="A file's object (wait_for_processing polls this)",
        responses=responses(404),
    )
    async def retrieve_file(
        self, file_id: FileId, principal: Principal, store: Store
    ) -> FileObject:
        tenant = scope(principal)
        _ours(file_id)
        if file_id.startswith("file_"):
            return (await records.get_failed_upload(store, file_id, tenant)).file()
        if job_of_result_file(file_id) is not None:
            job = await _result_job(store, file_id, tenant)
            [size] = await records.result_sizes(store, [job.id])  # polled: not the CSV again
            return result_file(job.id, created_at=job.created_at, size=size)
        return dataset_file(await store.get_dataset(file_id, tenant))

    @get(
        operation_id="DownloadFile",
        path="/{file_id:str}/content",
        media_type="application/octet-stream",
        summary="A file's content: the normalized JSONL of a dataset, or a result file's CSV",
        responses=responses(404),
    )
    async def file_content(
        self, file_id: FileId, principal: Principal, store: Store, blobs: BlobStore
    ) -> Response[Any]:
        tenant = scope(principal)
        _ours(file_id)
        if file_id.startswith("file_"):
            failed = await records.get_failed_upload(store, file_id, tenant)
            raise NotFound(f"file {failed.id} failed validation: nothing of it was stored")
        if job_of_result_file(file_id) is not None:
            job = await _result_job(store, file_id, tenant)
            content = metrics_csv(await store.get_metrics(job.id))
            return Response(content, media_type="text/csv")
        ds = await store.get_dataset(file_id, tenant)
        # Streamed from the store as it is read: a download takes no temp space.
        body = await anyio.to_thread.run_sync(blobs.open, dataset_blob_key(ds.sha256))
        return Stream(
            blob_chunks(body),
            media_type="application/jsonl",
            headers={"Content-Length": str(ds.bytes), "Content-Disposition": attachment(ds.name)},
        )

    @delete(
        operation_id="DeleteFile",
        path="/{file_id:str}",
        status_code=200,
        summary="Delete a file (a dataset: refused while a live job uses it)",
        responses=responses(404, 409),
    )
    async def delete_file(
        self, file_id: FileId, principal: Principal, store: Store, blobs: BlobStore
    ) -> FileDeleted:
        tenant = scope(principal)
        _ours(file_id)
        if file_id.startswith("file_"):
            await records.delete_failed_upload(store, file_id, tenant)
        elif job_of_result_file(file_id) is not None:
            await _result_job(store, file_id, tenant)
            raise SpecError(
                "file_id", "a result file goes with its job and cannot be deleted on its own"
            )
        else:
            await delete_dataset(store, blobs, file_id, tenant)
        return FileDeleted(id=file_id)


def _passing(form: dict[str, str]) -> InvalidRows | None:
    """:func:`_fields` of the fields sent so far, None while they do not pass (a field after
    the file may still set `purpose`: the last of a name counts)."""
    try:
        return _fields(form)
    except SpecError:
        return None


def _read_as_sent(form: Form, rows: InvalidRows) -> None:
    """A field after a file checked as it arrived may not change how it was read: a bad one
    is refused by name, as before the file, and `on_invalid` or `max_invalid_fraction` that
    differ from what was applied are refused too (the file was read without them)."""
    final = _fields(form.fields)
    for name in InvalidRows.__struct_fields__:
        if getattr(final, name) != getattr(rows, name):
            raise SpecError(
                name,
                f"{name} came after the file in the form: send it before the file (the SDK's "
                "extra_body does), it decides how the file is read",
            )


def _fields(form: dict[str, str]) -> InvalidRows:
    """The form's `purpose` (fine-tune only) and our extra fields (`extra_body` in the SDK):
    what to do with invalid rows, as `POST /v1/datasets` takes it; any other field is
    refused by name."""
    fields = dict(form)
    purpose = fields.pop("purpose", None)
    if purpose != "fine-tune":
        raise SpecError("purpose", f"purpose must be 'fine-tune' here, got {purpose or 'none'}")
    if unknown := sorted(set(fields) - set(InvalidRows.__struct_fields__)):
        raise SpecError(unknown[0], f"{unknown[0]} is not supported here; leave it out")
    try:
        return msgspec.convert(fields, InvalidRows, strict=False)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$.")
        param = at.rstrip("`")
        raise SpecError(param, f"{param}: {message}") from None
