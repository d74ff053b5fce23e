"""Policy runs: each tick takes every policy a step (`verdicts` follows and judges a fired
run); fire a run when its trigger is due."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
from arq.connections import ArqRedis

from service import queue, tenants
from service.blobs import BlobStore
from service.contract import (
    DatasetRef,
    Holdout,
    InitFrom,
    Job,
    JobStatus,
    JobTemplate,
    Policy,
    PolicyRun,
    PolicyStatus,
    SnapshotRows,
    Untrainable,
    check_trainable,
)
from service.datasets.space import SpaceBusy, UploadSpace
from service.datasets.validate import Limits
from service.init_from import promoted_adapter, resolve_init_adapter
from service.retraining import feedback, snapshots
from service.retraining.events import prompt_key, row_prompt_key
from service.retraining.policies import (
    ALL,
    MAX_HOLDOUT,
    MAX_RUNS,
    get_policy,
    job_spec,
    set_status,
    update_policy,
    with_run,
)
from service.retraining.triggers import evaluate_trigger
from service.retraining.verdicts import (
    Announcer,
    Publisher,
    close_run,
    follow,
    publish_promoted,
)
from service.settings import Settings
from service.store import Conflict, NotFound, Store, new_id

_encoder = msgspec.json.Encoder()

log = logging.getLogger("ftune.policies")
_member_decoder = msgspec.json.Decoder(tuple[str, str])

_KEYLESS = -1
"""The budget of a tenant with no API key: it fires nothing."""


async def tick(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    *,
    now: float | None = None,
    publisher: Publisher | None = None,
    announce: Announcer | None = None,
) -> list[str]:
    """Take every policy one step further; returns what happened, one line per action.

    The scheduler's leader runs it; each step is also a compare-and-set on the policy record,
    so two ticks that overlap (a leader that lost its lock mid-tick) cannot fire twice. A
    tenant's policies start at most its `jobs_per_policy_tick` jobs per pass; the others fire
    on a later pass. A tenant with no API key left in the tenants file (a team removed) fires
    none: nobody could see or stop its jobs.
    """
    done: list[str] = []
    known = tenants.load(settings)
    space = UploadSpace.from_settings(settings, tenants=known.count())
    budget: dict[str, int | None] = {}
    for raw in await store.redis.zrange(ALL, 0, -1):
        tenant, name = _member_decoder.decode(raw)
        if tenant not in budget:
            budget[tenant] = tenants.limits_for(settings, known, tenant).jobs_per_policy_tick
            if settings.api_keys_file is not None and not known.has_keys(tenant):
                budget[tenant] = _KEYLESS
        try:
            done += await _advance(
                store,
                pool,
                blobs,
                settings,
                tenant,
                name,
                now=time.time() if now is None else now,
                publisher=publisher or publish_promoted,
                announce=announce,
                budget=budget,
                space=space,
            )
        except NotFound:
            continue
        except Exception:
            log.exception("policy %s of %s: the step failed", name, tenant)
    return done


async def _advance(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    tenant: str,
    name: str,
    *,
    now: float,
    publisher: Publisher,
    announce: Announcer | None,
    budget: dict[str, int | None],
    space: UploadSpace,
) -> list[str]:
    policy = await get_policy(store, tenant, name)
    if policy.active_run is not None:
        return await follow(
            store, pool, blobs, settings, policy, now=now, publisher=publisher, announce=announce
        )
    if not policy.spec.enabled:
        await set_status(store, policy, PolicyStatus(checked_at=now, message="disabled"))
        return []
    total = await feedback.pair_count(store, tenant, policy.spec.stream, policy.spec.rows)
    created = await _stream_created(store, tenant, policy.spec.stream)
    new_pairs = total - _counted(policy, created)
    fire, why, due = evaluate_trigger(
        policy.spec.trigger,
        new_pairs=new_pairs,
        last_fired_at=policy.last_fired_at,
        cron_after=policy.cron_after,
        now=now,
        what="ratings" if policy.spec.rows == "unpaired" else "pairs",
    )
    if created is None:
        why = f"stream {policy.spec.stream} does not exist (yet): {why}"
    left = budget.get(tenant)
    if fire and left == _KEYLESS:
        fire, why = False, "due, but the tenant has no API key in the tenants file: not fired"
    elif fire and left is not None and left <= 0:
        fire, why = False, "waiting: the tenant's policies started their jobs_per_policy_tick"
    if not fire:
        status = PolicyStatus(checked_at=now, message=why, new_pairs=new_pairs, next_cron_at=due)
        await set_status(store, policy, status)
        return []
    try:  # a template saved before a rule existed, or before the workers had more GPUs
        check_trainable(policy.spec.template, settings.worker_gpus)
    except Untrainable as exc:
        message = f"due ({why}), but its template cannot train: {exc}"
        await set_status(store, policy, PolicyStatus(checked_at=now, message=message))
        return []
    try:  # the snapshots are written in a slot of the host's upload space, taken before firing
        async with space.slot(tenant) as workdir:
            if left is not None:
                budget[tenant] = left - 1
            return await _fire(
                store,
                pool,
                blobs,
                settings,
                policy,
                total,
                created,
                why,
                workdir,
                now=now,
                announce=announce,
            )
    except SpaceBusy as exc:
        message = f"due ({why}), waiting for temp space to snapshot the stream: {exc}"
        status = PolicyStatus(checked_at=now, message=message, new_pairs=new_pairs)
        await set_status(store, policy, status)
        return []


async def _fire(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    seen: Policy,
    total: int,
    created: float | None,
    why: str,
    workdir: Path,
    *,
    now: float,
    announce: Announcer | None,
) -> list[str]:
    tenant, name, spec = seen.tenant, seen.name, seen.spec
    run_id = new_id("run")
    job_id = "job_" + run_id.removeprefix("run_")
    number = (seen.runs[0].number if seen.runs else 0) + 1

    def claim(policy: Policy) -> Policy:
        # Another tick may have fired (and even closed) a run since `seen` was read.
        fired = policy.runs[0].id if policy.runs else None
        if (
            policy.active_run is not None
            or policy.revision != seen.revision
            or fired != (seen.runs[0].id if seen.runs else None)
        ):
            raise Conflict("the policy changed while it was evaluated")
        run = PolicyRun(
            id=run_id,
            number=number,
            fired_at=now,
            reason=why,
            pairs_end=total,
            new_pairs=total - _counted(policy, created),
            job_id=job_id,
        )
        same = _same_stream(policy, created)
        return msgspec.structs.replace(
            policy,
            active_run=run_id,
            runs=[run, *policy.runs][:MAX_RUNS],
            pairs_at_last_run=total,
            stream_created_at=created,
            holdout=policy.holdout if same else None,
            last_fired_at=now,
            cron_after=now,
        )

    try:
        policy = await update_policy(store, tenant, name, claim)
    except Conflict:
        return []
    await set_status(
        store, policy, PolicyStatus(checked_at=now, message=f"fired run {number}: {why}")
    )
    limits = Limits.from_settings(settings)
    try:
        eval_dataset, held, drawn = await _eval_set(
            store, blobs, policy, total, limits, workdir, now=now
        )
        if drawn and held is not None:  # kept at once: a run adopted later is judged on them
            await update_policy(
                store, tenant, name, lambda p: msgspec.structs.replace(p, holdout=held)
            )
        select = await _training_filter(store, tenant, held) if held else None
        train = await snapshots.snapshot(
            store,
            blobs,
            tenant,
            spec.stream,
            limits=limits,
            workdir=workdir,
            end=total,
            select=select,
            selection="train" if select else "all",
            by=f"policy {name} run {number}",
            rows=spec.rows,
        )
        if eval_dataset.format != train.dataset.format:
            raise ValueError(
                f"the eval dataset {eval_dataset.id} is {eval_dataset.format}, the stream's "
                f"pairs are {train.dataset.format}"
            )
        run_spec = job_spec(_template(policy), train.dataset.id, eval_dataset.id, policy=name)
        init_adapter: str | None
        if spec.init_from_promoted and policy.promoted is not None:
            init_adapter = promoted_adapter(policy.promoted, run_spec)
        else:
            init_adapter = await resolve_init_adapter(store, run_spec, tenant)
        job = Job(
            id=job_id,
            tenant=tenant,
            status=JobStatus.queued,
            spec=run_spec,
            dataset=train.dataset,
            eval_dataset=eval_dataset,
            init_adapter=init_adapter,
            created_at=now,
            updated_at=now,
        )
        await store.create_job(job)
    except Exception as exc:
        reason = f"could not start: {type(exc).__name__}: {exc}"
        log.warning("policy %s of %s: run %s %s", name, tenant, number, reason)
        await close_run(
            store,
            tenant,
            name,
            run_id,
            status="not_started",
            reason=reason,
            now=now,
            announce=announce,
        )
        return [f"policy {name} of {tenant}: run {number} {reason}"]

    def started(p: Policy) -> Policy:
        return with_run(
            p,
            run_id,
            status="queued",
            dataset=train.dataset,
            eval_dataset=eval_dataset,
            snapshot_version=train.version,
        )

    try:
        await update_policy(store, tenant, name, started)
    except (Conflict, NotFound):
        # Abandoned by another tick (past FIRE_GRACE_SECONDS) or deleted: nobody waits for it.
        await _cancel(store, job_id)
        return []
    await queue.enqueue(pool, job, queue_name=settings.queue_name)
    return [f"policy {name} of {tenant}: fired run {number} ({why}) as job {job_id}"]


async def _stream_created(store: Store, tenant: str, stream: str) -> float | None:
    """When the stream was created; None while it does not exist."""
    try:
        return (await feedback.get_stream(store, tenant, stream)).created_at
    except NotFound:
        return None


def _same_stream(policy: Policy, created: float | None) -> bool:
    """Whether the stream is the one the policy last fired on, not one made again since. A
    policy saved before streams' times were kept goes by its last run's time."""
    if policy.stream_created_at is not None:
        return policy.stream_created_at == created
    return created is None or not policy.runs or created <= policy.runs[0].fired_at


def _counted(policy: Policy, created: float | None) -> int:
    """The stream's rows the policy has already fired on: none of a stream made again since."""
    return policy.pairs_at_last_run if _same_stream(policy, created) else 0


