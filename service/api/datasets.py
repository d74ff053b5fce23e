"""Dataset upload, import, preview, listing and deletion.

An upload is spooled to a temporary file as it arrives (the size limit enforced on the way),
validated and normalized in a thread, and only then stored: invalid input stores nothing. An
import downloads its source to a temporary file first, then goes the same way.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import anyio.to_thread
import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.openapi.spec import Example, OpenAPIMediaType, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import Body, Parameter, ParameterKwarg
from multipart import MultipartSegment, PushMultipartParser

from service.api.auth import scope
from service.api.errors import (
    FieldError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.api.openapi_docs import (
    BAD_GATEWAY,
    CONFLICT,
    FORBIDDEN,
    INVALID,
    NOT_FOUND,
    TOO_LARGE,
    UNSUPPORTED,
    Cursor,
    PageSize,
    request_body,
    responses,
)
from service.api.tenancy import TenantParam, listed_tenant
from service.blobs import BlobStore, dataset_blob_key
from service.contract import (
    Container,
    Dataset,
    DatasetImport,
    DatasetList,
    DatasetRow,
    DatasetRows,
    FieldMapping,
    OnInvalid,
)
from service.datasets.containers import ACCEPTED_TYPES
from service.datasets.ingest import delete_dataset, store_dataset
from service.datasets.sources import fetch, hint_of
from service.datasets.validate import Limits
from service.settings import Principal, Settings
from service.store import Store
from service.tenants import TenantLimits, Tenants, check_s3_read, dataset_quota

JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/json-lines", "text/plain"}
_HINTS: dict[str, Container | None] = {
    **dict.fromkeys(JSONL_TYPES, "jsonl"),
    "application/json": None,
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "text/csv": "csv",
    "application/gzip": None,
    "application/x-gzip": None,
    "application/octet-stream": None,
}
"""Declared media types and the container each suggests (the bytes decide)."""
DatasetId = Annotated[str, Parameter(description="The dataset's id (`ds_...`).")]


def _column(role: str) -> ParameterKwarg:
    return ParameterKwarg(
        min_length=1,
        max_length=128,
        description=f"The column of your rows that holds the {role}, if it is not `{role}` and "
        "the layout is not one read without a mapping.",
    )


_PREVIEW_MAX = 100
_row_decoder = msgspec.json.Decoder(DatasetRow)


def _unsupported_type(ctype: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"got {ctype or 'no Content-Type'}; send the file as one of {', '.join(ACCEPTED_TYPES)} "
        "(JSONL, a JSON array, Parquet or CSV with a header row, any but Parquet optionally "
        "gzip-compressed)"
    )


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


@dataclass
class Spooled:
    """What an upload held besides its bytes (which went to the spool file)."""

    size: int
    hint: Container | None = None
    """The container the declared type or the file name suggests (the bytes decide)."""
    filename: str | None = None
    """The file part's filename, for a multipart upload that gave one."""
    fields: dict[str, str] = field(default_factory=dict)
    """The multipart form's other (text) fields, e.g. OpenAI's `purpose`."""


MAX_FIELD_BYTES = 4096
"""A multipart text field past this is refused: the only fields expected are short."""


async def spool_upload(request: Request[Any, Any, Any], out: IO[bytes], limit: int) -> Spooled:
    """Copy the uploaded file (the raw body, or the first file of a multipart form) into `out`,
    the size limit checked on the way. Shared by our upload and OpenAI's `POST /v1/files`."""
    ctype, options = request.content_type
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit} bytes")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding} is not supported: send the file gzip-compressed or "
            "as it is"
        )
    if ctype == "multipart/form-data":
        boundary = options.get("boundary")
        if not boundary:
            raise UnsupportedMediaType("multipart/form-data without a boundary")
        spooled = await _spool_multipart(request, out, boundary.encode(), limit)
        spooled.hint = hint_of(spooled.filename or "")
        return spooled
    if ctype not in _HINTS:
        raise _unsupported_type(ctype)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
        out.write(chunk)
    return Spooled(size=size, hint=_HINTS[ctype])


