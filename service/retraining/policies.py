"""Policy records in Redis: create, replace, read, list, delete, and change atomically.

Redis: ``ftune:policy:{tenant}:{name}:record`` (the :class:`Policy`, changed only through
:func:`update_policy`, a compare-and-set), ``...:status`` (the last evaluation, overwritten each
pass), ``ftune:policies:{tenant}`` (names) and ``ftune:policies`` (every [tenant, name]).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from service.contract import (
    STREAM_NAME,
    JobSpec,
    JobTemplate,
    Policy,
    PolicySpec,
    PolicyStatus,
)
from service.store import Conflict, NotFound, P, Store, check_count, transact

log = logging.getLogger("ftune.policies")

POLICY_NAME = STREAM_NAME
MAX_RUNS = 100
"""Runs kept in a policy's history (the promoted one is kept apart, so it is never lost)."""
FIRE_GRACE_SECONDS = 600.0
"""A firing that has not submitted its job after this long was interrupted (its tick died)."""
MAX_HOLDOUT = 2000
"""Held-out pairs are capped: enough to compare runs, small enough to score quickly."""
RUN_LABEL = "policy"
"""The label every job of a policy carries, with the policy's name."""


# --------------------------------------------------------------------------- cron


# --------------------------------------------------------------------------- the policy


def job_spec(
    template: JobTemplate,
    dataset_id: str,
    eval_dataset_id: str | None,
    *,
    policy: str | None = None,
) -> JobSpec:
    """The spec of a run's job: the template on a dataset, writing to the service's store.

    Goes through JobSpec's own validation (ValueError / msgspec.ValidationError), so a
    template is checked exactly like a submitted job.
    """
    data = msgspec.to_builtins(template)
    data["dataset_id"] = dataset_id
    data["eval_dataset_id"] = eval_dataset_id
    data["output"]["destination"] = {"type": "store"}
    if policy is not None:
        data["labels"] = {**data["labels"], RUN_LABEL: policy}
    return msgspec.convert(data, JobSpec)


# --------------------------------------------------------------------------- pure decisions


# --------------------------------------------------------------------------- Redis


def _key(tenant: str, name: str, part: str) -> str:
    return f"{P}policy:{tenant}:{name}:{part}"


def _index(tenant: str) -> str:
    return f"{P}policies:{tenant}"


ALL = f"{P}policies"
"""Every policy as a JSON [tenant, name], for the periodic task."""

_encoder = msgspec.json.Encoder()
_policy_decoder = msgspec.json.Decoder(Policy)
_status_decoder = msgspec.json.Decoder(PolicyStatus)


async def get_policy(store: Store, tenant: str, name: str, *, with_status: bool = False) -> Policy:
    raw = await store.redis.get(_key(tenant, name, "record"))
    if raw is None:
        raise NotFound(f"policy {name} does not exist")
    policy = _policy_decoder.decode(raw)
    if with_status:
        status = await store.redis.get(_key(tenant, name, "status"))
        policy.status = _status_decoder.decode(status) if status else None
    return policy


async def list_policies(
    store: Store, tenant: str | None, *, limit: int, cursor: str | None
) -> tuple[list[Policy], str | None]:
    """One tenant's policies by name, or (None) every tenant's by tenant, then name."""
    owners, next_cursor = await store.page_owned(ALL, _index, tenant, limit, cursor)
    if not owners:
        return [], None
    records = await store.redis.mget([_key(t, n, "record") for t, n in owners])
    return [_policy_decoder.decode(r) for r in records if r], next_cursor


async def put_policy(
    store: Store,
    tenant: str,
    name: str,
    spec: PolicySpec,
    *,
    now: float | None = None,
    max_policies: int | None = None,
) -> tuple[Policy, bool]:
    """Create or replace a policy's spec, keeping its history; (policy, created?). Creating
    the tenant's policy number `max_policies` + 1 is refused (LimitReached).

    A new stream starts the count and the held-out set afresh; a new schedule starts from now.
    """
    now = time.time() if now is None else now
    key = _key(tenant, name, "record")

    async def put(pipe: Pipeline) -> tuple[Policy, bool]:
        raw = await pipe.get(key)
        if raw is None:
            await check_count(
                pipe, _index(tenant), tenant, "policies", max_policies, "delete one first"
            )
        if raw is None:
            policy = Policy(
                name=name, tenant=tenant, spec=spec, created_at=now, updated_at=now, cron_after=now
            )
        else:
            old = _policy_decoder.decode(raw)
            policy = msgspec.structs.replace(
                old, spec=spec, revision=old.revision + 1, updated_at=now
            )
            if (spec.stream, spec.rows) != (old.spec.stream, old.spec.rows):
                # Another stream, or its ratings instead of its pairs: other rows, counted anew.
                policy.pairs_at_last_run = 0
                policy.stream_created_at = None
                policy.holdout = None
            if spec.trigger.cron != old.spec.trigger.cron:
                policy.cron_after = now
        pipe.multi()
        pipe.set(key, _encoder.encode(policy))
        pipe.zadd(_index(tenant), {name: 0})
        pipe.zadd(ALL, {_encoder.encode((tenant, name)): 0})
        return policy, raw is None

    watched = (key, _index(tenant)) if max_policies is not None else (key,)
    result, _ = await transact(store.redis, put, *watched)
    return result


async def delete_policy(store: Store, tenant: str, name: str) -> Policy:
    """Forget a policy and its history; a run in flight finishes as a plain job."""
    policy = await get_policy(store, tenant, name)
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.delete(_key(tenant, name, "record"), _key(tenant, name, "status"))
        pipe.zrem(_index(tenant), name)
        pipe.zrem(ALL, _encoder.encode((tenant, name)))
        await pipe.execute()
    return policy


async def update_policy(
    store: Store,
    tenant: str,
    name: str,
    change: Callable[[Policy], Policy],
    *,
    then: Callable[[Pipeline, Policy], None] | None = None,
) -> Policy:
    """Apply `change` atomically (it may raise Conflict to refuse); NotFound if deleted.
    `then` adds its commands to the same transaction, given the changed policy."""
    key = _key(tenant, name, "record")

    async def update(pipe: Pipeline) -> Policy:
        raw = await pipe.get(key)
        if raw is None:
            raise NotFound(f"policy {name} does not exist")
        new = change(_policy_decoder.decode(raw))
        pipe.multi()
        pipe.set(key, _encoder.encode(new))
        if then is not None:
            then(pipe, new)
        return new

    policy, _ = await transact(store.redis, update, key)
    return policy


async def set_status(store: Store, policy: Policy, status: PolicyStatus) -> None:
    await store.redis.set(_key(policy.tenant, policy.name, "status"), _encoder.encode(status))


def with_run(policy: Policy, run_id: str, **fields: Any) -> Policy:
    """The policy with one run's fields changed; Conflict if that run is no longer in flight."""
    if policy.active_run != run_id:
        raise Conflict(f"run {run_id} of policy {policy.name} is no longer in flight")
    runs = [msgspec.structs.replace(r, **fields) if r.id == run_id else r for r in policy.runs]
    return msgspec.structs.replace(policy, runs=runs)


# --------------------------------------------------------------------------- the tick


# --------------------------------------------------------------------------- publishing


async def policy_count(store: Store, tenant: str) -> int:
    return int(await store.redis.zcard(_index(tenant)))
