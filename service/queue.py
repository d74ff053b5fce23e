"""Fair dispatch over arq: which queued attempt a free worker starts next.

The arq queue holds one *dispatch token* per queued or running attempt, so its length (what
KEDA and the `depth` metric count) stays the number of live jobs. A token names no job: the
worker that takes one picks the attempt to run at that moment, atomically in a Lua script
over per-tenant pending sets, so tenants take turns however many jobs each one queued:

- each tenant with queued work has a *pass*; the script picks the tenant with the lowest
  pass that is under its running-jobs limit (ties: tenant name), takes its first pending
  attempt (highest `priority`, then oldest), and adds `1 / share` to the tenant's pass
  (stride scheduling: a share of 2 gets twice the turns of a share of 1);
- a tenant that had nothing queued joins at the current virtual time (the pass of the last
  pick), so idle time is not saved up as credit;
- a tenant at its running-jobs limit is passed over; when every tenant with queued work is
  at its limit, the worker puts its token back a few seconds later and stays free.

A picked attempt is *claiming* until the worker's compare-and-set on the job record moves it
to running; the lease reaper returns a claim whose worker died before that
(`leases.restore_lost_claims`) and replaces a token whose worker died before picking
(`replace_stranded_tokens`). Adding a token also publishes a wake-up, so an idle worker
takes it at once rather than at its next poll (`WakeUps`). docs/architecture.md, "How fairness
works", has the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import serialize_job
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.contract import Job, JobStatus
from service.store import job_status_index, new_id

TASK = "run_job"
QUEUED_FOR = timedelta(days=30)
"""How long a token may wait for a free GPU (arq's default is one day)."""
BLOCKED_RETRY = timedelta(seconds=5)
"""When every tenant with queued work is at its running limit: when the token is tried again."""

P = "ftune:"
FAIR = f"{P}fair"
"""Sorted set: tenant -> pass (its position in the round; the lowest goes next)."""
VTIME = f"{P}fair:vtime"
"""The pass of the last pick: where a tenant that had nothing queued joins the round."""
DISPATCHED = f"{P}dispatched"
"""Hash: job id -> the token its current attempt was picked with (to clear it on re-queue)."""
WAKE = f"{P}wake:"
"""Prefix of the pub/sub channel (one per queue) the scripts adding a token publish to."""
_RUNNING_PREFIX, _RUNNING_SUFFIX = job_status_index("\0", JobStatus.running).split("\0")


def wake_channel(queue_name: str) -> str:
    """Where idle workers of `queue_name` hear of a new token (see `WakeUps`)."""
    return WAKE + queue_name


def pending_key(tenant: str) -> str:
    """Sorted set of the tenant's queued attempts (`job:attempt`), first to start first.
    (The Lua scripts below build this name and `claiming_key`'s themselves.)"""
    return f"{P}pending:{tenant}"


def claiming_key(tenant: str) -> str:
    """Sorted set of attempts picked by a worker not yet running -> deadline (ms)."""
    return f"{P}claiming:{tenant}"


@dataclass(frozen=True)
class Share:
    """What one tenant gets of the workers."""

    weight: float = 1.0
    """Relative share of dispatches while several tenants have queued work."""
    max_running: int | None = None
    """Jobs of the tenant that may be running (or starting) at once; None: no limit."""


def attempt_key(job_id: str, attempt: int) -> str:
    return f"{job_id}:{attempt}"


def _order(priority: int, created_at: float) -> float:
    """Pending-set score: higher priority first, then the older job (a retried attempt keeps
    its job's place). Milliseconds with their fraction: two jobs submitted within the same
    millisecond keep their order (whole milliseconds tied them, and the tie went by the ids'
    random part). At |priority| 100 a double still tells 1/8 ms apart, at 0 a microsecond."""
    return -priority * 1e13 + created_at * 1000


async def connect(redis_url: str) -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(redis_url))


def _token_payload() -> bytes:
    return serialize_job(TASK, (), {}, None, int(time.time() * 1000), serializer=pickle.dumps)


# KEYS: pending, fair, vtime, queue, token's job key, token's result key[, required key]
# ARGV: attempt, order, tenant, token, payload, expires ms, score ms, wake channel
_ENQUEUE = """
if KEYS[7] and redis.call('EXISTS', KEYS[7]) == 0 then return 0 end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[5], KEYS[6]) > 0 then return 0 end
if redis.call('ZCARD', KEYS[1]) == 0 then
  local vtime = tonumber(redis.call('GET', KEYS[3]) or '0')
  local pass = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[3]) or '-1')
  if pass < vtime then redis.call('ZADD', KEYS[2], vtime, ARGV[3]) end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[4])
redis.call('PUBLISH', ARGV[8], ARGV[4])
return 1
"""


