"""Records in Redis: datasets and jobs, per-tenant indexes, atomic transitions, metric streams.

Every change to a record goes through `transact`, an optimistic WATCH/MULTI transaction over
redis-py's `transaction()`: two actors racing (the API cancelling, a worker reporting) never
lose each other's writes. Persistence knows no feature: what a feature must write atomically
with a job's end (a webhook event) it registers as an `on_terminal` hook.
Ids are time-sortable, so each index is a lexicographic sorted set that pages newest first
with an exact cursor.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.lock import Lock

from service.contract import Dataset, Job, JobStatus, MetricPoint

P = "ftune:"
T = TypeVar("T", Dataset, Job)
R = TypeVar("R")
BLOB_LOCK_SECONDS = 60
"""How long a dataset blob's lock may be held (one INCR, or one blob delete)."""

TerminalHook = Callable[[Pipeline, Job], None]
"""Queues more writes into the transaction that stores a job's terminal status."""
CreateHook = Callable[[Pipeline, str], None]
"""Queues more writes into the transaction that creates a job, given the key of the job's
record: they run even when the creation was refused, so each must do nothing unless that key
exists (the record is new, so it exists only if the creation went through)."""
UpdateHook = Callable[[Pipeline, Job], None]
"""Queues more writes into the transaction that updates a job, given the new record: stored
together with it or not at all."""
JobKeys = Callable[[str], str]
"""A feature's per-job key (a webhook delivery log, ...), deleted with the job's record."""

_job_decoder = msgspec.json.Decoder(Job)
_owner_decoder = msgspec.json.Decoder(tuple[str, str])
_dataset_decoder = msgspec.json.Decoder(Dataset)
_encoder = msgspec.json.Encoder()
_values_decoder = msgspec.json.Decoder(dict[str, float])


class NotFound(Exception):
    """The record does not exist, or belongs to another tenant."""


class Conflict(Exception):
    """The change is not allowed in the record's current state."""


class LimitReached(Exception):
    """The tenant is at one of its limits (service/tenants.py): 429, naming the limit.

    `retry_after` is when trying again may help (seconds); `window` the window of a rate
    (None for a quota, which frees up only when something finishes or is deleted).
    """

    def __init__(
        self, detail: str, *, limit: str, quota: int, retry_after: int, window: int | None = None
    ) -> None:
        super().__init__(detail)
        self.limit, self.quota, self.retry_after, self.window = limit, quota, retry_after, window


class DatasetQuota(NamedTuple):
    datasets: int | None
    bytes: int | None


def new_id(prefix: str) -> str:
    """Time-sortable: 12 hex digits of milliseconds, then 12 random hex digits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def is_stream_id(value: str) -> bool:
    """Whether ``value`` is a Redis stream entry id (``ms-seq``, each below 2**64), so that a
    client's ``Last-Event-ID`` or ``after`` never reaches XREAD malformed."""
    ms, dash, seq = value.partition("-")
    return bool(dash) and all(
        p.isascii() and p.isdigit() and len(p) <= 20 and int(p) < 2**64 for p in (ms, seq)
    )


def stream_position(entry_id: str) -> tuple[int, int]:
    """A stream entry id as numbers, so that ids compare in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def job_key(job_id: str) -> str:
    return f"{P}job:{_record_id(job_id)}"


def dataset_key(dataset_id: str) -> str:
    return f"{P}ds:{_record_id(dataset_id)}"


def _names_a_record(value: str) -> bool:
    """Ours never hold a ':'; an id that does (from a request) names no record: in a key it
    would reach another key of the family, such as a dataset's set of live jobs, which a GET
    cannot read."""
    return ":" not in value


def _record_id(value: str) -> str:
    """An id as it goes into its record's key (NotFound if it names no record)."""
    if not _names_a_record(value):
        raise NotFound(f"{value} does not exist")
    return value


def metrics_key(job_id: str) -> str:
    return f"{P}metrics:{job_id}"


def events_key(job_id: str) -> str:
    return f"{P}events:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{P}lease:{job_id}"


