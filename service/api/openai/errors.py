"""Errors on the OpenAI-compatible paths, in OpenAI's envelope.

The app's one error handler (:func:`by_path`) answers every error under `/v1/files`,
`/v1/fine_tuning/` and OpenAI's other resources (`/v1/models`, `/v1/uploads`, ...) so,
whatever raised it: a route, the auth or rate-limit middleware, or no
route at all (a path or method this service does not have, which OpenAI's SDK would otherwise
show as an empty message).

The status comes from the one error mapper (`service.api.errors.handle`), then the Problem
Details become `{"error": {"message", "type", "param", "code"}}` with the statuses the SDK
maps to its exception classes: a bad request (our 413, 415 and 422 too) is 400
(`BadRequestError`), then 401, 404, 409 and 429 as they are. Every 4xx carries
`x-should-retry: false`: the SDK would otherwise retry a 409 or 429 that retrying cannot fix
(but a request rate, which frees up by itself: the SDK retries after `Retry-After`).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec

from service.api import errors
from service.api.errors import InvalidRequest
from service.contract.openai import OpenAIError, OpenAIErrorResponse
from service.openai.hyperparameters import SpecError
from service.openai.jobs import openai_param
from service.store import LimitReached

_AS_BAD_REQUEST = {413, 415, 422}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
_SOURCES = {"body", "query", "path", "header", "cookie"}


_LACKED = {
    "/v1/uploads": "upload a fine-tuning file in one request with files.create (up to the "
    "dataset size limit); there are no multi-part uploads",
    "/v1/models": "there is no model list: name the base model in fine_tuning.jobs.create (a "
    "Hub id, s3://... or file://...), and a job's fine_tuned_model says where its model went",
    "/v1/chat/": "this service fine-tunes but does not serve models: load the fine_tuned_model "
    "in your inference server",
    "/v1/completions": "this service fine-tunes but does not serve models",
    "/v1/responses": "this service fine-tunes but does not serve models",
    "/v1/embeddings": "this service fine-tunes but does not serve models",
    "/v1/batches": "there are no batches here",
    "/v1/fine_tuning/checkpoints": "checkpoints are not shared across organizations here: list "
    "a job's with fine_tuning.jobs.checkpoints.list; they are stored where its output goes",
    "/v1/fine_tuning/alpha": "there are no graders here: a job is evaluated on its "
    "validation_file (held-out preference pairs) at each eval step",
}
"""OpenAI's other resources, which an SDK pointed here may call: answered in its envelope,
saying what to do instead (the SDK shows a bare 404 otherwise)."""
OPENAI_PATHS = ("/v1/files", "/v1/fine_tuning/", *_LACKED)


def by_path(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """OpenAI's envelope under OpenAI's paths, Problem Details elsewhere."""
    if request.scope["path"].startswith(OPENAI_PATHS):
        return handle(request, exc)
    return errors.handle(request, exc)


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[OpenAIErrorResponse]:
    headers: dict[str, str] = {}
    if isinstance(exc, SpecError):
        status, message, param = 400, exc.message, exc.param
    else:
        answer = errors.handle(request, exc)
        problem = answer.content
        status = 400 if problem.status in _AS_BAD_REQUEST else problem.status
        message, param = problem.detail, None
        headers.update(answer.headers)
        first = problem.errors[0] if problem.errors else None
        loc = [p for p in (first.loc or []) if p not in _SOURCES] if first else []
        if isinstance(exc, InvalidRequest):
            param = openai_param(loc)  # raised with our JobSpec's field names
        elif isinstance(exc, ValidationException) and loc:
            param = ".".join(loc)
    path = request.scope["path"]
    if status in (404, 405):
        lacked = next((why for prefix, why in _LACKED.items() if path.startswith(prefix)), None)
        if lacked is not None:
            status, message = 404, f"{path} is not part of this service's OpenAI API: {lacked}"
    if 400 <= status < 500 and not _passes(exc):
        headers["x-should-retry"] = "false"
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = OpenAIErrorResponse(
        error=OpenAIError(message=message, type=kind, param=param, code=_CODES.get(status))
    )
    return Response(body, status_code=status, headers=headers)


def _passes(exc: Exception) -> bool:
    """A request rate (not a quota) frees up by itself: the SDK may retry after Retry-After."""
    return isinstance(exc, LimitReached) and exc.window is not None


_DESCRIPTIONS = {
    400: "Invalid request (BadRequestError); `param` names the field",
    401: "Missing or unknown API key (AuthenticationError)",
    404: "No such object for this tenant (NotFoundError)",
    409: "Not allowed in the object's current state (ConflictError)",
    403: "The tenant was not granted a token, namespace or S3 prefix (PermissionDeniedError)",
    429: "The tenant is at one of its limits (RateLimitError); `Retry-After` says when to "
    "try again",
    503: "This server is taking its limit of uploads, or short of temp space "
    "(InternalServerError; the SDK retries it after `Retry-After`)",
}


def responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAI-envelope error responses for `codes`, plus 400 and 401 that every route can
    answer."""
    return {
        code: ResponseSpec(
            data_container=OpenAIErrorResponse,
            description=_DESCRIPTIONS[code],
            generate_examples=False,
        )
        for code in sorted({400, 401, 403, 429, *codes})
    }
