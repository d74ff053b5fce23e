"""Receiving an uploaded file: the raw body or the first file of a multipart form, within the
size limit and at a minimum pace, to be spooled to a file as it arrives (here) or handed to a
thread that checks it meanwhile (:mod:`service.api.body_stream`). Shared by our upload and
OpenAI's `POST /v1/files`.

A body must keep coming: after a grace period, at an average rate of at least
``upload_min_bytes_per_second``, or the upload is cut off with 408 (a client trickling a few
bytes a second would otherwise hold a slot of the upload space for ever)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import anyio
from litestar import Request
from multipart import MultipartError, MultipartSegment, PushMultipartParser

from service.api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, UploadTimeout
from service.contract import Container
from service.datasets.containers import ACCEPTED_TYPES
from service.datasets.sources import hint_of
from service.settings import Settings

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


def _unsupported_type(ctype: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"got {ctype or 'no Content-Type'}; send the file as one of {', '.join(ACCEPTED_TYPES)} "
        "(JSONL, a JSON array, Parquet or CSV with a header row, any but Parquet optionally "
        "gzip-compressed)"
    )


def declared_size(request: Request[Any, Any, Any]) -> int | None:
    """The body's Content-Length, if it gave one."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


@dataclass
class Spooled:
    """What a spooled upload held besides its bytes (which went to the spool file)."""

    size: int
    hint: Container | None = None
    """The container the declared type or the file name suggests (the bytes decide)."""
    filename: str | None = None
    """The file part's filename, for a multipart upload that gave one."""
    fields: dict[str, str] = field(default_factory=dict)
    """The multipart form's other (text) fields, e.g. OpenAI's `purpose`."""


MAX_FIELD_BYTES = 4096
"""A multipart text field past this is refused: the only fields expected are short."""
MAX_FORM_PARTS = 16
"""Parts of a multipart form read before it is refused (one file and a few short fields)."""
MAX_FORM_OVERHEAD = 64 * 1024
"""What a multipart form may add to the size limit: boundaries, part headers, text fields."""


class Upload:
    """An upload's body once its headers passed: its chunks as they arrive, the pace enforced
    and, for a raw body, the size limit; ``peek`` looks at its first bytes without taking them."""

    def __init__(
        self, chunks: AsyncIterator[bytes], limit: int, hint: Container | None, boundary: bytes
    ) -> None:
        self.chunks = chunks
        self.limit = limit
        self.hint = hint
        self.boundary = boundary
        """A multipart form's boundary; empty for a raw body."""
        self.head = b""
        self.size = 0
        """The bytes of it taken so far."""

    async def peek(self, n: int) -> bytes:
        """The body's first ``n`` bytes (fewer if it is shorter), still to be read."""
        while len(self.head) < n and (chunk := await anext(self.chunks, b"")):
            self.head += chunk
        return self.head[:n]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            head, self.head = self.head, b""
            self.size += len(head)
            yield head
        async for chunk in self.chunks:
            self.size += len(chunk)
            yield chunk


def receive_upload(request: Request[Any, Any, Any], settings: Settings) -> Upload:
    """The uploaded file's body (the raw body, or a multipart form holding it), once the
    declared size, encoding and media type pass. Shared by our upload and OpenAI's
    `POST /v1/files`."""
    limit = settings.max_dataset_bytes
    chunks = paced(
        request.stream(),
        min_rate=settings.upload_min_bytes_per_second,
        grace=settings.upload_grace_seconds,
    )
    ctype, options = request.content_type
    declared = declared_size(request)
    allowed = limit + (MAX_FORM_OVERHEAD if ctype == "multipart/form-data" else 0)
    if declared is not None and declared > allowed:
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
        return Upload(chunks, limit, None, boundary.encode())
    if ctype not in _HINTS:
        raise _unsupported_type(ctype)
    return Upload(_within(chunks, limit), limit, _HINTS[ctype], b"")