RUNNING = f"{P}running"
"""Ids of jobs in `running`, scanned by the reaper for expired leases."""
FINISHED = f"{P}finished"
"""Ids of finished jobs scored by when they finished, swept after the retention period."""
METRICS_PAGE = 1_000
"""Metric points a round trip when a job's series is read (about 200 KB)."""
LABEL_SCAN = 2_000
"""Job records a label-filtered list reads per request at most: a filter that few jobs match
answers a short page and a cursor, not one request reading the whole index."""
LABEL_PAGE = 100
"""Records read a round trip while filtering by labels, however small the page asked for (a
page of 1 read 4 at a time: OpenAI's SDK listing 6,000 jobs took 1,500 round trips)."""
EVENTS_PER_METRIC = 2
"""A job's event stream is capped at this many times its metric stream (each point is also an
event; the rest are logs, phases and statuses)."""


def _index(kind: str, tenant: str | None, status: JobStatus | None = None) -> str:
    scope = "all" if tenant is None else f"t:{tenant}"
    return f"{P}{kind}:{scope}" + (f":{status.value}" if status else "")


def job_status_index(tenant: str, status: JobStatus) -> str:
    """The tenant's jobs in one status (kept with every status move): e.g. how many run."""
    return _index("jobs", tenant, status)


async def transact(
    redis: aioredis.Redis, body: Callable[[Pipeline], Awaitable[R]], *keys: str
) -> tuple[R, list[Any]]:
    """Run `body` as an optimistic transaction on `keys`: it reads them (the pipeline is in
    immediate mode until it calls `pipe.multi()`), may raise to refuse, then queues its
    writes; it runs again from the start when a watched key changed before EXEC.

    Returns what `body` returned on its last run and the results of the queued writes.
    """
    returned: list[R] = []

    async def run(pipe: Pipeline) -> None:
        returned[:] = [await body(pipe)]

    executed = await redis.transaction(run, *keys)
    return returned[0], list(executed)


