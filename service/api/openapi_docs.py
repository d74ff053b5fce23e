"""The error responses each route documents, so clients and schemathesis know their shape."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from service.api.errors import PROBLEM, Problem

BAD_REQUEST = 400
UNAUTHORIZED = 401
NOT_FOUND = 404
CONFLICT = 409
TOO_LARGE = 413
UNSUPPORTED = 415
INVALID = 422
BAD_GATEWAY = 502

_DESCRIPTIONS = {
    BAD_REQUEST: "Malformed query or path parameter",
    UNAUTHORIZED: "Missing or unknown API key",
    NOT_FOUND: "No such record for this tenant",
    CONFLICT: "Not allowed in the record's current state",
    TOO_LARGE: "Upload over the configured size limit (compressed or decompressed)",
    UNSUPPORTED: (
        "Not a file rows can be read from: `detail` says what was found and how to convert it; "
        "the `Accept-Post` header lists the accepted media types"
    ),
    INVALID: "Invalid body or rows; `errors` says where",
    BAD_GATEWAY: "The Hub or S3 did not answer as expected",
}


def responses(*codes: int) -> dict[int, ResponseSpec]:
    """Problem Details responses for `codes`, plus 400 and 401 that every route can answer."""
    return {
        code: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS[code],
            media_type=PROBLEM,
            generate_examples=False,
        )
        for code in sorted({BAD_REQUEST, UNAUTHORIZED, INVALID, *codes})
    }
