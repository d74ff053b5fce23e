"""Dataset upload, import, preview, listing and deletion.

An upload takes a slot of the host's upload space (`service.datasets.space`). A raw body, or
the file of a multipart form, is validated and normalized while it arrives, in a thread,
straight into the blob store (`service.api.body_stream`; `service.api.spool` enforces the
size limit and the pace on the way); a Parquet file (read from its end) and, with several
ingest processes, every upload (they split a file) are saved in the slot first. The dataset is
recorded only at the end: invalid input, or a body that stops short, stores nothing. An
import downloads its source into such a slot first, then goes the same way.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.openapi.spec import Example, OpenAPIMediaType, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import Body, Parameter, ParameterKwarg

from service.api.auth import scope
from service.api.body_stream import stream_upload
from service.api.errors import (
    FieldError,
    InvalidRequest,
)
from service.api.openapi_docs import (
    BAD_GATEWAY,
    CONFLICT,
    FORBIDDEN,
    INVALID,
    NOT_FOUND,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    UNSUPPORTED,
    Cursor,
    PageSize,
    request_body,
    responses,
)
from service.api.spool import JSONL_TYPES, Form, Upload, declared_size, receive_upload, spool
from service.api.tenancy import TenantParam, listed_tenant
from service.blobs import BlobStore, dataset_blob_key
from service.contract import (
    NAME_PATTERN,
    Container,
    Dataset,
    DatasetImport,
    DatasetList,
    DatasetRow,
    DatasetRows,
    FieldMapping,
    OnInvalid,
)
from service.datasets.ingest import delete_dataset, store_dataset
from service.datasets.offload import worth_a_child
from service.datasets.sources import fetch
from service.datasets.space import UploadSpace
from service.datasets.validate import Limits
from service.settings import Principal, Settings
from service.store import Store
from service.tenants import TenantLimits, Tenants, check_s3_read, dataset_quota

DatasetId = Annotated[str, Parameter(description="The dataset's id (`ds_...`).")]


def _column(role: str) -> ParameterKwarg:
    return ParameterKwarg(
        min_length=1,
        max_length=128,
        description=f"The column of your rows that holds the {role}, if it is not `{role}` and "
        "the layout is not one read without a mapping.",
    )


_PREVIEW_MAX = 100
ROW_READS_PER_TENANT = 2
"""A tenant's row previews read at once, each in a thread, perhaps a large blob from its start:
more wait their turn, so that one tenant cannot take the threads every tenant shares. Bounded
by the tenants configured."""
_row_decoder = msgspec.json.Decoder(DatasetRow)


_ROWS = {
    "standard": (
        "Standard rows: texts as strings",
        '{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think... 5."}\n'
        '{"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito, I think."}\n',
    ),
    "conversational": (
        "Conversational rows: lists of {role, content} messages",
        '{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": '
        '"Capital of Peru?"}], "chosen": [{"role": "assistant", "content": "Lima."}], '
        '"rejected": [{"role": "assistant", "content": "Quito."}]}\n',
    ),
    "openai": (
        "OpenAI's DPO format",
        '{"input": {"messages": [{"role": "user", "content": "Capital of Peru?"}]}, '
        '"preferred_output": [{"role": "assistant", "content": "Lima."}], '
        '"non_preferred_output": [{"role": "assistant", "content": "Quito."}]}\n',
    ),
}
_JSONL = OpenAPIMediaType(
    schema=Schema(type=OpenAPIType.STRING, description="JSONL: one JSON object per line, UTF-8."),
    examples={k: Example(summary=summary, value=rows) for k, (summary, rows) in _ROWS.items()},
)
_MULTIPART = OpenAPIMediaType(
    schema=Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "file": Schema(
                type=OpenAPIType.STRING,
                format=OpenAPIFormat.BINARY,
                description="The dataset file (any container the raw body takes). The first "
                "part with a filename is read, whatever its name; other parts are ignored.",
            )
        },
        required=["file"],
    ),
    examples={
        k: Example(summary=summary, value={"file": rows}) for k, (summary, rows) in _ROWS.items()
    },
)
_JSON_ARRAY = OpenAPIMediaType(
    schema=Schema(type=OpenAPIType.ARRAY, description="A JSON array of row objects (streamed)."),
    examples={
        "sharegpt": Example(
            summary="LLaMA-Factory's ShareGPT pairwise rows, as its data/ folder ships them",
            value=[
                {
                    "conversations": [{"from": "human", "value": "Capital of Peru?"}],
                    "chosen": {"from": "gpt", "value": "Lima."},
                    "rejected": {"from": "gpt", "value": "Quito."},
                }
            ],
        )
    },
)
_CSV = OpenAPIMediaType(
    schema=Schema(type=OpenAPIType.STRING, description="CSV with a header row."),
    examples={
        "columns": Example(
            summary="MedicalGPT-style columns",
            value='question,response_chosen,response_rejected\n"Capital of Peru?",Lima.,Quito.\n',
        )
    },
)
UPLOAD = request_body(
    "The dataset file as its publisher ships it, as the raw body or as the first file of a "
    "multipart form: JSONL, a JSON array, CSV with a header row, or Parquet "
    "(`application/vnd.apache.parquet`), any but Parquet optionally gzip-compressed "
    "(`Content-Encoding: gzip`, `application/gzip` or a `.gz` file name). Rows in the layouts "
    'of the README\'s "Dataset formats" are read without a mapping; other column names go '
    "through the `*_field` parameters. By default any invalid row rejects the upload (422, "
    "with line numbers) and stores nothing (`on_invalid=skip` leaves bad rows out and lists "
    "them); past the size limit the answer is 413.",
    content={
        **{t: _JSONL for t in sorted(JSONL_TYPES)},
        "application/json": _JSON_ARRAY,
        "text/csv": _CSV,
        "multipart/form-data": _MULTIPART,
    },
)


def _mapping(**fields: str | None) -> FieldMapping | None:
    """The column mapping the request asks for, or None for detection."""
    if not any(fields.values()):
        return None
    try:
        return FieldMapping(
            prompt_field=fields["prompt_field"] or "prompt",
            chosen_field=fields["chosen_field"] or "chosen",
            rejected_field=fields["rejected_field"] or "rejected",
            system_field=fields["system_field"],
            history_field=fields["history_field"],
            completion_field=fields["completion_field"],
            label_field=fields["label_field"],
            messages_field=fields["messages_field"],
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), [FieldError(loc=["query"], msg=str(exc))]) from None


class DatasetController(Controller):
    path = "/v1/datasets"
    tags = ["datasets"]

    @post(
        operation_id="CreateDataset",
        path="/",
        status_code=201,
        request_max_body_size=None,
        summary="Upload a dataset of preference, sft or unpaired rows (JSONL, JSON, Parquet, CSV)",
        description=(
            "The body is the file: JSONL, a JSON array, Parquet or CSV with a header row, any "
            "but Parquet optionally gzip-compressed (as `Content-Encoding: gzip`, a `.gz` file "
            "or `application/gzip`), or a multipart form whose first file part is the file. The "
            "bytes decide the container; the declared type only tells CSV from JSONL. Rows in "
            'the layouts of the README\'s "Dataset formats" (TRL, Anthropic HH, UltraFeedback, '
            "ShareGPT/LLaMA-Factory, Axolotl, MedicalGPT, OpenAI) are read without a mapping; "
            "other column names need one (`prompt_field`, ...). The rows' kind is detected: "
            "`prompt`/`completion` or chat `messages` rows (OpenAI's chat fine-tuning JSONL) are "
            "sft, rows with a true/false `label` too are unpaired (kto)."
        ),
        responses=responses(INVALID, TOO_LARGE, UNSUPPORTED, TIMEOUT, UNAVAILABLE),
        operation_class=UPLOAD,
    )
    async def create_dataset(
        self,
        request: Request[Any, Any, Any],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        uploads: UploadSpace,
        tenant_limits: TenantLimits,
        name: Annotated[
            str,
            Parameter(
                min_length=1,
                max_length=128,
                pattern=NAME_PATTERN,
                description="Dataset name, for people",
            ),
        ] = "dataset",
        prompt_field: Annotated[str | None, _column("prompt")] = None,
        chosen_field: Annotated[str | None, _column("chosen")] = None,
        rejected_field: Annotated[str | None, _column("rejected")] = None,
        system_field: Annotated[
            str | None,
            Parameter(
                min_length=1,
                max_length=128,
                description="Column whose text becomes each prompt's system message",
            ),
        ] = None,
        history_field: Annotated[
            str | None,
            Parameter(
                min_length=1,
                max_length=128,
                description="Column of earlier turns ([prompt, answer] pairs or messages) "
                "placed before each prompt",
            ),
        ] = None,
        completion_field: Annotated[
            str | None,
            Parameter(
                min_length=1,
                max_length=128,
                description="Column of the completion: the rows are sft (prompt and "
                "completion), or unpaired with label_field",
            ),
        ] = None,
        label_field: Annotated[
            str | None,
            Parameter(
                min_length=1,
                max_length=128,
                description="Column of a true/false label (a good or a bad completion): the "
                "rows are unpaired, for kto",
            ),
        ] = None,
        messages_field: Annotated[
            str | None,
            Parameter(
                min_length=1,
                max_length=128,
                description="Column of a whole chat: sft rows (kto with a label), the last "
                "assistant turn the completion; for sft the earlier answers are trained too "
                "(unless of weight 0)",
            ),
        ] = None,
        on_invalid: Annotated[
            OnInvalid,
            Parameter(
                description="reject: any invalid row rejects the dataset (422); skip: invalid "
                "rows are left out and listed in the dataset, up to max_invalid_fraction",
            ),
        ] = "reject",
        max_invalid_fraction: Annotated[
            float,
            Parameter(
                ge=0.0,
                le=1.0,
                description="With on_invalid=skip, the most rows (a fraction) that may be "
                "invalid before the dataset is rejected anyway",
            ),
        ] = 0.01,
    ) -> Dataset:
        mapping = _mapping(
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            system_field=system_field,
            history_field=history_field,
            completion_field=completion_field,
            label_field=label_field,
            messages_field=messages_field,
        )
        store_as = partial(
            store_dataset,
            store,
            blobs,
            tenant=principal.tenant,
            name=name,
            limits=Limits.from_settings(settings),
            mapping=mapping,
            on_invalid=on_invalid,
            max_invalid_fraction=max_invalid_fraction,
            processes=settings.ingest_processes,
            quota=dataset_quota(tenant_limits),
        )
        upload = receive_upload(request, settings)
        body = Form(upload) if upload.boundary else upload
        size = declared_size(request)
        if upload.hint == "parquet" or settings.ingest_processes > 1:
            async with uploads.slot(principal.tenant, size) as tmp:
                raw, hint = await _spooled(body, tmp)
                return await store_as(raw, hint=hint)
        # Admitted before the body is read (a client that sent `Expect: 100-continue` gets a
        # 503 before it sends), with no room taken: the file is checked as it arrives...
        async with uploads.slot(principal.tenant, 0) as tmp:
            if not (await body.peek(4)).startswith(b"PAR1") and body.hint != "parquet":
                read = partial(store_as, hint=body.hint, in_child=worth_a_child(size))
                return await stream_upload(body, read)
            # ...unless it is Parquet (its media type, its name or its first bytes say so),
            # read from its end.
            await anyio.to_thread.run_sync(uploads.ensure_room, size)
            raw, hint = await _spooled(body, tmp)
            return await store_as(raw, hint=hint)

    @post(
        operation_id="ImportDataset",
        path="/import",
        status_code=201,
        summary="Import a dataset from the Hub or S3, validated like an upload",
        description=(
            "`hf://datasets/ORG/NAME` takes the files of `split` (default train) at `revision` "
            "as `datasets.load_dataset` reads them in the common cases: those of `config` when "
            "the repo's README card declares `configs:`, else the files named for the split "
            '(`train.*`, `train-*`, a `train/` folder; README, "Import by reference"). Add a '
            "folder or a file after the name to take that instead "
            "(`hf://datasets/Anthropic/hh-rlhf/harmless-base`). "
            "`s3://bucket/key` takes one object. The service reads them with its own Hub token "
            "and S3 credentials; its own store is never a source."
        ),
        responses=responses(INVALID, TOO_LARGE, UNSUPPORTED, BAD_GATEWAY, FORBIDDEN, UNAVAILABLE),
    )
    async def import_dataset(
        self,
        data: Annotated[DatasetImport, Body(description="What to import and how to read it.")],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        uploads: UploadSpace,
        tenants: Tenants,
        tenant_limits: TenantLimits,
    ) -> Dataset:
        if data.source.startswith("s3://"):
            check_s3_read(
                tenants, principal.tenant, data.source, settings.store_url, ["body", "source"]
            )
        mapping = _mapping(
            prompt_field=data.prompt_field,
            chosen_field=data.chosen_field,
            rejected_field=data.rejected_field,
            system_field=data.system_field,
            history_field=data.history_field,
            completion_field=data.completion_field,
            label_field=data.label_field,
            messages_field=data.messages_field,
        )
        async with uploads.slot(principal.tenant) as tmp:
            fetched = await anyio.to_thread.run_sync(
                fetch, data, settings, tmp, settings.max_dataset_bytes
            )
            return await store_dataset(
                store,
                blobs,
                fetched.files,
                tenant=principal.tenant,
                name=data.name or fetched.name,
                limits=Limits.from_settings(settings),
                mapping=mapping,
                hint=fetched.hint,
                on_invalid=data.on_invalid,
                max_invalid_fraction=data.max_invalid_fraction,
                processes=settings.ingest_processes,
                quota=dataset_quota(tenant_limits),
            )

    @get(
        operation_id="ListDatasets",
        path="/",
        summary="List datasets, newest first (an admin's: every tenant's)",
        responses=responses(FORBIDDEN),
    )
    async def list_datasets(
        self,
        principal: Principal,
        store: Store,
        limit: PageSize = 20,
        cursor: Cursor = None,
        tenant: TenantParam = None,
    ) -> DatasetList:
        owner = listed_tenant(principal, tenant)
        items, next_cursor = await store.list_datasets(owner, limit=limit, cursor=cursor)
        return DatasetList(items=items, next_cursor=next_cursor)

    @get(
        operation_id="GetDataset",
        path="/{dataset_id:str}",
        responses=responses(NOT_FOUND),
    )
    async def get_dataset(
        self, dataset_id: DatasetId, principal: Principal, store: Store
    ) -> Dataset:
        return await store.get_dataset(dataset_id, scope(principal))

    @get(
        operation_id="GetDatasetRows",
        path="/{dataset_id:str}/rows",
        summary="Normalized rows, as training will see them",
        description=(
            "Check the prompt/chosen/rejected split and the system message before spending GPU "
            "hours. Rows are read from the start of the stored file, so a large offset takes "
            "longer."
        ),
        responses=responses(NOT_FOUND),
    )
    async def get_dataset_rows(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetId,
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        limit: Annotated[int, Parameter(ge=1, le=_PREVIEW_MAX, description="Rows to return")] = 10,
        offset: Annotated[
            int, Parameter(ge=0, description="Rows to skip (0-based index of the first row)")
        ] = 0,
    ) -> DatasetRows:
        ds = await store.get_dataset(dataset_id, scope(principal))
        rows: list[DatasetRow] = []
        if offset < ds.rows:  # past the end there is nothing to read
            readers: dict[str, anyio.CapacityLimiter] = request.app.state.row_readers
            limiter = readers.get(principal.tenant)
            if limiter is None:
                limiter = readers[principal.tenant] = anyio.CapacityLimiter(ROW_READS_PER_TENANT)
            rows = await anyio.to_thread.run_sync(
                _read_rows, blobs, dataset_blob_key(ds.sha256), offset, limit, limiter=limiter
            )
        end = offset + len(rows)
        return DatasetRows(
            dataset_id=ds.id,
            offset=offset,
            rows=rows,
            next_offset=end if end < ds.rows else None,
        )

    @delete(
        operation_id="DeleteDataset",
        path="/{dataset_id:str}",
        status_code=204,
        responses=responses(NOT_FOUND, CONFLICT),
    )
    async def delete_dataset(
        self, dataset_id: DatasetId, principal: Principal, store: Store, blobs: BlobStore
    ) -> None:
        await delete_dataset(store, blobs, dataset_id, scope(principal))


def _read_rows(blobs: BlobStore, key: str, offset: int, limit: int) -> list[DatasetRow]:
    """Rows ``offset`` to ``offset + limit`` of a stored dataset (one normalized row a line)."""
    out: list[DatasetRow] = []
    with blobs.open(key) as f:
        for i, line in enumerate(f):
            if i >= offset:
                out.append(_row_decoder.decode(line))
                if len(out) == limit:
                    break
    return out


async def _spooled(body: Upload | Form, tmp: Path) -> tuple[Path, Container | None]:
    """The body saved in the upload's slot ``tmp``: the file, and the container its media
    type or name suggests."""
    raw = tmp / "upload"
    with raw.open("wb") as out:
        spooled = await spool(body, out)
    return raw, spooled.hint