def _enqueue_call(
    job: Job, queue_name: str, token: str | None, requires: str | None = None
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of `_ENQUEUE` for the job's current attempt."""
    attempt = attempt_key(job.id, job.attempt)
    token = token or attempt
    keys = [
        pending_key(job.tenant),
        FAIR,
        VTIME,
        queue_name,
        job_key_prefix + token,
        result_key_prefix + token,
        *([requires] if requires else []),
    ]
    args = [
        attempt,
        _order(job.spec.priority, job.created_at),
        job.tenant,
        token,
        _token_payload(),
        int(QUEUED_FOR.total_seconds() * 1000),
        int(time.time() * 1000),
        wake_channel(queue_name),
    ]
    return keys, args


async def enqueue(pool: ArqRedis, job: Job, *, queue_name: str, token: str | None = None) -> bool:
    """Queue the job's current attempt and a dispatch token at once. True if queued now,
    False if this attempt was already queued (a repeat is a no-op). The token is named after
    the attempt unless one is given (an attempt returned by the reaper gets a fresh one)."""
    keys, args = _enqueue_call(job, queue_name, token)
    return bool(await _run(pool, _ENQUEUE, keys, args))


def enqueue_in(
    pipe: Pipeline, job: Job, *, queue_name: str, requires: str, token: str | None = None
) -> None:
    """`enqueue` as one more command of the caller's MULTI/EXEC, done only if the key
    `requires` exists when it runs: a new job's record, written by the command before it
    (`Store.create_job`'s `then`), so that a record and its token are stored together or not
    at all. EVAL rather than EVALSHA: a script cache emptied by a restart cannot fail the
    command after the record was written."""
    keys, args = _enqueue_call(job, queue_name, token, requires)
    pipe.eval(_ENQUEUE, len(keys), *keys, *args)


async def _run(pool: ArqRedis, source: str, keys: list[str], args: list[Any]) -> Any:
    """Run a Lua script (by its sha1 after the first time)."""
    return await pool.register_script(source)(keys=keys, args=args)


# KEYS: fair, vtime, dispatched
# ARGV: token, deadline ms, running-index prefix, suffix, default max running (-1: none),
#       default weight, then per tenant: name, max running, weight
_PICK = """
local limits = {}
for i = 7, #ARGV, 3 do limits[ARGV[i]] = {tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])} end
local blocked = 0
for _, tenant in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local pending = 'ftune:pending:' .. tenant
  if redis.call('ZCARD', pending) > 0 then
    local limit = limits[tenant] or {tonumber(ARGV[5]), tonumber(ARGV[6])}
    local claiming = 'ftune:claiming:' .. tenant
    local busy = redis.call('ZCARD', ARGV[3] .. tenant .. ARGV[4]) + redis.call('ZCARD', claiming)
    if limit[1] < 0 or busy < limit[1] then
      local attempt = redis.call('ZRANGE', pending, 0, 0)[1]
      redis.call('ZREM', pending, attempt)
      redis.call('ZADD', claiming, ARGV[2], attempt)
      local pass = redis.call('ZSCORE', KEYS[1], tenant)
      redis.call('SET', KEYS[2], pass)
      redis.call('ZINCRBY', KEYS[1], 1 / limit[2], tenant)
      local job = string.match(attempt, '^(.*):')
      redis.call('HSET', KEYS[3], job, ARGV[1])
      return {tenant, attempt}
    end
    blocked = 1
  end
end
return blocked
"""


@dataclass(frozen=True)
class Picked:
    tenant: str
    job_id: str
    attempt: int


BLOCKED = "blocked"


async def pick(
    pool: ArqRedis, token: str, limits: Callable[[str], Share], *, claim_seconds: float
) -> Picked | str | None:
    """The attempt the worker holding `token` starts now, BLOCKED when every tenant with
    queued work is at its running limit, or None when nothing is queued."""
    args: list[Any] = []
    for raw in await pool.zrange(FAIR, 0, -1):
        tenant = raw.decode()
        share = limits(tenant)
        running = -1 if share.max_running is None else share.max_running
        args += [tenant, running, max(share.weight, 1e-6)]
    default = limits("")
    found = await _run(
        pool,
        _PICK,
        [FAIR, VTIME, DISPATCHED],
        [
            token,
            int((time.time() + claim_seconds) * 1000),
            _RUNNING_PREFIX,
            _RUNNING_SUFFIX,
            -1 if default.max_running is None else default.max_running,
            max(default.weight, 1e-6),
            *args,
        ],
    )
    if not isinstance(found, list):
        return BLOCKED if found else None
    tenant, attempt = (v.decode() for v in found)
    job_id, _, number = attempt.rpartition(":")
    return Picked(tenant, job_id, int(number))


# KEYS: claiming, dispatched
# ARGV: attempt, job id, token whose mapping goes too ('' keeps it)
_UNCLAIM = """
local ended = redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return ended
"""


async def unclaim(pool: ArqRedis, picked: Picked, *, dropped_by: str = "") -> bool:
    """End a claim: the worker's compare-and-set moved the attempt to running, or found it
    no longer queued (then, `dropped_by` its token, the job-to-token mapping goes too). False
    if it had already ended. (The reaper ends a lost claim in its own transaction instead.)"""
    keys = [claiming_key(picked.tenant), DISPATCHED]
    args = [attempt_key(picked.job_id, picked.attempt), picked.job_id, dropped_by]
    return bool(await _run(pool, _UNCLAIM, keys, args))


async def defer(pool: ArqRedis, *, queue_name: str) -> None:
    """Put a token back for later (its holder found every tenant at its limit); the holder's
    own token then ends, so the count stays the same."""
    token = new_id("dispatch")
    async with pool.pipeline(transaction=True) as tr:
        tr.set(job_key_prefix + token, _token_payload(), px=int(QUEUED_FOR.total_seconds() * 1000))
        tr.zadd(queue_name, {token: (time.time() + BLOCKED_RETRY.total_seconds()) * 1000})
        await tr.execute()


# KEYS: queue, pending, claiming, dispatched
# ARGV: attempt, its own token, in-progress prefix, job prefix, retry prefix, job id
_REMOVE = """
local claimed = redis.call('ZREM', KEYS[3], ARGV[1])
if claimed == 1 then redis.call('HDEL', KEYS[4], ARGV[6]) end
if redis.call('ZREM', KEYS[2], ARGV[1]) + claimed == 0 then return 0 end
local function take(token)
  if redis.call('EXISTS', ARGV[3] .. token) == 1 then return false end
  if not redis.call('ZSCORE', KEYS[1], token) then return false end
  redis.call('ZREM', KEYS[1], token)
  redis.call('DEL', ARGV[4] .. token, ARGV[5] .. token)
  return true
end
if take(ARGV[2]) then return 1 end
for _, token in ipairs(redis.call('ZRANGE', KEYS[1], 0, 999)) do
  if take(token) then return 1 end
end
return 1
"""


async def remove(
    pool: ArqRedis, job_id: str, attempt: int, *, tenant: str, queue_name: str
) -> None:
    """Take a cancelled queued attempt off the queue with one token not yet taken by a
    worker (its own if it is still there). A worker that already picked it finds the record
    no longer queued and picks another attempt with the same token."""
    key = attempt_key(job_id, attempt)
    await _run(
        pool,
        _REMOVE,
        [queue_name, pending_key(tenant), claiming_key(tenant), DISPATCHED],
        [key, key, in_progress_key_prefix, job_key_prefix, retry_key_prefix, job_id],
    )


async def dispatched(pool: ArqRedis, job_id: str) -> str | None:
    """The token the job's current attempt was picked with, if any."""
    token = await pool.hget(DISPATCHED, job_id)  # type: ignore[misc]  # redis-py#2399
    return None if token is None else str(token.decode())


def release_in(pipe: Pipeline, job_id: str, token: str | None, *, queue_name: str) -> None:
    """Forget the token the job's attempt ran with (read before, by `dispatched`) and drop
    its arq entries (queue entry, `arq:job:`, `arq:in-progress:`), as more commands of the
    caller's MULTI/EXEC: a worker that died hard leaves them for `job_timeout + 10 s`, and
    KEDA would count them as live jobs."""
    pipe.hdel(DISPATCHED, job_id)
    if token is not None:
        pipe.zrem(queue_name, token)
        pipe.delete(
            job_key_prefix + token, in_progress_key_prefix + token, retry_key_prefix + token
        )


# KEYS: dispatched; ARGV: job id, token
_FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


async def finished(pool: ArqRedis, job_id: str, token: str) -> None:
    """The job's attempt ended on the worker holding `token`, which lets arq end the token
    itself; the mapping goes unless a later attempt already maps the job to another token."""
    await _run(pool, _FORGET, [DISPATCHED], [job_id, token])


async def lost_claims(pool: ArqRedis) -> list[Picked]:
    """Attempts picked by a worker that did not move them to running in time (it died in
    between): the reaper returns them (`leases.restore_lost_claims`)."""
    now = time.time() * 1000
    lost = []
    for raw in await pool.zrange(FAIR, 0, -1):
        tenant = raw.decode()
        for attempt in await pool.zrangebyscore(claiming_key(tenant), "-inf", now):
            job_id, _, number = attempt.decode().rpartition(":")
            lost.append(Picked(tenant, job_id, int(number)))
    return lost


STRANDED_AFTER = timedelta(seconds=60)
"""A live worker maps the token it took to a job (or ends it) within milliseconds; one
unmapped for this long was taken by a worker that died before its pick."""

# KEYS: queue, dispatched; ARGV: in-progress prefix, oldest ms
# In Redis rather than a PTTL per token from the API: the reaper runs every few seconds and a
# deep queue (10,000 tokens) made that read cost a tenth of the API's submits.
_STRANDED = """
local mapped = {}
for _, token in ipairs(redis.call('HVALS', KEYS[2])) do mapped[token] = true end
local stranded = {}
for _, token in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not mapped[token] then
    local ttl = redis.call('PTTL', ARGV[1] .. token)
    if ttl >= 0 and ttl <= tonumber(ARGV[2]) then stranded[#stranded + 1] = token end
  end
end
return stranded
"""

# KEYS: queue, fair
# ARGV: token, in-progress prefix, job prefix, retry prefix, fresh token, payload, expires ms,
#       score ms, wake channel
_REPLACE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', ARGV[2] .. ARGV[1], ARGV[3] .. ARGV[1], ARGV[4] .. ARGV[1])
for _, tenant in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if redis.call('ZCARD', 'ftune:pending:' .. tenant) > 0 then
    redis.call('SET', ARGV[3] .. ARGV[5], ARGV[6], 'PX', ARGV[7])
    redis.call('ZADD', KEYS[1], ARGV[8], ARGV[5])
    redis.call('PUBLISH', ARGV[9], ARGV[5])
    return 1
  end
end
return 1
"""


async def replace_stranded_tokens(
    pool: ArqRedis, *, queue_name: str, in_progress_seconds: float
) -> list[str]:
    """Tokens a worker took and died with before it picked an attempt (a few milliseconds'
    window): arq would keep them "in progress" for `job_timeout + 10 s` while an attempt
    waits for a token. Each is dropped and, while attempts are pending, replaced by a fresh
    one. `in_progress_seconds` is arq's in-progress expiry (the workers' job timeout + 10 s).
    Returns the tokens dropped."""
    oldest_ms = int((in_progress_seconds - STRANDED_AFTER.total_seconds()) * 1000)
    stranded = await _run(
        pool, _STRANDED, [queue_name, DISPATCHED], [in_progress_key_prefix, oldest_ms]
    )
    dropped = []
    for token in (t.decode() for t in stranded):
        args = [
            token,
            in_progress_key_prefix,
            job_key_prefix,
            retry_key_prefix,
            new_id("dispatch"),
            _token_payload(),
            int(QUEUED_FOR.total_seconds() * 1000),
            int(time.time() * 1000),
            wake_channel(queue_name),
        ]
        if await _run(pool, _REPLACE, [queue_name, FAIR], args):
            dropped.append(token)
    return dropped


class WakeUps:
    """An idle worker's wait for a new token, so that it polls the moment one is added rather
    than at its next poll: a subscription to the queue's wake channel, on a connection of its
    own, that the scripts adding a token (`enqueue`, `replace_stranded_tokens`) publish to in
    the same step. Every subscribed worker hears every wake-up, so none is taken by a worker
    that then has no free slot. Waiting costs Redis no command; the worker's own poll, at the
    end of each wait, still catches what a wake-up missed (a connection lost meanwhile, or a
    token `defer` put back for later)."""

    def __init__(self, pool: ArqRedis, queue_name: str) -> None:
        self._pubsub = pool.pubsub()
        self._channel = wake_channel(queue_name)

    async def wait(self, seconds: float) -> bool:
        """Until a wake-up comes (True; any others already come with it) or `seconds` pass.
        An unreachable Redis waits the time out too (the subscription is renewed next time)."""
        deadline = time.monotonic() + seconds
        try:
            if not self._pubsub.subscribed:
                await self._pubsub.subscribe(self._channel)
            while (left := deadline - time.monotonic()) > 0:
                if await self._message(left):
                    await self.drain()
                    return True
        except (RedisConnectionError, RedisTimeoutError):
            await asyncio.sleep(max(deadline - time.monotonic(), 0.0))
        return False

    async def drain(self) -> None:
        """Drop the wake-ups that arrived while the worker was busy: it polls when it is free
        anyway, and unread they would pile up in Redis's buffer for the connection."""
        if self._pubsub.subscribed:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                while await self._message(0.0):
                    pass

    async def _message(self, within: float) -> bool:
        """A wake-up within `within` seconds (a subscription's confirmation is none)."""
        found = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=within)
        return found is not None

    async def close(self) -> None:
        await self._pubsub.aclose()


async def depth(pool: ArqRedis, *, queue_name: str) -> int:
    return int(await pool.zcard(queue_name))
