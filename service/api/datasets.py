"""Dataset upload, listing and deletion.

An upload is spooled to a temporary file as it arrives (the size limit enforced on the way),
validated and normalized in a thread, and only then stored: invalid input stores nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.openapi.spec import Example, OpenAPIMediaType, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import Parameter, ParameterKwarg
from multipart import MultipartSegment, PushMultipartParser

from service.api.auth import scope
from service.api.errors import (
    FieldError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.api.openapi_docs import (
    CONFLICT,
    INVALID,
    NOT_FOUND,
    TOO_LARGE,
    UNSUPPORTED,
    Cursor,
    PageSize,
    request_body,
    responses,
)
from service.blobs import BlobStore
from service.contract import Dataset, DatasetList, FieldMapping
from service.datasets.ingest import delete_dataset, store_dataset
from service.datasets.validate import Limits
from service.settings import Principal, Settings
from service.store import Store

JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/json-lines", "text/plain"}
DatasetId = Annotated[str, Parameter(description="The dataset's id (`ds_...`).")]


def _column(role: str) -> ParameterKwarg:
    return ParameterKwarg(
        min_length=1,
        max_length=128,
        description=f"The column of your rows that holds the {role}, if it is not `{role}`.",
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
                description="The JSONL file. The first part with a filename is read, whatever "
                "its name; other parts are ignored.",
            )
        },
        required=["file"],
    ),
    examples={
        k: Example(summary=summary, value={"file": rows}) for k, (summary, rows) in _ROWS.items()
    },
)
UPLOAD = request_body(
    "Preference rows as JSONL, as the raw body or as a file in a multipart form. Accepted "
    "rows: standard (`prompt`, `chosen`, `rejected` strings), conversational (lists of "
    "{role, content} messages), OpenAI's DPO format, or TRL's implicit prompt (chosen and "
    "rejected sharing the prompt as a prefix); other column names through the `*_field` "
    "parameters. One dataset holds one format. Any invalid row rejects the upload (422, "
    "with line numbers) and stores nothing; past the size limit the answer is 413.",
    content={**{t: _JSONL for t in sorted(JSONL_TYPES)}, "multipart/form-data": _MULTIPART},
)


@dataclass
class Spooled:
    """What an upload held besides its bytes (which went to the spool file)."""

    size: int
    filename: str | None = None
    """The file part's filename, for a multipart upload that gave one."""
    fields: dict[str, str] = field(default_factory=dict)
    """The multipart form's other (text) fields, e.g. OpenAI's `purpose`."""


MAX_FIELD_BYTES = 4096
"""A multipart text field past this is refused: the only fields expected are short."""


async def spool_upload(request: Request[Any, Any, Any], out: IO[bytes], limit: int) -> Spooled:
    """Copy the JSONL body (raw, or the first file of a multipart form) into `out`."""
    ctype, options = request.content_type
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit} bytes")
    if ctype == "multipart/form-data":
        boundary = options.get("boundary")
        if not boundary:
            raise UnsupportedMediaType("multipart/form-data without a boundary")
        return await _spool_multipart(request, out, boundary.encode(), limit)
    if ctype not in JSONL_TYPES:
        raise UnsupportedMediaType(
            f"send JSONL as application/x-ndjson or application/jsonl, or a multipart file; "
            f"got {ctype or 'no Content-Type'}"
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
        out.write(chunk)
    return Spooled(size=size)


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


class DatasetController(Controller):
    path = "/v1/datasets"
    tags = ["datasets"]

    @post(
        operation_id="CreateDataset",
        path="/",
        status_code=201,
        request_max_body_size=None,
        summary="Upload a JSONL preference dataset",
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
        name: Annotated[
            str,
            Parameter(
                min_length=1,
                max_length=128,
                pattern=r"^[\w .,:()+-]+$",
                description="A name for your own reference; need not be unique.",
            ),
        ] = "dataset",
        prompt_field: Annotated[str | None, _column("prompt")] = None,
        chosen_field: Annotated[str | None, _column("chosen")] = None,
        rejected_field: Annotated[str | None, _column("rejected")] = None,
    ) -> Dataset:
        mapping = None
        if prompt_field or chosen_field or rejected_field:
            try:
                mapping = FieldMapping(
                    prompt_field=prompt_field or "prompt",
                    chosen_field=chosen_field or "chosen",
                    rejected_field=rejected_field or "rejected",
                )
            except ValueError as exc:
                raise InvalidRequest(str(exc), [FieldError(loc=["query"], msg=str(exc))]) from None
        limits = Limits(max_line_bytes=settings.max_line_bytes, max_rows=settings.max_dataset_rows)
        with tempfile.TemporaryDirectory(prefix="ftune-upload-") as tmp:
            raw = Path(tmp) / "raw.jsonl"
            with raw.open("wb") as out:
                await spool_upload(request, out, settings.max_dataset_bytes)
            return await store_dataset(
                store,
                blobs,
                raw,
                tenant=principal.tenant,
                name=name,
                limits=limits,
                mapping=mapping,
            )

    @get(
        operation_id="ListDatasets",
        path="/",
        summary="List datasets, newest first",
        responses=responses(),
    )
    async def list_datasets(
        self,
        principal: Principal,
        store: Store,
        limit: PageSize = 20,
        cursor: Cursor = None,
    ) -> DatasetList:
        items, next_cursor = await store.list_datasets(scope(principal), limit=limit, cursor=cursor)
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
