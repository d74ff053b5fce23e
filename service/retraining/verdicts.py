"""Policy runs after firing: follow a run's job, apply the gate, promote and publish."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
import msgspec
from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline
from redis.exceptions import LockError

from service import queue, tenants
from service.blobs import BlobStore
from service.contract import (
    Destination,
    GateCheck,
    Job,
    JobStatus,
    Policy,
    PolicyRun,
    PolicyStatus,
    Promoted,
    RunStatus,
    StoreDestination,
    beta_of,
)
from service.publish import publish
from service.retraining.gate import decide
from service.retraining.policies import (
    FIRE_GRACE_SECONDS,
    get_policy,
    set_status,
    update_policy,
    with_run,
)
from service.settings import Settings
from service.store import Conflict, NotFound, P, Store

log = logging.getLogger("ftune.policies")
PUBLISH_LOCK_SECONDS = 3600
"""How long a tick holds a run while it decides and publishes it (a merged model's upload may
take long); a tick that died lets it lapse, and a later one decides the run then."""

Publisher = Callable[[Job, Destination, BlobStore, Settings], list[str]]
Announcer = Callable[[Pipeline, Policy, str], None]
"""Stages the event of a decided run (the policy as recorded, the run's id) in the
transaction that records the decision; the scheduler's is `webhooks.stage_verdict`."""


async def follow(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    policy: Policy,
    *,
    now: float,
    publisher: Publisher,
    announce: Announcer | None = None,
) -> list[str]:
    """A run is in flight: watch its job; when it has ended, apply the gate."""
    tenant, name = policy.tenant, policy.name
    run = next(r for r in policy.runs if r.id == policy.active_run)
    label = f"policy {name} of {tenant}: run {run.number}"
    try:
        job = await store.get_job(run.job_id, None)
    except NotFound:
        if run.status == "starting" and now - run.fired_at < FIRE_GRACE_SECONDS:
            return []  # the firing tick is still at work
        reason = (
            "the firing was interrupted before its job was submitted"
            if run.status == "starting"
            else f"its job {run.job_id} no longer exists"
        )
        await close_run(
            store, tenant, name, run.id, status="lost", reason=reason, now=now, announce=announce
        )
        return [f"{label} lost: {reason}"]
    if run.status == "starting":
        if now - run.fired_at < FIRE_GRACE_SECONDS:
            return []
        # The firing tick died after submitting: adopt the job, make sure it is queued.
        if job.status == JobStatus.queued:
            await queue.enqueue(pool, job, queue_name=settings.queue_name)
        await update_policy(
            store,
            tenant,
            name,
            lambda p: with_run(
                p,
                run.id,
                status=job.status.value,
                dataset=job.dataset,
                eval_dataset=job.eval_dataset,
            ),
        )
        return [f"{label} adopted job {job.id}"]
    if not job.status.terminal:
        if run.status != job.status.value:
            await update_policy(
                store, tenant, name, lambda p: with_run(p, run.id, status=job.status.value)
            )
        step = job.progress.step
        total = job.progress.total_steps
        await set_status(
            store,
            policy,
            PolicyStatus(
                checked_at=now,
                message=f"run {run.number}: job {job.id} is {job.status.value} "
                f"(step {step}" + (f" of {total})" if total else ")"),
            ),
        )
        return []

    # One tick decides (and publishes) a run: another one overlapping it (a leader that lost
    # its lock mid-pass) waits its turn, then finds the run closed.
    lock = store.redis.lock(f"{P}lock:run:{run.id}", timeout=PUBLISH_LOCK_SECONDS)
    if not await lock.acquire(blocking=False):
        return []
    try:
        current = await get_policy(store, tenant, name)
        if current.active_run != run.id:
            return []
        return await _decide(
            store, blobs, settings, current, run, job, now, publisher, label, announce
        )
    finally:
        with contextlib.suppress(LockError):
            await lock.release()


async def _decide(
    store: Store,
    blobs: BlobStore,
    settings: Settings,
    policy: Policy,
    run: PolicyRun,
    job: Job,
    now: float,
    publisher: Publisher,
    label: str,
    announce: Announcer | None,
) -> list[str]:
    tenant, name = policy.tenant, policy.name
    decision = decide(policy.spec.gate, job, run.eval_dataset, policy.promoted)
    published: list[str] = []
    publish_error = None
    destination = policy.spec.template.output.destination
    if decision.promote and not isinstance(destination, StoreDestination):
        try:
            published = await anyio.to_thread.run_sync(publisher, job, destination, blobs, settings)
        except Exception as exc:
            publish_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: publishing failed: %s", label, publish_error)

    def finish(p: Policy) -> Policy:
        p = with_run(
            p,
            run.id,
            status=job.status.value,
            metrics=dict(job.latest_metrics),
            decision="promoted" if decision.promote else "rejected",
            gate=decision.checks,
            decision_reason=decision.reason,
            decided_at=now,
            published=published,
            publish_error=publish_error,
        )
        promoted = p.promoted
        if decision.promote and run.eval_dataset is not None:
            hp = job.spec.hyperparameters
            promoted = Promoted(
                run_id=run.id,
                number=run.number,
                job_id=job.id,
                promoted_at=now,
                metrics=dict(job.latest_metrics),
                eval_dataset=run.eval_dataset,
                base_model=job.spec.base_model,
                revision=job.spec.revision,
                beta=beta_of(job.spec),
                loss_type=hp.loss_type.value,
                method=job.spec.method,
                artifacts=job.artifacts,
                published=published,
            )
        return msgspec.structs.replace(p, active_run=None, promoted=promoted)

    try:
        await update_policy(store, tenant, name, finish, then=_announcing(announce, run.id))
    except Conflict:
        return []
    verdict = "promoted" if decision.promote else "rejected"
    await set_status(
        store,
        policy,
        PolicyStatus(checked_at=now, message=f"run {run.number} {verdict}: {decision.reason}"),
    )
    return [f"{label} {verdict}: {decision.reason}"]


def _announcing(
    announce: Announcer | None, run_id: str
) -> Callable[[Pipeline, Policy], None] | None:
    if announce is None:
        return None
    return lambda pipe, policy: announce(pipe, policy, run_id)


async def close_run(
    store: Store,
    tenant: str,
    name: str,
    run_id: str,
    *,
    status: RunStatus,
    reason: str,
    now: float,
    announce: Announcer | None = None,
) -> None:
    def close(p: Policy) -> Policy:
        p = with_run(
            p,
            run_id,
            status=status,
            decision="rejected",
            gate=[GateCheck(rule="job", passed=False, note=reason)],
            decision_reason=reason,
            decided_at=now,
        )
        return msgspec.structs.replace(p, active_run=None)

    with contextlib.suppress(Conflict, NotFound):
        await update_policy(store, tenant, name, close, then=_announcing(announce, run_id))


def publish_promoted(
    job: Job, destination: Destination, blobs: BlobStore, settings: Settings
) -> list[str]:
    """Copy a promoted run's artifacts from the service's store to the template's destination.

    Runs in the scheduler (which holds the Hub token and S3 credentials, as the workers do)
    with the same publisher the workers use. Returns the published URIs.
    """
    final = msgspec.structs.replace(
        job,
        spec=msgspec.structs.replace(
            job.spec, output=msgspec.structs.replace(job.spec.output, destination=destination)
        ),
    )
    tenants.check_job(tenants.load(settings), job.tenant, final.spec, settings.store_url)
    uris = []
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    for artifact in job.artifacts:
        prefix = blobs.key_of(artifact.uri)
        if prefix is None:
            raise ValueError(f"artifact {artifact.uri} is not in the service's store")
        # One artifact on disk at a time: merged weights are the size of the model.
        with tempfile.TemporaryDirectory(prefix="ftune-promote-", dir=settings.work_dir) as tmp:
            folder = Path(tmp) / artifact.kind
            blobs.download_dir(prefix, folder)
            uris.append(
                publish(
                    folder,
                    kind=artifact.kind,
                    job=final,
                    settings=settings,
                    store=blobs,
                    final_metrics=job.latest_metrics,
                ).uri
            )
    return uris
