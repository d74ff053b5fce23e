"""Retraining policies: when a feedback stream has grown enough, train, then promote if better.

A policy names a feedback stream, a job spec template, a trigger and a promotion gate. A
periodic :func:`tick` (run by every worker, one at a time through a lock) takes each policy one
step further:

1. no run in flight: if the trigger holds, *fire*: snapshot the stream into a dataset, submit
   a job from the template, record the run;
2. a run in flight whose job has ended: *decide*: apply the gate to the job's final metrics;
   a passing run becomes the policy's ``promoted`` model (and, if the template's output
   destination is the Hub or S3, its artifacts are published there); a failing run is kept
   with the reasons.

The held-out pairs. "Better than the promoted model" is only honest on the same pairs, scored
against the same reference. So every run of a policy is evaluated on one fixed eval dataset:
the template's ``eval_dataset_id`` if it names one, else a held-out set the policy draws at its
first firing (``holdout_fraction`` of the pairs gathered then, chosen with the template's seed)
and keeps for good. Held-out pairs, and any later pair identical to one, never go into
training. DPO's eval metrics (``eval_rewards/accuracies``, ``eval_loss``...) are relative to the
reference model, which is the base model with the adapter off; so two runs compare only when
they share the eval dataset, the base model and ``beta``/``loss_type``. When they do not, the
"not worse" check is skipped with a note and the absolute thresholds alone decide.

Triggers. ``min_new_pairs`` alone: fire once that many pairs arrived since the last run.
``cron`` alone: fire at each scheduled time (UTC) if at least one new pair arrived. Both: at a
scheduled time, once ``min_new_pairs`` new pairs are there. A scheduled time that passes while
the policy cannot fire stays pending (several collapse into one). ``min_interval_seconds``
spaces runs; a policy never has two runs in flight. Every firing counts: a run that fails
still uses up the pairs it saw.

Redis: ``ftune:policy:{tenant}:{name}:record`` (the :class:`Policy`, changed only through
WATCH/MULTI in :func:`update_policy`), ``...:status`` (the last evaluation, overwritten each
tick), ``ftune:policies:{tenant}`` (names) and ``ftune:policies`` (every [tenant, name]).
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
from service.store import Conflict, NotFound, P, Store, transact

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
_member_decoder = msgspec.json.Decoder(tuple[str, str])


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
    store: Store, tenant: str, *, limit: int, cursor: str | None
) -> tuple[list[Policy], str | None]:
    names, next_cursor = await store.page_by_name(_index(tenant), limit, cursor)
    if not names:
        return [], None
    records = await store.redis.mget([_key(tenant, n, "record") for n in names])
    return [_policy_decoder.decode(r) for r in records if r], next_cursor


async def put_policy(
    store: Store, tenant: str, name: str, spec: PolicySpec, *, now: float | None = None
) -> tuple[Policy, bool]:
    """Create or replace a policy's spec, keeping its history; (policy, created?).

    A new stream starts the count and the held-out set afresh; a new schedule starts from now.
    """
    now = time.time() if now is None else now
    key = _key(tenant, name, "record")

    async def put(pipe: Pipeline) -> tuple[Policy, bool]:
        raw = await pipe.get(key)
        if raw is None:
            policy = Policy(
                name=name, tenant=tenant, spec=spec, created_at=now, updated_at=now, cron_after=now
            )
        else:
            old = _policy_decoder.decode(raw)
            policy = msgspec.structs.replace(
                old, spec=spec, revision=old.revision + 1, updated_at=now
            )
            if spec.stream != old.spec.stream:
                policy.pairs_at_last_run = 0
                policy.holdout = None
            if spec.trigger.cron != old.spec.trigger.cron:
                policy.cron_after = now
        pipe.multi()
        pipe.set(key, _encoder.encode(policy))
        pipe.zadd(_index(tenant), {name: 0})
        pipe.zadd(ALL, {_encoder.encode((tenant, name)): 0})
        return policy, raw is None

    result, _ = await transact(store.redis, put, key)
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
    store: Store, tenant: str, name: str, change: Callable[[Policy], Policy]
) -> Policy:
    """Apply `change` atomically (it may raise Conflict to refuse); NotFound if deleted."""
    key = _key(tenant, name, "record")

    async def update(pipe: Pipeline) -> Policy:
        raw = await pipe.get(key)
        if raw is None:
            raise NotFound(f"policy {name} does not exist")
        new = change(_policy_decoder.decode(raw))
        pipe.multi()
        pipe.set(key, _encoder.encode(new))
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
