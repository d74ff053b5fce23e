"""Request counts and latencies per route template, under the names and labels the chart's
dashboard reads (`ftune_requests_total`, `ftune_request_duration_seconds`, ...).

Litestar's Prometheus middleware measured the same for about a quarter of a
`GET /v1/jobs/{id}`'s CPU (a Request object, a label dict and three `labels()` look-ups on
every request; measured in-process, 100-130 us of 430): here a route's label children are
looked up once and kept. Its exclusion list was also a pattern searched anywhere in the path,
so `/metrics` left out every job's `.../metrics` route too; only the scrape and the probes are
left out here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

APP_NAME = "ftune"
UNCOUNTED = frozenset({"/metrics", "/healthz", "/readyz"})
"""Paths whose requests are not measured: the scrape itself and the probes."""
STREAMS = frozenset({"/v1/jobs/{job_id}/events"})
"""Routes counted but not timed: an event stream lasts as long as its client follows the job
(up to an hour), which is no request's latency; timed, it made the dashboard's p90 the streams'
lifetime."""
LABELS = ("method", "path", "status_code", "app_name")

REQUESTS = Counter("ftune_requests_total", "Total requests", LABELS)
ERRORS = Counter("ftune_requests_error_total", "Total errors in requests", LABELS)
DURATION = Histogram("ftune_request_duration_seconds", "Request duration, in seconds", LABELS)
IN_PROGRESS = Gauge(
    "ftune_requests_in_progress",
    "Total requests currently in progress",
    LABELS,
    multiprocess_mode="livesum",
)
METRICS = (REQUESTS, ERRORS, DURATION, IN_PROGRESS)

_Ended = tuple[Counter, Histogram, Counter | None]


class _Route:
    """One route's (method, template) label children: in progress, and per status code the
    count, the duration and (5xx) the error count."""

    __slots__ = ("ended", "labels", "running", "timed")

    def __init__(self, method: str, template: str) -> None:
        self.labels = (method, template)
        self.timed = template not in STREAMS
        # Requests in progress carry status 200, as Litestar's middleware counted them.
        self.running = IN_PROGRESS.labels(method, template, "200", APP_NAME)
        self.ended: dict[int, _Ended] = {}

    def finished(self, status: int) -> _Ended:
        ended = self.ended.get(status)
        if ended is None:
            values = (*self.labels, str(status), APP_NAME)
            error = ERRORS.labels(*values) if status >= 500 else None
            ended = self.ended[status] = (REQUESTS.labels(*values), DURATION.labels(*values), error)
        return ended


class RequestMetrics(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], _Route] = {}
        """Bounded by the app's routes and methods: keyed by the route template, not the path."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        template = scope["path_template"]
        if template in UNCOUNTED:
            await next_app(scope, receive, send)
            return
        key = (cast("HTTPScope", scope)["method"], template)  # only HTTP: `scopes`
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(*key)
        status = 200

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        route.running.inc()
        try:
            await next_app(scope, receive, sending)
        finally:
            route.running.dec()
            count, duration, error = route.finished(status)
            count.inc()
            if route.timed:
                duration.observe(time.perf_counter() - start)
            if error is not None:
                error.inc()
