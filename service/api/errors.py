"""One place that turns every error into RFC 9457 Problem Details."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    SerializationException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api.request_id import request_id
from service.contract import (
    LABEL_KEY_RE,
    MAX_REQUEST_BYTES,
    NAME_PATTERN,
    REPO_ID_RE,
    STREAM_NAME,
    Container,
    numbered_as,
)
from service.contract.datasets import SOURCE_PATTERN
from service.datasets.containers import ACCEPTED_TYPES, DatasetTooLarge, UnsupportedFile
from service.datasets.sources import SourceError
from service.datasets.space import SpaceBusy
from service.datasets.validate import InvalidDataset
from service.store import Conflict, LimitReached, NotFound
from service.tenants import TENANT_NAME_RE, GrantMissing

log = logging.getLogger("ftune.api")

PROBLEM = "application/problem+json"
REDIS_RETRY_AFTER_SECONDS = 5
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class FieldError(msgspec.Struct, omit_defaults=True):
    """One thing wrong with the request: where (loc, or line and field of a dataset) and what."""

    msg: Annotated[str, msgspec.Meta(description="What is wrong, in words.")]
    loc: Annotated[
        list[str] | None,
        msgspec.Meta(
            description="Where: `body`, `query`, `path` or `header`, then the field's path, e.g. "
            '`["body", "hyperparameters", "beta"]`.'
        ),
    ] = None
    line: Annotated[
        int | None,
        msgspec.Meta(
            description="For a dataset: the bad row's 1-based line of a JSONL file, else its "
            "row of the JSON array, Parquet or CSV file (the problem's `container` says which)."
        ),
    ] = None
    field: Annotated[
        str | None, msgspec.Meta(description="For a dataset row or feedback event: its field.")
    ] = None


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 Problem Details."""

    type: Annotated[
        str, msgspec.Meta(description="A URI naming the kind of problem, one per status.")
    ]
    title: Annotated[str, msgspec.Meta(description="The status in words, e.g. `Not Found`.")]
    status: Annotated[int, msgspec.Meta(description="The HTTP status code.")]
    detail: Annotated[str, msgspec.Meta(description="What went wrong with this request.")]
    errors: Annotated[
        list[FieldError] | None,
        msgspec.Meta(description="Each problem found, at most 100; absent when not about fields."),
    ] = None
    total_errors: Annotated[
        int | None,
        msgspec.Meta(
            description="How many problems a dataset had in all (errors lists the first)."
        ),
    ] = None
    container: Annotated[
        Container | None,
        msgspec.Meta(
            description="For a dataset: how its rows were packed, which says what the errors' "
            "`line` counts (lines of `jsonl`, else rows)."
        ),
    ] = None


class InvalidRequest(Exception):
    """A request that parsed but makes no sense (e.g. a dataset id that does not exist)."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


class BadRequest(Exception):
    """A request that cannot be read at all (a malformed multipart body or header): 400."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


class UploadTimeout(Exception):
    """The body came too slowly (see ``service.api.spool.paced``): 408."""


class PayloadTooLarge(Exception):
    pass


class UnsupportedMediaType(Exception):
    pass