class Store:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        metrics_maxlen: int = 100_000,
        on_terminal: Sequence[TerminalHook] = (),
        job_keys: Sequence[JobKeys] = (),
    ) -> None:
        # redis-py 5.2 annotates some asyncio replies as `Awaitable[T] | T` (redis-py#2399); those
        # awaits carry `type: ignore[misc]`, which mypy reports as unused once that is fixed.
        self.redis = client
        self.metrics_maxlen = metrics_maxlen
        self.on_terminal = tuple(on_terminal)
        self.job_keys = tuple(job_keys)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        metrics_maxlen: int = 100_000,
        on_terminal: Sequence[TerminalHook] = (),
        job_keys: Sequence[JobKeys] = (),
        timeout: float | None = None,
        max_connections: int | None = None,
    ) -> Store:
        """`timeout`: connect and reply timeout in seconds (None: wait). `max_connections`
        bounds the pool: past it a command waits up to 5 s for a free connection (then
        ConnectionError), so a burst of requests cannot exhaust Redis's `maxclients`."""
        options: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        if max_connections is None:
            client = aioredis.Redis.from_url(url, **options)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=5,
                client_name="ftune-store",
                **options,
            )
            client = aioredis.Redis(connection_pool=pool)
        return cls(
            client, metrics_maxlen=metrics_maxlen, on_terminal=on_terminal, job_keys=job_keys
        )

    async def close(self) -> None:
        await self.redis.aclose()

    # -- datasets ---------------------------------------------------------------------------

    async def put_dataset(self, ds: Dataset, quota: DatasetQuota | None = None) -> None:
        """The record and its indexes; past the tenant's `quota`, LimitReached (checked in the
        same transaction, so concurrent uploads cannot overshoot it). The reference to its blob
        was taken before the blob was stored (`add_blob_ref`)."""
        index, used_bytes = _index("datasets", ds.tenant), dataset_bytes_key(ds.tenant)

        async def put(pipe: Pipeline) -> None:
            if quota is not None:
                await _check_dataset_quota(pipe, ds.tenant, ds.bytes, quota)
            pipe.multi()
            pipe.set(dataset_key(ds.id), _encoder.encode(ds))
            pipe.zadd(index, {ds.id: 0})
            pipe.zadd(_index("datasets", None), {ds.id: 0})
            pipe.incrby(used_bytes, ds.bytes)

        await transact(self.redis, put, index, used_bytes)

    async def check_dataset_quota(self, tenant: str, incoming: int, quota: DatasetQuota) -> None:
        """LimitReached if one more dataset of `incoming` bytes would not fit (an early,
        unguarded look, to refuse before a large upload is stored)."""
        await _check_dataset_quota(self.redis, tenant, incoming, quota)

    async def dataset_usage(self, tenant: str) -> tuple[int, int]:
        """(datasets, stored bytes) of a tenant."""
        count = await self.redis.zcard(_index("datasets", tenant))
        return int(count), int(await self.redis.get(dataset_bytes_key(tenant)) or 0)

    async def count_tenant_jobs(self, tenant: str, status: JobStatus) -> int:
        return int(await self.redis.zcard(_index("jobs", tenant, status)))

    def blob_lock(self, sha256: str) -> Lock:
        """Held while a dataset blob's references are taken, and while it is deleted once they
        are gone: a reference taken after the lock is released sees the blob's final state."""
        return self.redis.lock(
            f"{P}bloblock:{sha256}", timeout=BLOB_LOCK_SECONDS, blocking_timeout=BLOB_LOCK_SECONDS
        )

    async def add_blob_ref(self, sha256: str) -> None:
        """The reference a dataset record will hold, taken (under `blob_lock`) before the blob
        is checked or stored, so that no delete can remove it meanwhile."""
        await self.redis.incr(_blob_refs(sha256))

    async def drop_blob_ref(self, sha256: str) -> int:
        """Give back a reference no record took (a failed upload); how many remain."""
        return int(await self.redis.decr(_blob_refs(sha256)))

    async def blob_refs(self, sha256: str) -> int:
        return int(await self.redis.get(_blob_refs(sha256)) or 0)

    async def get_dataset(self, dataset_id: str, tenant: str | None) -> Dataset:
        raw = await self.redis.get(dataset_key(dataset_id))
        return _visible(raw, _dataset_decoder, tenant, f"dataset {dataset_id}")

    async def get_datasets(self, ids: Sequence[str], tenant: str | None) -> list[Dataset | None]:
        """Several datasets in one round trip, in order; None for one missing or another
        tenant's."""
        named = [i for i in ids if _names_a_record(i)]
        stored = await self.redis.mget([dataset_key(i) for i in named]) if named else []
        raws = dict(zip(named, stored, strict=True))
        found: list[Dataset | None] = []
        for i in ids:
            try:
                found.append(_visible(raws.get(i), _dataset_decoder, tenant, f"dataset {i}"))
            except NotFound:
                found.append(None)
        return found

    async def list_datasets(
        self, tenant: str | None, *, limit: int, cursor: str | None
    ) -> tuple[list[Dataset], str | None]:
        ids, next_cursor = await self.page_newest(_index("datasets", tenant), limit, cursor)
        return await self._load(ids, dataset_key, _dataset_decoder), next_cursor

    async def delete_dataset(self, dataset_id: str, tenant: str | None) -> tuple[Dataset, int]:
        """Refused while a live (queued or running) job uses it.

        Returns the record and how many records still share its content (its blob may go
        when that is 0).
        """
        key = dataset_key(dataset_id)
        users = f"{key}:jobs"

        async def delete(pipe: Pipeline) -> Dataset:
            ds = _visible(await pipe.get(key), _dataset_decoder, tenant, f"dataset {dataset_id}")
            live = await pipe.smembers(users)  # type: ignore[misc]  # redis-py#2399
            if live:
                names = ", ".join(sorted(m.decode() for m in live)[:5])
                raise Conflict(f"dataset {dataset_id} is used by live jobs: {names}")
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(_index("datasets", ds.tenant), dataset_id)
            pipe.zrem(_index("datasets", None), dataset_id)
            pipe.decrby(dataset_bytes_key(ds.tenant), ds.bytes)
            pipe.decr(_blob_refs(ds.sha256))
            return ds

        ds, results = await transact(self.redis, delete, key, users)
        return ds, int(results[-1])

    # -- jobs -------------------------------------------------------------------------------

    async def create_job(
        self,
        job: Job,
        *,
        idempotency: tuple[str, str] | None = None,
        idempotency_seconds: int = 24 * 3600,
        max_queued: int | None = None,
        then: CreateHook | None = None,
    ) -> Job:
        """Write a new job, atomically with its datasets still existing.

        `idempotency` is (key, request fingerprint): a repeat with the same key within
        `idempotency_seconds` returns the first job; the same key with a different request is
        a Conflict. `max_queued` caps the tenant's queued jobs (LimitReached past it),
        counted in the same step so that concurrent submits cannot overshoot. `then` queues
        more writes into the same MULTI/EXEC (the job's dispatch token), so that there is never
        one without the other.

        One round trip and no WATCH: the checks and writes run as one Lua script, so that a
        tenant's concurrent submits (which all change its queued index) never retry.
        """
        ds_keys = [dataset_key(job.dataset.id)]
        if job.eval_dataset is not None:
            ds_keys.append(dataset_key(job.eval_dataset.id))
        idem_key = f"{P}idem:{job.tenant}:{idempotency[0]}" if idempotency else ""
        record = job_key(job.id)
        keys = [
            record,
            events_key(job.id),
            _index("jobs", job.tenant, JobStatus.queued),
            idem_key,
            *ds_keys,
            *(f"{key}:jobs" for key in ds_keys),
            *self._job_indexes(job),
        ]
        args: list[Any] = [
            _encoder.encode(job),
            job.id,
            -1 if max_queued is None else max_queued,
            f"{job.id}:{idempotency[1]}" if idempotency else "",
            idempotency_seconds,
            _encoder.encode({"status": job.status}),
            repr(time.time()),
            len(ds_keys),
        ]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.eval(_CREATE_JOB, len(keys), *keys, *args)
            if then is not None:
                then(pipe, record)
            outcome, *_ = await pipe.execute()
        kind, *detail = (v.decode() if isinstance(v, bytes) else v for v in outcome)
        if kind == "created":
            return job
        if kind == "dataset":
            raise NotFound(f"dataset {detail[0].rsplit(':', 1)[-1]} does not exist")
        if kind == "queued":
            raise LimitReached(
                f"tenant {job.tenant} has {detail[0]} queued jobs, the limit (queued_jobs) "
                f"is {max_queued}; submit again when one has started, or cancel one",
                limit="queued_jobs",
                quota=max_queued or 0,
                retry_after=60,
            )
        assert idempotency is not None and kind == "replay"  # the script answers nothing else
        prior_id, _, fingerprint = detail[0].partition(":")
        if fingerprint != idempotency[1]:
            raise Conflict("this Idempotency-Key was used for a different request")
        return await self.get_job(prior_id, job.tenant)

    async def forget_idempotency(self, tenant: str, key: str, job_id: str) -> None:
        """A repeat with idempotency `key` starts a new job again, if the key still names
        `job_id` (a concurrent repeat may have moved it on already)."""
        await self.redis.eval(_FORGET_IDEMPOTENCY, 1, f"{P}idem:{tenant}:{key}", f"{job_id}:")  # type: ignore[misc]

    async def get_job(self, job_id: str, tenant: str | None) -> Job:
        return _visible(
            await self.redis.get(job_key(job_id)), _job_decoder, tenant, f"job {job_id}"
        )

    async def list_jobs(
        self,
        tenant: str | None,
        *,
        status: JobStatus | None,
        labels: dict[str, str],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[Job], str | None]:
        index = _index("jobs", tenant, status)
        if not labels:
            ids, next_cursor = await self.page_newest(index, limit, cursor)
            return await self._load(ids, job_key, _job_decoder), next_cursor
        # Labels are filtered here: pages are read until enough match, the index ends, or
        # LABEL_SCAN records were read (then a short page and the cursor to go on from).
        found: list[Job] = []
        scanned = 0
        while True:
            ids, cursor = await self.page_newest(
                index, min(max(limit * 4, LABEL_PAGE), LABEL_SCAN - scanned), cursor
            )
            scanned += len(ids)
            for job in await self._load(ids, job_key, _job_decoder):
                if all(job.spec.labels.get(k) == v for k, v in labels.items()):
                    found.append(job)
                    if len(found) == limit:
                        return found, job.id
            if cursor is None or scanned >= LABEL_SCAN:
                return found, cursor

    async def update_job(
        self,
        job_id: str,
        change: Callable[[Job], Job],
        *,
        tenant: str | None = None,
        events: Callable[[Job, Job], Iterable[tuple[str, dict[str, Any]]]] | None = None,
        then: UpdateHook | None = None,
    ) -> Job:
        """Apply `change` atomically; it may raise Conflict to refuse.

        Status moves keep the indexes, the running set and the dataset's live-job set right;
        each move and phase change is appended to the job's event stream. `then` adds writes
        to the same transaction.
        """
        key = job_key(job_id)

        async def update(pipe: Pipeline) -> Job:
            old = _visible(await pipe.get(key), _job_decoder, tenant, f"job {job_id}")
            new = change(old)
            if old.status.terminal and new != old:
                raise Conflict(f"job {job_id} is already {old.status.value}")
            new = msgspec.structs.replace(new, updated_at=time.time())
            pipe.multi()
            pipe.set(key, _encoder.encode(new))
            if new.status != old.status:
                _move_status(pipe, old, new)
                if new.status.terminal:
                    for hook in self.on_terminal:
                        hook(pipe, new)
            if new.phase != old.phase and new.phase is not None:
                pipe.xadd(events_key(job_id), _event("phase", {"phase": new.phase}))
            for kind, data in events(old, new) if events else ():
                pipe.xadd(events_key(job_id), _event(kind, data))
            if then is not None:
                then(pipe, new)
            return new

        new, _ = await transact(self.redis, update, key)
        return new

    async def forget_finished(self, before: float, *, limit: int = 100) -> list[str]:
        """Delete up to `limit` jobs that finished before `before` (seconds since the epoch):
        record, metric and event streams, features' per-job keys, and the id from every
        index, in one transaction each, so that no listed id lacks its record. Their artifacts
        and manifests stay in the blob store. Returns the ids deleted."""
        raw = await self.redis.zrangebyscore(FINISHED, "-inf", before, start=0, num=limit)
        forgotten = []
        for job_id in (r.decode() for r in raw):
            key = job_key(job_id)

            async def forget(pipe: Pipeline, job_id: str = job_id, key: str = key) -> bool:
                data = await pipe.get(key)
                pipe.multi()
                pipe.zrem(FINISHED, job_id)
                if data is None:
                    return False
                job = _job_decoder.decode(data)
                for index in self._job_indexes(job):
                    pipe.zrem(index, job_id)
                extra = [keys(job_id) for keys in self.job_keys]
                pipe.delete(key, metrics_key(job_id), events_key(job_id), *extra)
                return True

            if (await transact(self.redis, forget, key))[0]:
                forgotten.append(job_id)
        return forgotten

    def _job_indexes(self, job: Job) -> list[str]:
        return [
            _index("jobs", job.tenant),
            _index("jobs", None),
            _index("jobs", job.tenant, job.status),
            _index("jobs", None, job.status),
        ]

    # -- metrics, events, leases ------------------------------------------------------------

    async def add_metrics(self, job_id: str, point: MetricPoint) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(
                metrics_key(job_id),
                {"step": point.step, "time": point.time, "values": _encoder.encode(point.values)},
                maxlen=self.metrics_maxlen,
                approximate=True,
            )
            pipe.xadd(
                events_key(job_id),
                _event("metrics", msgspec.to_builtins(point)),
                maxlen=self.metrics_maxlen * EVENTS_PER_METRIC,
                approximate=True,
            )
            await pipe.execute()

    async def get_metrics(self, job_id: str, *, since_step: int = 0) -> list[MetricPoint]:
        """The points from the first of the newest ones at `since_step` or later, in order.
        Read newest first, a page a round trip, to the first point below `since_step`: a
        poll for new points reads only those, not the whole stream (up to `metrics_maxlen`),
        and other requests are served between the pages of a long read. A resumed job's
        steps go back: points of the attempt it replaced are left out once a step below
        `since_step` comes between them and the newer ones."""
        points: list[MetricPoint] = []
        upper = "+"
        while True:
            page = await self.redis.xrevrange(metrics_key(job_id), upper, "-", count=METRICS_PAGE)
            for _, fields in page:
                step = int(fields[b"step"])
                if step < since_step:
                    return points[::-1]
                values = _values_decoder.decode(fields[b"values"])
                points.append(MetricPoint(step=step, time=float(fields[b"time"]), values=values))
            if len(page) < METRICS_PAGE:
                return points[::-1]
            upper = f"({page[-1][0].decode()}"

    async def read_events(
        self, job_id: str, *, after: str, block_ms: int | None
    ) -> list[tuple[str, str, bytes]]:
        """Events after stream id `after`, waiting up to `block_ms` (None: not at all) for
        the first one: (id, type, JSON data)."""
        found = await self.redis.xread({events_key(job_id): after}, count=100, block=block_ms)
        if not found:
            return []
        return [
            (entry_id.decode(), fields[b"type"].decode(), fields[b"data"])
            for entry_id, fields in found[0][1]
        ]

    async def events_before(
        self, job_id: str, *, before: str | None, count: int
    ) -> list[tuple[str, str, bytes]]:
        """Up to `count` events older than stream id `before` (None: the newest), newest
        first: (id, type, JSON data)."""
        upper = f"({before}" if before else "+"
        found = await self.redis.xrevrange(events_key(job_id), max=upper, min="-", count=count)
        return [
            (entry_id.decode(), fields[b"type"].decode(), fields[b"data"])
            for entry_id, fields in found
        ]

    async def add_log(self, job_id: str, message: str) -> None:
        await self.redis.xadd(
            events_key(job_id),
            _event("log", {"message": message}),
            maxlen=self.metrics_maxlen * EVENTS_PER_METRIC,
            approximate=True,
        )

    async def renew_lease(self, job_id: str, worker: str, seconds: float) -> None:
        await self.redis.set(lease_key(job_id), worker, px=int(seconds * 1000))

    async def drop_lease(self, job_id: str) -> None:
        await self.redis.delete(lease_key(job_id))

    async def expired_leases(self) -> list[str]:
        """Running jobs whose worker stopped renewing its lease."""
        running = [m.decode() for m in await self.redis.smembers(RUNNING)]  # type: ignore[misc]  # redis-py#2399
        if not running:
            return []
        alive = await self.redis.mget([lease_key(j) for j in running])
        return [job_id for job_id, lease in zip(running, alive, strict=True) if lease is None]

    async def count_jobs(self, status: JobStatus) -> int:
        return int(await self.redis.zcard(_index("jobs", None, status)))

    # -- helpers ----------------------------------------------------------------------------

    async def page_by_name(
        self, index: str, limit: int, cursor: str | None
    ) -> tuple[list[str], str | None]:
        """Names in a lexicographic index, A to Z, `limit` at a time after `cursor`."""
        lower = f"({cursor}" if cursor else "-"
        raw = await self.redis.zrangebylex(index, lower, "+", start=0, num=limit + 1)
        names = [r.decode() for r in raw]
        if len(names) > limit:
            return names[:limit], names[limit - 1]
        return names, None

    async def page_owned(
        self,
        every: str,
        own: Callable[[str], str],
        tenant: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[tuple[str, str]], str | None]:
        """(tenant, name) pairs of a kind of named record, in pages by name: one tenant's
        (its index `own(tenant)`), or (None) every tenant's by tenant, then name (the index
        `every`, whose members are JSON pairs)."""
        if tenant is None:
            members, next_cursor = await self.page_by_name(every, limit, cursor)
            return [_owner_decoder.decode(m) for m in members], next_cursor
        names, next_cursor = await self.page_by_name(own(tenant), limit, cursor)
        return [(tenant, n) for n in names], next_cursor

    async def page_newest(
        self, index: str, limit: int, cursor: str | None
    ) -> tuple[list[str], str | None]:
        """Ids in a lexicographic index of time-sortable ids, newest first, `limit` at a time
        after `cursor` (an id; the next page starts below it)."""
        upper = f"({cursor}" if cursor else "+"
        raw = await self.redis.zrevrangebylex(index, upper, "-", start=0, num=limit + 1)
        ids = [r.decode() for r in raw]
        if len(ids) > limit:
            return ids[:limit], ids[limit - 1]
        return ids, None

    async def _load(self, ids: list[str], key: Callable[[str], str], decoder: Any) -> list[Any]:
        if not ids:
            return []
        return [decoder.decode(raw) for raw in await self.redis.mget([key(i) for i in ids]) if raw]