def _template(policy: Policy) -> JobTemplate:
    """The template a run submits: set to continue the promoted adapter if the policy says so."""
    template = policy.spec.template
    if policy.spec.init_from_promoted and policy.promoted is not None:
        init = InitFrom(job_id=policy.promoted.job_id)
        template = msgspec.structs.replace(template, init_from=init)
    return template


async def _eval_set(
    store: Store,
    blobs: BlobStore,
    policy: Policy,
    total: int,
    limits: Limits,
    workdir: Path,
    *,
    now: float,
) -> tuple[DatasetRef, Holdout | None, bool]:
    """The run's eval dataset; the held-out pairs it is made of, if they come from the
    stream; and whether this run drew them (the first run does)."""
    template = policy.spec.template
    if template.eval_dataset_id is not None:
        try:
            ds = await store.get_dataset(template.eval_dataset_id, policy.tenant)
        except NotFound:
            raise ValueError(
                f"the template's eval dataset {template.eval_dataset_id} does not exist"
            ) from None
        return ds.ref(), None, False
    rows = policy.spec.rows
    held = policy.holdout
    if held is not None and (held.stream, held.rows) == (policy.spec.stream, rows):
        return held.dataset, held, False
    k = min(MAX_HOLDOUT, max(1, round(total * policy.spec.holdout_fraction)))
    if k >= total:
        raise ValueError(
            f"{total} pairs are too few to hold {k} out for evaluation and train on the rest"
        )
    seed = template.hyperparameters.seed
    stream, kind = policy.spec.stream, policy.spec.rows
    indices, prompts = await _draw_prompts(store, policy.tenant, stream, kind, total, k, seed)
    by: Literal["prompt", "pair"] = "prompt"
    if len(indices) < k / 2:  # the pairs gather on a few prompts, too many to keep out
        indices, prompts, by = sorted(random.Random(seed).sample(range(total), k)), [], "pair"
    chosen = set(indices)
    snap = await snapshots.snapshot(
        store,
        blobs,
        policy.tenant,
        policy.spec.stream,
        limits=limits,
        workdir=workdir,
        end=total,
        select=lambda i, _row: i in chosen,
        selection="held_out",
        by=f"policy {policy.name}",
        name=f"{policy.spec.stream} held out by policy {policy.name}",
        rows=rows,
    )
    holdout = Holdout(
        stream=policy.spec.stream,
        dataset=snap.dataset,
        pairs_end=total,
        indices=indices,
        created_at=now,
        rows=rows,
        by=by,
        prompts=prompts,
    )
    return snap.dataset, holdout, True