async def _within(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
        yield chunk


async def spool(body: Upload | Form, out: IO[bytes]) -> Spooled:
    """Copy the body's file into ``out``."""
    async for chunk in body:
        out.write(chunk)
    if isinstance(body, Form):
        return Spooled(size=body.size, hint=body.hint, filename=body.filename, fields=body.fields)
    return Spooled(size=body.size, hint=body.hint)


class Form:
    """A multipart form's first file, read as the form arrives: its bytes (iterate), with
    :meth:`peek` and ``hint`` as a raw :class:`Upload` has them. Once ``peek`` returned,
    ``filename`` is known and ``fields`` holds the text fields before the file; once the
    file's bytes were all taken, the form was read to its closing boundary (a form cut short
    raises, so a cut-off file is never taken for a shorter one) and ``fields`` holds those
    after it too. The whole form may be at most ``MAX_FORM_OVERHEAD`` bytes over the limit;
    one that is not well-formed multipart is a 400."""

    def __init__(self, body: Upload) -> None:
        self.limit = body.limit
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.hint: Container | None = None
        self.size = 0
        """The file's bytes taken so far."""
        self._parts = self._parse(aiter(body), body.boundary)
        self._head = b""
        self._started = False

    async def peek(self, n: int) -> bytes:
        """The file's first ``n`` bytes (fewer if it is shorter), still to be read; the form
        is read up to them."""
        if not self._started:
            self._started = True
            await anext(self._parts)  # the file part's start
        while len(self._head) < n and (chunk := await anext(self._parts, b"")):
            self._head += chunk
        return self._head[:n]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await self.peek(0)
        if self._head:
            head, self._head = self._head, b""
            yield head
        async for chunk in self._parts:
            yield chunk

    async def _parse(self, body: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[bytes]:
        """The file's bytes, after an empty chunk when its part starts."""
        limit = self.limit
        received = 0
        in_file = done = False
        text: tuple[str, bytearray] | None = None
        try:
            with PushMultipartParser(boundary, max_segment_count=MAX_FORM_PARTS) as parser:
                async for chunk in body:
                    received += len(chunk)
                    if received > limit + MAX_FORM_OVERHEAD:
                        raise PayloadTooLarge(
                            f"the form is over the limit of {limit} bytes (plus "
                            f"{MAX_FORM_OVERHEAD} for its other fields)"
                        )
                    for part in parser.parse(chunk):
                        if isinstance(part, MultipartSegment):
                            in_file = part.filename is not None and not done
                            if in_file:
                                self.filename = part.filename
                                self.hint = hint_of(part.filename or "")
                                yield b""
                            elif part.filename is None and part.name:
                                text = (part.name, bytearray())
                        elif part and in_file:
                            self.size += len(part)
                            if self.size > limit:
                                raise PayloadTooLarge(
                                    f"the upload is over the limit of {limit} bytes"
                                )
                            yield part
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
                                self.fields[text[0]] = text[1].decode(errors="replace")
                                text = None
        except MultipartError as exc:
            raise BadRequest(f"the multipart/form-data body is malformed: {exc}") from None
        if not done:
            raise UnsupportedMediaType("the multipart form has no file part")


async def paced(
    chunks: AsyncIterator[bytes], *, min_rate: float, grace: float
) -> AsyncIterator[bytes]:
    """``chunks`` as long as they keep coming: by any moment, ``grace`` seconds plus one per
    ``min_rate`` bytes received so far; UploadTimeout when the body falls behind. Only the
    time spent waiting for the client counts: while the server holds the body back (its
    reader behind, a slow store), the client is not the one that is late."""
    waited = 0.0
    received = 0
    while True:
        allowed = grace + received / min_rate - waited
        asked = time.monotonic()
        try:
            with anyio.fail_after(max(allowed, 0)):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadTimeout(
                f"the upload came too slowly: {received} bytes in "
                f"{waited + time.monotonic() - asked:.0f} s; after {grace:g} s a body must "
                f"arrive at {min_rate:g} bytes a second or more"
            ) from None
        waited += time.monotonic() - asked
        received += len(chunk)
        yield chunk