def _visible(
    raw: bytes | None, decoder: msgspec.json.Decoder[T], tenant: str | None, what: str
) -> T:
    """Another tenant's record answers exactly like a missing one (`what`, e.g. "job job_1",
    does not exist)."""
    if raw is None:
        raise NotFound(f"{what} does not exist")
    record = decoder.decode(raw)
    if tenant is not None and record.tenant != tenant:
        raise NotFound(f"{what} does not exist")
    return record


def dataset_bytes_key(tenant: str) -> str:
    """Bytes of a tenant's stored datasets, kept with its dataset records."""
    return f"{P}dsbytes:{tenant}"


async def check_count(
    pipe: aioredis.Redis, index: str, tenant: str, limit: str, quota: int | None, hint: str
) -> None:
    """Refuse a tenant's next record of a kind past its quota (LimitReached), counted from the
    kind's index inside the caller's transaction so replicas cannot both pass."""
    if quota is None:
        return
    count = int(await pipe.zcard(index))
    if count >= quota:
        what = limit.replace("_", " ")
        raise LimitReached(
            f"tenant {tenant} has {count} {what}, the limit ({limit}) is {quota}; {hint}",
            limit=limit,
            quota=quota,
            retry_after=3600,
        )


async def _check_dataset_quota(
    pipe: aioredis.Redis, tenant: str, incoming: int, quota: DatasetQuota
) -> None:
    index = _index("datasets", tenant)
    await check_count(pipe, index, tenant, "datasets", quota.datasets, "delete one first")
    used = int(await pipe.get(dataset_bytes_key(tenant)) or 0)
    if quota.bytes is not None and used + incoming > quota.bytes:
        raise LimitReached(
            f"tenant {tenant} stores {used} bytes of datasets; {incoming} more would pass the "
            f"limit (dataset_bytes) of {quota.bytes}; delete datasets first",
            limit="dataset_bytes",
            quota=quota.bytes,
            retry_after=3600,
        )


