"""Feedback streams: post events, read a stream and its pairs, snapshot it into a dataset."""

from __future__ import annotations

import re
from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.openapi.spec import Example
from litestar.params import Parameter

from service.api.errors import FieldError, InvalidRequest
from service.api.openapi_docs import (
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    UNAVAILABLE,
    PageSize,
    request_body,
    responses,
)
from service.api.tenancy import ListCursor, TenantParam, acting_tenant, listed_tenant, owning_tenant
from service.blobs import BlobStore
from service.contract import (
    EVENTS_EXAMPLE,
    STREAM_NAME,
    FeedbackBatch,
    FeedbackReceipt,
    FeedbackSnapshot,
    FeedbackStream,
    FeedbackStreamList,
    PairList,
    SnapshotRows,
)
from service.datasets.space import UploadSpace
from service.datasets.validate import Limits
from service.retraining import feedback, snapshots
from service.retraining.events import InvalidFeedback
from service.settings import Principal, Settings
from service.store import Store
from service.tenants import Tenants, dataset_quota, limits_for

StreamName = Annotated[
    str,
    Parameter(
        pattern=STREAM_NAME,
        description="Letters, digits, '_', '.', '-'; at most 63 characters",
    ),
]
_PATH_PARTS = re.compile(r"[.\[\]]")
EVENTS = request_body(
    "Up to 1000 feedback events for the stream named in the path, which is created by its "
    "first batch. All or nothing: one bad event rejects the batch (422, each error located by "
    "the event's index). Event ids dedupe, so a failed batch can simply be sent again.",
    examples={
        "one_of_each": Example(
            summary="A pair, a rating and an edit", value={"events": EVENTS_EXAMPLE}
        ),
        "conversational": Example(
            summary="A pair of conversations",
            value={
                "events": [
                    {
                        "id": "c1",
                        "prompt": [{"role": "user", "content": "Capital of Peru?"}],
                        "chosen": [{"role": "assistant", "content": "Lima."}],
                        "rejected": [{"role": "assistant", "content": "Quito."}],
                    }
                ]
            },
        ),
    },
)


def _invalid(exc: InvalidFeedback) -> InvalidRequest:
    """Problem Details with one error per bad event, located by its index in the batch."""
    errors = [
        FieldError(
            loc=[
                "body",
                "events",
                str(e.index),
                *(p for p in _PATH_PARTS.split(e.field or "") if p),
            ],
            field=e.field,
            msg=e.msg,
        )
        for e in exc.errors
    ]
    return InvalidRequest(str(exc), errors)


class FeedbackController(Controller):
    """Streams are named per tenant: another tenant's stream of the same name is a different
    stream, and reading a name the caller never wrote to answers 404."""

    path = "/v1/feedback"
    tags = ["feedback"]

    @post(
        operation_id="PostFeedback",
        path="/{stream:str}",
        status_code=200,
        summary="Add a batch of feedback events to a stream (all or nothing; ids dedupe)",
        responses=responses(FORBIDDEN),
        operation_class=EVENTS,
    )
    async def post_feedback(
        self,
        stream: StreamName,
        data: FeedbackBatch,
        principal: Principal,
        store: Store,
        settings: Settings,
        tenants: Tenants,
        tenant: TenantParam = None,
    ) -> FeedbackReceipt:
        owner = owning_tenant(principal, tenant, tenants)
        limits = limits_for(settings, tenants, owner)
        try:
            return await feedback.ingest(
                store,
                owner,
                stream,
                data.events,
                max_streams=limits.feedback_streams,
                max_tenant_bytes=limits.feedback_bytes,
                max_line_bytes=settings.max_line_bytes,
                max_rows=settings.max_dataset_rows,
                max_bytes=settings.max_dataset_bytes,
            )
        except InvalidFeedback as exc:
            raise _invalid(exc) from None

    @get(
        operation_id="ListFeedbackStreams",
        path="/",
        summary="List the caller's feedback streams by name (an admin's: every tenant's)",
        responses=responses(FORBIDDEN),
    )
    async def list_streams(
        self,
        principal: Principal,
        store: Store,
        limit: PageSize = 50,
        cursor: ListCursor = None,
        tenant: TenantParam = None,
    ) -> FeedbackStreamList:
        items, next_cursor = await feedback.list_streams(
            store, listed_tenant(principal, tenant), limit=limit, cursor=cursor
        )
        return FeedbackStreamList(items=items, next_cursor=next_cursor)

    @get(
        operation_id="GetFeedbackStream",
        path="/{stream:str}",
        summary="A stream's counts and its newest snapshots",
        responses=responses(NOT_FOUND, FORBIDDEN),
    )
    async def get_stream(
        self, stream: StreamName, principal: Principal, store: Store, tenant: TenantParam = None
    ) -> FeedbackStream:
        return await feedback.get_stream(store, acting_tenant(principal, tenant), stream, recent=10)

    @delete(
        operation_id="DeleteFeedbackStream",
        path="/{stream:str}",
        status_code=204,
        summary="Delete a stream and its pairs (its snapshots' datasets stay)",
        responses=responses(NOT_FOUND, FORBIDDEN),
    )
    async def delete_stream(
        self, stream: StreamName, principal: Principal, store: Store, tenant: TenantParam = None
    ) -> None:
        await feedback.delete_stream(store, acting_tenant(principal, tenant), stream)

    @get(
        operation_id="ListFeedbackPairs",
        path="/{stream:str}/pairs",
        summary="The stream's pairs in the order gathered, with the events that made each",
        responses=responses(NOT_FOUND, FORBIDDEN),
    )
    async def list_pairs(
        self,
        stream: StreamName,
        principal: Principal,
        store: Store,
        offset: Annotated[
            int, Parameter(ge=0, le=10**12, description="Position of the first pair to return.")
        ] = 0,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="Pairs to return.")] = 100,
        tenant: TenantParam = None,
    ) -> PairList:
        owner = acting_tenant(principal, tenant)
        meta = await feedback.get_stream(store, owner, stream)
        items = await feedback.read_pairs(store, owner, stream, offset, offset + limit)
        return PairList(stream=stream, offset=offset, total=meta.pairs, items=items)

    @post(
        operation_id="SnapshotFeedback",
        path="/{stream:str}/snapshot",
        status_code=201,
        summary="Freeze the pairs (or every rating, unpaired) gathered so far into a dataset",
        description="The dataset counts against the tenant's dataset limits: 429 past them "
        "(a retraining policy's own snapshots are never refused).",
        responses=responses(NOT_FOUND, CONFLICT, FORBIDDEN, UNAVAILABLE),
    )
    async def snapshot(
        self,
        stream: StreamName,
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        uploads: UploadSpace,
        tenants: Tenants,
        rows: Annotated[
            SnapshotRows,
            Parameter(
                description="`pairs`: the preference pairs (for dpo, orpo, simpo); `unpaired`: "
                "every rating as a completion labelled true (up) or false (down), for kto"
            ),
        ] = "pairs",
        tenant: TenantParam = None,
    ) -> FeedbackSnapshot:
        limits = Limits.from_settings(settings)
        owner = owning_tenant(principal, tenant, tenants)
        async with uploads.slot(owner) as workdir:
            return await snapshots.snapshot(
                store,
                blobs,
                owner,
                stream,
                limits=limits,
                workdir=workdir,
                by="api",
                rows=rows,
                quota=dataset_quota(limits_for(settings, tenants, owner)),
            )
