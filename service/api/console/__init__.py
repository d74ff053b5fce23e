"""The web console at `/ui`: a static bundle the API serves itself (same process, same auth).

The pages are plain ES modules (no build step) that call `/v1` with the key the user typed,
kept in the tab's `sessionStorage` and sent as a Bearer header: the server only hands out
files, so no key ever reaches a URL, a cookie or this module.

Vendored unchanged with their licences, so the console works air-gapped and needs no build:
`static/vendor/uplot` is uPlot 1.6.32 (`npm pack uplot@1.6.32`: dist/uPlot.esm.js,
dist/uPlot.min.css, LICENSE) for the charts; `static/vendor/eventsource-parser` is
eventsource-parser 4.1.3 (dist/index.js, parse.js, errors.js, LICENSE) for the event stream,
which the console reads with fetch() because EventSource cannot send an Authorization header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Request, Response, Router
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotFoundException
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"
PATH = "/ui"

# Own files only, no inline script or style element, nothing framed, no referrer: a console
# that holds an admin key must not run or leak anything it did not ship.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


MAX_NAME_BYTES = 255
"""The longest file name the file system holds: a longer one is no file of ours."""


def _known_name(request: Request[Any, Any, Any]) -> None:
    """404 for a name no file can have (the file system's ENAMETOOLONG was a 500)."""
    if any(len(part.encode()) > MAX_NAME_BYTES for part in request.url.path.split("/")):
        raise NotFoundException()


async def _secure(response: Response[object]) -> Response[object]:
    response.headers.update(HEADERS)
    return response


def console_router() -> Router:
    """`/ui/` serves `index.html`; the pages route by the URL's fragment (`#/jobs/job_...`).

    Revalidated on every load (`no-cache`, ETags), so an upgrade never mixes old and new modules.
    """
    return create_static_files_router(
        path=PATH,
        directories=[STATIC],
        html_mode=True,
        name="console",
        before_request=_known_name,
        after_request=_secure,
        cache_control=CacheControlHeader(no_cache=True),
        include_in_schema=False,
    )