def problem(
    status: int,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    total: int | None = None,
    container: Container | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    title = _TITLES.get(status, "Error")
    slug = title.lower().replace(" ", "-")
    body = Problem(
        type=f"https://ftune.dev/problems/{slug}",
        title=title,
        status=status,
        detail=detail,
        errors=errors,
        total_errors=total,
        container=container,
    )
    return Response(body, status_code=status, media_type=PROBLEM, headers=headers)


def limit_headers(exc: LimitReached) -> dict[str, str]:
    """`Retry-After` and the IETF draft's `RateLimit-Policy` / `RateLimit` (structured fields:
    the policy's quota `q` and window `w`; what `r` remains, and `t` seconds until it
    resets) for a refusal at `exc.limit`."""
    window = f";w={exc.window}" if exc.window is not None else ""
    return {
        "Retry-After": str(exc.retry_after),
        "RateLimit-Policy": f'"{exc.limit}";q={exc.quota}{window}',
        "RateLimit": f'"{exc.limit}";r=0;t={exc.retry_after}',
    }


_AT = re.compile(r"\s*-\s*at `\$(?P<path>[^`]*)`$")


_NAMED = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<field>[^`]+)`")
"""A field unknown or missing is where the error is, not the object that holds it."""
_PATTERN_WORDS = {
    NAME_PATTERN: "a name of letters, digits, spaces and . , : ( ) + - _",
    STREAM_NAME: "a name of letters, digits, '.', '_' and '-' that starts with a letter or "
    "digit (at most 63)",
    SOURCE_PATTERN: "hf://datasets/ORG/NAME (then a folder or file in it, if wanted) or "
    "s3://BUCKET/KEY",
    REPO_ID_RE: "a Hub repository, org/name",
    LABEL_KEY_RE: "lowercase letters, digits, '.', '_' and '-' that start and end with a letter "
    "or digit (at most 63)",
    TENANT_NAME_RE: "a tenant name (no ':' and no white space)",
}
"""The patterns users meet most, in words: an error says what is wanted, not the regex."""
_REGEX = re.compile(r"^Expected `str` matching regex (?P<pattern>'.*')$")


def _in_words(message: str) -> str:
    match = _REGEX.match(message)
    if match is None:
        return message
    for pattern, words in _PATTERN_WORDS.items():
        if match.group("pattern") == repr(pattern):
            return f"expected {words}"
    return message


def _path(path: str) -> list[str]:
    """msgspec's `a.b[0]` as its parts; a mapping's value, `[...]` (no key), ends at the map."""
    return [p for p in re.split(r"[.\[\]]", path) if p]


def _validation(exc: ValidationException) -> Response[Problem]:
    errors: list[FieldError] = []
    in_body = False
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", ""))
        raw = item.get("source", "body")
        source = str(getattr(raw, "value", raw))  # Litestar gives a ParamType enum for parameters
        in_body = in_body or source == "body"
        loc = [source]
        if match := _AT.search(message):
            message = message[: match.start()]
            loc += _path(match.group("path"))
        elif item.get("key") and not (source == "body" and item["key"] == "data"):
            loc += _path(str(item["key"]))  # a parameter's name ("data" is the body's own)
        if named := _NAMED.match(message):
            loc.append(named.group("field"))
        errors.append(FieldError(msg=_in_words(message), loc=loc))
    if not errors:
        errors.append(FieldError(msg=str(exc.detail), loc=["body"]))
        in_body = True
    detail = "; ".join(f"{'.'.join(e.loc or [])}: {e.msg}" for e in errors[:3])
    return problem(422 if in_body else 400, detail, errors=errors)


def _invalid_dataset(exc: InvalidDataset) -> Response[Problem]:
    """422 whose detail names the first fault the way the ``errors`` entries do."""
    errors = [FieldError(line=e.line, field=e.field, msg=e.msg) for e in exc.errors]
    head = exc.reason or (f"the dataset has {exc.total} invalid row{'s' if exc.total != 1 else ''}")
    first = exc.errors[0] if exc.errors else None
    where = ""
    if first is not None and first.msg != exc.reason:  # not the fault the reason names
        at = f"{numbered_as(exc.container)} {first.line}" if first.line else "the file"
        where = f" (first: {at}" + (f", {first.field}" if first.field else "") + f": {first.msg})"
    return problem(422, head + where, errors=errors, total=exc.total, container=exc.container)


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    if isinstance(exc, NotFound):
        return problem(404, str(exc) or f"{request.url.path} was not found")
    if isinstance(exc, Conflict):
        return problem(409, str(exc))
    if isinstance(exc, LimitReached):
        return problem(429, str(exc), headers=limit_headers(exc))
    if isinstance(exc, GrantMissing):
        return problem(exc.status, exc.detail, errors=[FieldError(loc=exc.loc, msg=exc.detail)])
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        # Redis down, restarting or out of connections: the client should retry, not report.
        log.warning(
            "Redis unavailable on %s %s (%s): %s",
            request.method,
            request.url.path,
            request_id(request),
            exc,
        )
        return problem(
            503,
            "the service's database is unreachable for the moment; retry shortly",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, InvalidDataset):
        return _invalid_dataset(exc)
    if isinstance(exc, InvalidRequest):
        return problem(422, exc.detail, errors=exc.errors)
    if isinstance(exc, BadRequest):
        return problem(400, str(exc), errors=exc.errors)
    if isinstance(exc, SpaceBusy):
        return problem(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, UploadTimeout):
        return problem(408, str(exc), headers={"Connection": "close"})
    if isinstance(exc, UnicodeDecodeError):  # Litestar decodes a JSON body as UTF-8 first
        return problem(400, f"the request body is not UTF-8 text: {exc.reason} at byte {exc.start}")
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):
        # msgspec's depth limit on a request body: Litestar lets it through undecorated.
        return problem(400, "the JSON body is nested too deeply to be read")
    if isinstance(exc, PayloadTooLarge | DatasetTooLarge):
        return problem(413, str(exc))
    if isinstance(exc, UnsupportedMediaType | UnsupportedFile):
        return problem(415, str(exc), headers={"Accept-Post": ", ".join(ACCEPTED_TYPES)})
    if isinstance(exc, SourceError):
        return problem(
            exc.status, exc.msg, errors=[FieldError(msg=exc.msg, loc=["body", exc.field])]
        )
    if isinstance(exc, ValidationException):
        return _validation(exc)
    if isinstance(exc, RequestEntityTooLarge):  # Litestar's own, past the app's body limit
        return problem(
            413,
            f"the request body is larger than {MAX_REQUEST_BYTES:,} bytes, the most a JSON "
            "request may be: send feedback in smaller batches; datasets go up with POST "
            "/v1/datasets, which streams files up to the dataset limit",
        )
    if isinstance(exc, ClientException) and isinstance(exc.__cause__, SerializationException):
        why = str(exc.detail).removeprefix("JSON is malformed: ")
        msg = f"the request body is not valid JSON: {why[:1].lower()}{why[1:]}"
        return problem(400, msg, errors=[FieldError(msg=msg, loc=["body"])])
    if isinstance(exc, NotAuthorizedException):
        return problem(401, str(exc.detail), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, str(exc.detail), headers=exc.headers)
    rid = request_id(request)
    log.exception("unhandled error on %s %s (%s)", request.method, request.url.path, rid)
    return problem(
        HTTP_500_INTERNAL_SERVER_ERROR, f"internal error; it has been logged as request {rid}"
    )
