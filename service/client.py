"""A small synchronous client for the ftune HTTP API (v1), used by the `ftune` CLI and the demo.

Responses decode into the contract's Structs (service/contract/); every non-2xx answer raises
`ApiError` carrying the Problem Details, and an unreachable server raises `Unreachable`, so
callers print one readable message instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args
from urllib.parse import quote

import httpx
import msgspec
from httpx_sse import connect_sse

from service.contract import (
    Container,
    Dataset,
    DatasetImport,
    DatasetList,
    DatasetRows,
    FeedbackReceipt,
    FeedbackSnapshot,
    FeedbackStream,
    FeedbackStreamList,
    Job,
    JobList,
    JobSpec,
    JobStatus,
    MetricSeries,
    PairList,
    Policy,
    PolicyList,
    PolicySpec,
    dataset_name,
    numbered_as,
)

T = TypeVar("T")
CHUNK = 1024 * 1024
_MEDIA_TYPES = {
    ".csv": "text/csv",
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
    ".gz": "application/gzip",
}


def _media_type(path: Path) -> str:
    """What a dataset file's name says it is (the server still looks at its bytes)."""
    return _MEDIA_TYPES.get(path.suffix.lower(), "application/x-ndjson")


class ChecksumMismatch(Exception):
    """A downloaded file is not what its manifest says: it was not kept."""