def _blob_refs(sha256: str) -> str:
    return f"{P}blobrefs:{sha256}"


def _move_status(pipe: Pipeline, old: Job, new: Job) -> None:
    for tenant in (old.tenant, None):
        pipe.zrem(_index("jobs", tenant, old.status), old.id)
        pipe.zadd(_index("jobs", tenant, new.status), {new.id: 0})
    if new.status == JobStatus.running:
        pipe.sadd(RUNNING, new.id)
    else:
        pipe.srem(RUNNING, new.id)
    if new.status.terminal:
        pipe.zadd(FINISHED, {new.id: new.finished_at or time.time()})
        pipe.srem(f"{dataset_key(new.dataset.id)}:jobs", new.id)
        if new.eval_dataset is not None:
            pipe.srem(f"{dataset_key(new.eval_dataset.id)}:jobs", new.id)
    data: dict[str, Any] = {"status": new.status, "attempt": new.attempt}
    if new.error is not None:
        data["error"] = new.error
    pipe.xadd(events_key(new.id), _event("status", data))


_FORGET_IDEMPOTENCY = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

# KEYS: record, events, tenant's queued index, idempotency key ('': none), then the n datasets,
#       their live-job sets, and the job's indexes
# ARGV: record, job id, max queued (-1: none), idempotency value, its seconds, status event
#       data, event time, n
_CREATE_JOB = """
if KEYS[4] ~= '' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return {'replay', prior} end
end
local n = tonumber(ARGV[8])
for i = 5, 4 + n do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'dataset', KEYS[i]} end
end
local max = tonumber(ARGV[3])
if max >= 0 then
  local count = redis.call('ZCARD', KEYS[3])
  if count >= max then return {'queued', count} end
end
redis.call('SET', KEYS[1], ARGV[1])
for i = 5 + n, 4 + 2 * n do redis.call('SADD', KEYS[i], ARGV[2]) end
for i = 5 + 2 * n, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5]) end
redis.call('XADD', KEYS[2], '*', 'type', 'status', 'data', ARGV[6], 'time', ARGV[7])
return {'created'}
"""


def _event(kind: str, data: dict[str, Any]) -> dict[Any, Any]:
    return {"type": kind, "data": _encoder.encode(data), "time": repr(time.time())}


def request_fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]