async def _spool_multipart(
    request: Request[Any, Any, Any], out: IO[bytes], boundary: bytes, limit: int
) -> Spooled:
    spooled = Spooled(size=0)
    in_file = done = False
    text: tuple[str, bytearray] | None = None
    with PushMultipartParser(boundary) as parser:
        async for chunk in request.stream():
            for part in parser.parse(chunk):
                if isinstance(part, MultipartSegment):
                    in_file = part.filename is not None and not done
                    if in_file:
                        spooled.filename = part.filename
                    elif part.filename is None and part.name:
                        text = (part.name, bytearray())
                elif part and in_file:
                    spooled.size += len(part)
                    if spooled.size > limit:
                        raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
                    out.write(part)
                elif part and text is not None:
                    text[1].extend(part)
                    if len(text[1]) > MAX_FIELD_BYTES:
                        raise PayloadTooLarge(
                            f"form field {text[0]!r} is over {MAX_FIELD_BYTES} bytes"
                        )
                elif not part:
                    if in_file:
                        in_file, done = False, True
                    elif text is not None:
                        spooled.fields[text[0]] = text[1].decode(errors="replace")
                        text = None
        if not done:
            raise UnsupportedMediaType("the multipart form has no file part")
    return spooled


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
        summary="Upload a preference dataset (JSONL, JSON, Parquet or CSV; gzip allowed)",
        description=(
            "The body is the file: JSONL, a JSON array, Parquet or CSV with a header row, any "
            "but Parquet optionally gzip-compressed (as `Content-Encoding: gzip`, a `.gz` file "
            "or `application/gzip`), or a multipart form whose first file part is the file. The "
            "bytes decide the container; the declared type only tells CSV from JSONL. Rows in "
            'the layouts of the README\'s "Dataset formats" (TRL, Anthropic HH, UltraFeedback, '
            "ShareGPT/LLaMA-Factory, Axolotl, MedicalGPT, OpenAI) are read without a mapping; "
            "other column names need one (`prompt_field`, ...)."
        ),
        responses=responses(INVALID, TOO_LARGE, UNSUPPORTED),
        operation_class=UPLOAD,
    )
    async def create_dataset(
        self,
        request: Request[Any, Any, Any],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        tenant_limits: TenantLimits,
        name: Annotated[
            str,
            Parameter(
                min_length=1,
                max_length=128,
                pattern=r"^[\w .,:()+-]+$",
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
        )
        with tempfile.TemporaryDirectory(prefix="ftune-upload-") as tmp:
            raw = Path(tmp) / "upload"
            with raw.open("wb") as out:
                spooled = await spool_upload(request, out, settings.max_dataset_bytes)
            return await store_dataset(
                store,
                blobs,
                raw,
                tenant=principal.tenant,
                name=name,
                limits=Limits.from_settings(settings),
                mapping=mapping,
                hint=spooled.hint,
                on_invalid=on_invalid,
                max_invalid_fraction=max_invalid_fraction,
                processes=settings.ingest_processes,
                quota=dataset_quota(tenant_limits),
            )

    @post(
        operation_id="ImportDataset",
        path="/import",
        status_code=201,
        summary="Import a dataset from the Hub or S3, validated like an upload",
        description=(
            "`hf://datasets/ORG/NAME` takes the files of `split` (default train: files named "
            "`train.*` or `train-*`, or in a `train/` folder) at `revision`; add a folder or a "
            "file after the name to narrow it (`hf://datasets/Anthropic/hh-rlhf/harmless-base`). "
            "`s3://bucket/key` takes one object. The service reads them with its own Hub token "
            "and S3 credentials; its own store is never a source."
        ),
        responses=responses(INVALID, TOO_LARGE, UNSUPPORTED, BAD_GATEWAY, FORBIDDEN),
    )
    async def import_dataset(
        self,
        data: Annotated[DatasetImport, Body(description="What to import and how to read it.")],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
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
        )
        with tempfile.TemporaryDirectory(prefix="ftune-import-") as tmp:
            fetched = await anyio.to_thread.run_sync(
                fetch, data, settings, Path(tmp), settings.max_dataset_bytes
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
        rows = await anyio.to_thread.run_sync(
            _read_rows, blobs, dataset_blob_key(ds.sha256), offset, limit
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