class Unreachable(Exception):
    """Nothing answers at the API's URL (connection refused, DNS failure, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the ftune API at {url}: {reason}")
        self.url = url
        self.reason = reason


class EventsUnsupported(Exception):
    """The server has no Server-Sent Events endpoint for jobs; poll instead."""


class InvalidId(ValueError):
    """An id that cannot be one path segment (empty, or holding '/'): refused before a call."""


@dataclass
class ApiError(Exception):
    """A Problem Details answer (RFC 9457), or the closest we can make of a non-JSON error."""

    status: int
    title: str
    detail: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    total_errors: int | None = None
    container: Container | None = None
    """For a dataset's errors: what their numbers count (lines of JSONL, else rows)."""
    retry_after: int | None = None
    """A 429's or 503's `Retry-After`, in seconds."""

    def __str__(self) -> str:
        head = f"{self.status} {self.title}"
        return f"{head}: {self.detail}" if self.detail else head

    def error_lines(self, limit: int = 5) -> list[str]:
        """The first few field or row errors, one readable line each."""
        lines = []
        for err in self.errors[:limit]:
            msg = str(err.get("msg", ""))
            if err.get("line"):  # 0: the whole file, as "the dataset has no rows"
                where = f"{numbered_as(self.container)} {err['line']}"
                if err.get("field"):
                    where += f", {err['field']}"
            elif err.get("loc"):
                where = ".".join(str(p) for p in err["loc"])
            else:
                where = ""
            lines.append(f"{where}: {msg}" if where else msg)
        total = self.total_errors if self.total_errors is not None else len(self.errors)
        if total > len(lines):
            lines.append(f"... and {total - len(lines)} more")
        return lines

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        wait = response.headers.get("retry-after", "")
        retry_after = int(wait) if wait.isdigit() else None
        if not isinstance(body, dict):
            text = response.text.strip()[:500]
            return cls(
                response.status_code,
                response.reason_phrase or "Error",
                text,
                retry_after=retry_after,
            )
        errors = body.get("errors")
        total = body.get("total_errors")
        container = body.get("container")
        return cls(
            status=int(body.get("status") or response.status_code),
            title=str(body.get("title") or response.reason_phrase or "Error"),
            detail=str(body.get("detail") or ""),
            errors=[e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else [],
            total_errors=total if isinstance(total, int) else None,
            container=container if container in get_args(Container) else None,
            retry_after=retry_after,
        )


@dataclass
class Event:
    """One Server-Sent Event: its `event` name (default "message") and decoded JSON data."""

    event: str
    data: Any
    id: str | None = None

    @property
    def time(self) -> float | None:
        """When it was written, in seconds since the epoch: its id is the Redis stream's
        `<ms>-<n>`."""
        return int(self.id.split("-")[0]) / 1000 if self.id else None


class Client:
    """The API at `url`, authenticated with `api_key` (sent as a bearer token, never logged)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "ftune-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(self.url, f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    def _get(self, path: str, type_: type[T], params: Any = None) -> T:
        return msgspec.json.decode(self._send("GET", path, params=params).content, type=type_)

    # -- system -----------------------------------------------------------------------------

    def healthy(self) -> bool:
        """True when an ftune API answers /healthz (no key needed)."""
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """True when the API answers /readyz with 200 (its Redis is reachable)."""
        try:
            return self._http.get("/readyz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: Path,
        name: str | None = None,
        *,
        prompt_field: str | None = None,
        chosen_field: str | None = None,
        rejected_field: str | None = None,
        system_field: str | None = None,
        history_field: str | None = None,
        completion_field: str | None = None,
        label_field: str | None = None,
        messages_field: str | None = None,
        on_invalid: str | None = None,
        max_invalid_fraction: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Dataset:
        """Stream a dataset file (JSONL, JSON, Parquet or CSV, gzipped or not) to the API in
        chunks, never read whole; `on_progress(bytes)`."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    if on_progress is not None:
                        on_progress(len(chunk))
                    yield chunk

        params = {
            "name": name or dataset_name(Path(path.name.removesuffix(".gz")).stem),
            "prompt_field": prompt_field,
            "chosen_field": chosen_field,
            "rejected_field": rejected_field,
            "system_field": system_field,
            "history_field": history_field,
            "completion_field": completion_field,
            "label_field": label_field,
            "messages_field": messages_field,
            "on_invalid": on_invalid,
            "max_invalid_fraction": max_invalid_fraction,
        }
        response = self._send(
            "POST",
            "/v1/datasets",
            params={k: v for k, v in params.items() if v is not None},
            content=chunks(),
            # With an explicit length httpx sends the body as-is, not chunked, and the
            # server can answer 413 before reading it.
            headers={"Content-Type": _media_type(path), "Content-Length": str(size)},
            timeout=httpx.Timeout(600.0, connect=5.0),
        )
        return msgspec.json.decode(response.content, type=Dataset)

    def import_dataset(self, req: DatasetImport) -> Dataset:
        """Have the server fetch a dataset from the Hub or S3 and validate it like an upload."""
        response = self._send(
            "POST",
            "/v1/datasets/import",
            content=msgspec.json.encode(req),
            headers={"Content-Type": "application/json"},
            timeout=httpx.Timeout(600.0, connect=5.0),
        )
        return msgspec.json.decode(response.content, type=Dataset)

    def dataset_rows(self, dataset_id: str, offset: int = 0, limit: int = 10) -> DatasetRows:
        """Normalized rows of a dataset, as training will see them."""
        params = {"offset": offset, "limit": limit}
        return self._get(f"/v1/datasets/{_seg(dataset_id)}/rows", DatasetRows, params)

    def list_datasets(self, limit: int = 20, cursor: str | None = None) -> DatasetList:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._get("/v1/datasets", DatasetList, params)

    def iter_datasets(self, page_size: int = 100) -> Iterator[Dataset]:
        cursor = None
        while True:
            page = self.list_datasets(page_size, cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._get(f"/v1/datasets/{_seg(dataset_id)}", Dataset)

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/v1/datasets/{_seg(dataset_id)}")

    # -- jobs -------------------------------------------------------------------------------

    def submit_job(
        self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Job:
        """Submit a spec; a mapping goes to the server as-is, so the server's validation
        (and its readable Problem Details) is the one that counts."""
        body = msgspec.json.encode(spec)
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        response = self._send("POST", "/v1/jobs", content=body, headers=headers)
        return msgspec.json.decode(response.content, type=Job)

    def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        labels: Sequence[str] = (),
        limit: int = 20,
        cursor: str | None = None,
    ) -> JobList:
        """`labels` are `key=value` filters; all must match."""
        params: list[tuple[str, str | int]] = [("limit", limit)]
        if status:
            params.append(("status", str(status)))
        params += [("label", item) for item in labels]
        if cursor:
            params.append(("cursor", cursor))
        return self._get("/v1/jobs", JobList, params)

    def get_job(self, job_id: str) -> Job:
        return self._get(f"/v1/jobs/{_seg(job_id)}", Job)

    def cancel_job(self, job_id: str) -> Job:
        response = self._send("POST", f"/v1/jobs/{_seg(job_id)}/cancel")
        return msgspec.json.decode(response.content, type=Job)

    def download_artifact_file(
        self, job_id: str, kind: str, name: str, dest: Path, sha256: str | None
    ) -> None:
        """Save one file of a job's artifact kept in the service's store to `dest`, streamed
        beside it and renamed only once whole and, given its `sha256`, matching it: never a
        half or altered file under its name. ChecksumMismatch when it does not match."""
        digest = hashlib.sha256()
        part = dest.with_name(dest.name + ".part")
        path = f"/v1/jobs/{_seg(job_id)}/artifacts/{_seg(kind)}/{quote(name)}"
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(10.0, read=300.0)) as got:
                if got.is_error:
                    got.read()
                    raise ApiError.from_response(got)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with part.open("wb") as out:
                    for chunk in got.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"{name}: its sha256 is {digest.hexdigest()}, the manifest says {sha256}"
                )
            part.replace(dest)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        finally:
            part.unlink(missing_ok=True)

    def metrics(self, job_id: str, since_step: int = 0) -> MetricSeries:
        params = {"since_step": since_step} if since_step else None
        return self._get(f"/v1/jobs/{_seg(job_id)}/metrics", MetricSeries, params)

    def events(
        self, job_id: str, read_timeout: float = 30.0, *, last_event_id: str | None = None
    ) -> Generator[Event, None, None]:
        """The job's Server-Sent Events as they arrive (after `last_event_id`, the `id` of the
        last event seen, to resume a dropped stream); raises `EventsUnsupported` (before
        yielding anything) when the server does not stream them."""
        timeout = httpx.Timeout(10.0, read=read_timeout)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with connect_sse(
                self._http,
                "GET",
                f"/v1/jobs/{_seg(job_id)}/events",
                headers=headers,
                timeout=timeout,
            ) as source:
                response = source.response
                ctype = response.headers.get("content-type", "")
                if response.status_code in (404, 405, 406, 501) and "event-stream" not in ctype:
                    # Callers fetch the job first, so a 404 here means no such endpoint.
                    raise EventsUnsupported(f"{response.status_code} from the events endpoint")
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                if not ctype.startswith("text/event-stream"):
                    raise EventsUnsupported(f"the events endpoint answered {ctype!r}")
                for sse in source.iter_sse():
                    # httpx-sse 0.4.3 turns a keep-alive comment after an event with an id
                    # into an event without data; ours always carry data.
                    if sse.data:
                        yield Event(sse.event, _json_or_text(sse.data), sse.id or None)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None

    # -- feedback streams -------------------------------------------------------------------

    def post_feedback(self, stream: str, events: Sequence[Mapping[str, Any]]) -> FeedbackReceipt:
        """One batch (at most contract.MAX_BATCH events), stored all or nothing; an event
        whose id the stream has seen counts as a duplicate, so a retried batch adds nothing."""
        body = msgspec.json.encode({"events": events})
        response = self._send(
            "POST",
            f"/v1/feedback/{_seg(stream)}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        return msgspec.json.decode(response.content, type=FeedbackReceipt)

    def list_feedback_streams(
        self, limit: int = 50, cursor: str | None = None
    ) -> FeedbackStreamList:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._get("/v1/feedback", FeedbackStreamList, params)

    def get_feedback_stream(self, stream: str) -> FeedbackStream:
        """Counts and the newest snapshots."""
        return self._get(f"/v1/feedback/{_seg(stream)}", FeedbackStream)

    def feedback_pairs(self, stream: str, offset: int = 0, limit: int = 100) -> PairList:
        """Pairs `offset` .. `offset+limit-1` in the order gathered."""
        params = {"offset": offset, "limit": limit}
        return self._get(f"/v1/feedback/{_seg(stream)}/pairs", PairList, params)

    def snapshot_feedback(self, stream: str, rows: str = "pairs") -> FeedbackSnapshot:
        """Freeze every pair (`rows="unpaired"`: every rating) so far into a new dataset (409
        when there is none)."""
        response = self._send(
            "POST", f"/v1/feedback/{_seg(stream)}/snapshot", params={"rows": rows}
        )
        return msgspec.json.decode(response.content, type=FeedbackSnapshot)

    # -- retraining policies ----------------------------------------------------------------

    def put_policy(self, name: str, spec: PolicySpec | Mapping[str, Any]) -> Policy:
        """Create or replace; a mapping goes to the server as-is, so its validation (with
        where each error is) is the one that counts."""
        response = self._send(
            "PUT",
            f"/v1/policies/{_seg(name)}",
            content=msgspec.json.encode(spec),
            headers={"Content-Type": "application/json"},
        )
        return msgspec.json.decode(response.content, type=Policy)

    def list_policies(self, limit: int = 50, cursor: str | None = None) -> PolicyList:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._get("/v1/policies", PolicyList, params)

    def get_policy(self, name: str) -> Policy:
        """The spec, trigger status, runs (newest first) with gate decisions, promoted run."""
        return self._get(f"/v1/policies/{_seg(name)}", Policy)

    def delete_policy(self, name: str) -> None:
        self._send("DELETE", f"/v1/policies/{_seg(name)}")


def _json_or_text(data: str) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return data


def _seg(value: str) -> str:
    """One path segment: ids never contain '/', so refuse rather than escape."""
    if not value or "/" in value or value in (".", ".."):
        raise InvalidId(f"not a valid id: {value!r}")
    return value