async def _draw_prompts(
    store: Store, tenant: str, stream: str, rows: SnapshotRows, total: int, k: int, seed: int
) -> tuple[list[int], list[str]]:
    """At most `k` of the first `total` pairs, held out by prompt: the prompts of `k` pairs
    drawn at random, taken in random order while their pairs fit in `k`, each with every
    pair of it. A prompt with more than half of `k` pairs stays in training: holding it out
    would make most of the eval set one prompt and take that much from training. Returns
    the positions (sorted) and the prompts' digests."""
    rng = random.Random(seed)
    drawn = await feedback.read_pairs_at(store, tenant, stream, rng.sample(range(total), k), rows)
    candidates = list(dict.fromkeys(prompt_key(p.row["prompt"]) for p in drawn))
    rng.shuffle(candidates)
    cap = max(1, k // 2)
    at: dict[str, list[int]] = {p: [] for p in candidates}
    for start in range(0, total, feedback.CHUNK):
        pairs = await feedback.read_pairs(
            store, tenant, stream, start, min(start + feedback.CHUNK, total), rows
        )
        for i, pair in enumerate(pairs, start):
            seen = at.get(prompt_key(pair.row["prompt"]))
            if seen is not None and len(seen) <= cap:
                seen.append(i)
    held: list[int] = []
    chosen: list[str] = []
    for prompt in candidates:
        if len(at[prompt]) <= cap and len(held) + len(at[prompt]) <= k:
            held += at[prompt]
            chosen.append(prompt)
    return sorted(held), chosen


async def _training_filter(
    store: Store, tenant: str, holdout: Holdout
) -> Callable[[int, bytes], bool]:
    """Keeps every pair but the held-out ones: those of a held-out prompt, or (held out by
    pair) those drawn and any later copy of one."""
    if holdout.by == "prompt":
        prompts = set(holdout.prompts)
        return lambda _i, row: row_prompt_key(row) not in prompts
    chosen = set(holdout.indices)
    pairs = await feedback.read_pairs_at(
        store, tenant, holdout.stream, holdout.indices, holdout.rows
    )
    rows = {_encoder.encode(pair.row) for pair in pairs}
    return lambda i, row: i not in chosen and row not in rows


async def _cancel(store: Store, job_id: str) -> None:
    def cancel(job: Job) -> Job:
        if job.status.terminal:
            raise Conflict(job.status.value)
        return msgspec.structs.replace(
            job, status=JobStatus.cancelled, cancel_requested=True, finished_at=time.time()
        )

    with contextlib.suppress(Conflict, NotFound):
        await store.update_job(job_id, cancel)
