"""Fair dispatch: tenants take turns on the workers, whatever one of them queued.

The worker here is a real arq worker taking the real dispatch tokens and claiming through
the real claim path (`claim_next`); only the training is replaced by "it succeeded at once".
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from arq.connections import RedisSettings
from arq.worker import Worker, func

from gpu_worker.worker import claim_next, dispatch_shares
from service import leases, queue
from service.api.jobs import cancel_job
from service.contract import DatasetRef, Job, JobSpec, JobStatus
from service.settings import Principal, Settings
from service.store import Store, new_id
from tests.fixtures.api import ADMIN, ALICE, BOB, Api, write_tenants

ROWS = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
NDJSON = {"Content-Type": "application/x-ndjson"}


def settings(redis_url: str, **over: Any) -> Settings:
    return replace(Settings(), redis_url=redis_url, lease_seconds=2, **over)


async def submit(
    store: Store,
    pool: Any,
    s: Settings,
    tenant: str,
    priority: int = 0,
    *,
    now: float | None = None,
    job_id: str | None = None,
) -> Job:
    """What `POST /v1/jobs` does once the spec is checked: record the job, queue it."""
    now = time.time() if now is None else now
    job = Job(
        id=job_id or new_id("job"),
        tenant=tenant,
        status=JobStatus.queued,
        spec=JobSpec(base_model="org/model", dataset_id="ds_x", priority=priority),
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=1, format="standard"),
        created_at=now,
        updated_at=now,
    )
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    assert await queue.enqueue(pool, job, queue_name=s.queue_name)
    return job


async def run_one_worker(s: Settings, limits: queue.Share | None = None) -> list[str]:
    """A real arq worker (one job at a time) until the queue is empty; the job ids in the
    order they started. Each job 'trains' by succeeding at once."""
    started: list[str] = []

    async def run_job(ctx: dict[str, Any]) -> str:
        job = await claim_next(ctx)
        if isinstance(job, str):
            return job
        started.append(job.id)
        succeed = lambda j: msgspec.structs.replace(j, status=JobStatus.succeeded)  # noqa: E731
        await ctx["store"].update_job(job.id, succeed)
        await queue.finished(ctx["redis"], job.id, ctx["job_id"])
        return "succeeded"

    store = Store.from_url(s.redis_url)
    worker = Worker(
        functions=[func(run_job, name=queue.TASK, max_tries=1)],
        queue_name=s.queue_name,
        redis_settings=RedisSettings.from_dsn(s.redis_url),
        ctx={
            "settings": s,
            "store": store,
            "worker_id": "w1",
            "limits": (lambda t: limits) if limits else dispatch_shares(s),
        },
        max_jobs=1,
        burst=True,
        poll_delay=0.05,
        handle_signals=False,
    )
    try:
        await worker.main()
    finally:
        await worker.pool.aclose()
        await store.close()
    return started


def queue_count(s: Settings) -> int:
    client = redis.Redis.from_url(s.redis_url)
    try:
        return int(client.zcard(s.queue_name))
    finally:
        client.close()


async def test_one_tenant_backlog_does_not_hold_up_another(api: Api) -> None:
    """Alice queues 5 jobs, then Bob 1, through the API; one worker starts Bob's second."""
    s = replace(api.settings, lease_seconds=2)

    async def submit_as(headers: dict[str, str]) -> str:
        ds = await api.client.post("/v1/datasets", content=ROWS, headers={**headers, **NDJSON})
        spec = {"base_model": "org/model", "dataset_id": ds.json()["id"]}
        job = await api.client.post("/v1/jobs", json=spec, headers=headers)
        assert job.status_code == 201, job.text
        return str(job.json()["id"])

    alice = [await submit_as(ALICE) for _ in range(5)]
    bob = await submit_as(BOB)
    assert queue_count(s) == 6  # what KEDA counts: one entry per live job
    started = await run_one_worker(s)
    assert started[1] == bob, "Bob's only job must be the second to start"
    assert sorted([started[0], *started[2:]]) == sorted(alice)
    assert queue_count(s) == 0
    # The API's own view agrees: every job ran, Bob's started before Alice's second one.
    jobs = {j: (await api.client.get(f"/v1/jobs/{j}", headers=ADMIN)).json() for j in started}
    assert all(j["status"] == "succeeded" for j in jobs.values())
    assert [jobs[j]["started_at"] for j in started] == sorted(
        j["started_at"] for j in jobs.values()
    )


async def test_shares_weight_the_turns_and_priority_orders_a_tenants_own(redis_url: str) -> None:
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    a_jobs = [await submit(store, pool, s, "team-a") for _ in range(6)]
    urgent = await submit(store, pool, s, "team-a", priority=10)
    b_jobs = [await submit(store, pool, s, "team-b") for _ in range(6)]
    tenant = {j.id: "a" for j in [*a_jobs, urgent]} | {j.id: "b" for j in b_jobs}

    started = await run_one_worker(s, limits=None)
    assert started[0] == urgent.id  # highest priority first within team-a
    assert "".join(tenant[j] for j in started[:6]) == "ababab"  # equal shares alternate

    weighted = [await submit(store, pool, s, "team-c") for _ in range(6)]
    weighted += [await submit(store, pool, s, "team-d") for _ in range(6)]
    tenant |= {j.id: "a" if i < 6 else "b" for i, j in enumerate(weighted)}
    heavy = {"team-c": 2.0, "team-d": 1.0}
    limits = dispatch_shares(s)
    order = await run_with(s, lambda t: replace(limits(t), weight=heavy.get(t, 1.0)))
    assert "".join(tenant[j] for j in order[:9]) == "abaabaaba"  # twice team-d's turns
    await store.close()
    await pool.aclose()


async def run_with(s: Settings, limits: Any) -> list[str]:
    """Picks until the queue is empty, each job finished at once, with `limits` per tenant."""
    pool, store, order = await queue.connect(s.redis_url), Store.from_url(s.redis_url), []
    while (picked := await queue.pick(pool, "t", limits, claim_seconds=5)) is not None:
        assert isinstance(picked, queue.Picked)
        order.append(picked.job_id)
        await queue.unclaim(pool, picked)
    await pool.aclose()
    await store.close()
    return order


async def test_jobs_submitted_within_one_millisecond_start_in_submission_order(
    redis_url: str,
) -> None:
    """The spec promises equal priorities start in the order submitted: a fast client submits
    two jobs in the same millisecond, and the second's id sorts first."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    t = int(time.time() * 1000) / 1000 + 0.0001
    first = await submit(store, pool, s, "team-a", now=t, job_id="job_ffff")
    second = await submit(store, pool, s, "team-a", now=t + 0.0004, job_id="job_0000")
    assert int(first.created_at * 1000) == int(second.created_at * 1000)
    order = await run_with(s, dispatch_shares(s))
    assert order == [first.id, second.id]
    await store.close()
    await pool.aclose()


def test_a_changed_tenants_file_changes_the_shares_of_a_running_worker(
    redis_url: str, tmp_path: Path
) -> None:
    """As grants are read for each job: an operator who lowers a tenant's running_jobs sees
    it on every worker, not only on those started after."""
    keys = tmp_path / "tenants.json"
    who = {"key-a": Principal("team-a")}
    write_tenants(keys, who, {"team-a": {"limits": {"running_jobs": 1, "share": 2.0}}})
    limits = dispatch_shares(settings(redis_url, api_keys_file=keys))
    assert limits("team-a") == queue.Share(weight=2.0, max_running=1)
    write_tenants(keys, who, {"team-a": {"limits": {"running_jobs": 3}}})
    assert limits("team-a") == queue.Share(weight=1.0, max_running=3)
    keys.write_text("{not json")  # a bad edit: the last good file stays in force
    assert limits("team-a") == queue.Share(weight=1.0, max_running=3)


async def test_a_tenant_at_its_running_limit_is_passed_over(redis_url: str) -> None:
    s = settings(redis_url, max_running_jobs=1)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    a1, a2 = [await submit(store, pool, s, "team-a") for _ in range(2)]
    b1 = await submit(store, pool, s, "team-b")
    limits = dispatch_shares(s)

    first = await queue.pick(pool, "tok1", limits, claim_seconds=30)
    second = await queue.pick(pool, "tok2", limits, claim_seconds=30)
    assert isinstance(first, queue.Picked) and isinstance(second, queue.Picked)
    assert (first.job_id, second.job_id) == (a1.id, b1.id)
    # team-a has one starting, team-b nothing left: the third worker stays free.
    assert await queue.pick(pool, "tok3", limits, claim_seconds=30) == queue.BLOCKED
    running = lambda j: msgspec.structs.replace(j, status=JobStatus.running)  # noqa: E731
    await store.update_job(a1.id, running)
    await queue.unclaim(pool, first)
    assert await queue.pick(pool, "tok3", limits, claim_seconds=30) == queue.BLOCKED
    done = lambda j: msgspec.structs.replace(j, status=JobStatus.succeeded)  # noqa: E731
    await store.update_job(a1.id, done)
    third = await queue.pick(pool, "tok3", limits, claim_seconds=30)
    assert isinstance(third, queue.Picked) and third.job_id == a2.id
    await store.close()
    await pool.aclose()


async def test_blocked_worker_puts_its_token_back_and_count_stays(redis_url: str) -> None:
    s = settings(redis_url, max_running_jobs=1)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    a1, a2 = [await submit(store, pool, s, "team-a") for _ in range(2)]
    running = lambda j: msgspec.structs.replace(j, status=JobStatus.running)  # noqa: E731
    picked = await queue.pick(pool, f"{a1.id}:0", dispatch_shares(s), claim_seconds=9)
    assert isinstance(picked, queue.Picked)
    await store.update_job(a1.id, running)
    await queue.unclaim(pool, picked)
    # A second worker takes a2's token: team-a is at its limit, so it defers and stays free.
    ctx = {
        "store": store,
        "settings": s,
        "redis": pool,
        "worker_id": "w2",
        "job_id": f"{a2.id}:0",
        "limits": dispatch_shares(s),
    }
    assert await claim_next(ctx) == "deferred"
    await pool.zrem(s.queue_name, f"{a2.id}:0")  # arq ends the token the worker held
    assert queue_count(s) == 2  # a1 running, a2 queued: still two live jobs
    assert (await store.get_job(a2.id, None)).status == JobStatus.queued
    await store.close()
    await pool.aclose()


async def test_cancel_takes_the_job_and_one_token_off(redis_url: str) -> None:
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    a1, a2, a3 = [await submit(store, pool, s, "team-a") for _ in range(3)]
    # A worker took a1's token and picked a1; the user cancels a2 and a1 meanwhile.
    await pool.set(f"arq:in-progress:{a1.id}:0", b"1")  # what arq sets when a worker takes it
    picked = await queue.pick(pool, f"{a1.id}:0", dispatch_shares(s), claim_seconds=9)
    assert isinstance(picked, queue.Picked) and picked.job_id == a1.id
    for job in (a2, a1):
        await cancel_job(job.id, tenant="team-a", store=store, arq=pool, settings=s)
    assert queue_count(s) == 1  # a3's live job, counted by a1's token the worker holds
    ctx = {
        "store": store,
        "settings": s,
        "redis": pool,
        "worker_id": "w1",
        "job_id": f"{a1.id}:0",
        "limits": dispatch_shares(s),
    }
    job = await claim_next(ctx)  # a1 was cancelled under it: the same token starts a3
    assert isinstance(job, Job) and job.id == a3.id and job.status == JobStatus.running
    assert await pool.hgetall(queue.DISPATCHED) == {a3.id.encode(): f"{a1.id}:0".encode()}
    await store.close()
    await pool.aclose()


async def test_reaper_returns_a_claim_whose_worker_died_before_starting(redis_url: str) -> None:
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    # A worker picked it and died before its compare-and-set (the claim lapses at once).
    await pool.set(f"arq:in-progress:{job.id}:0", b"1")
    picked = await queue.pick(pool, f"{job.id}:0", dispatch_shares(s), claim_seconds=0)
    assert isinstance(picked, queue.Picked)
    await leases.reap(store, pool, s)
    tokens = [t.decode() for t in await pool.zrange(s.queue_name, 0, -1)]
    assert len(tokens) == 1 and tokens[0].startswith("dispatch_")  # a fresh token, not the dead one
    assert await pool.exists(f"arq:in-progress:{job.id}:0") == 0
    again = await run_one_worker(s)
    assert again == [job.id]
    await store.close()
    await pool.aclose()


async def test_a_reaper_cut_short_leaves_the_lost_claim_for_its_next_pass(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending the claim and queueing the fresh token are one transaction: a reaper that loses
    its connection in between changes nothing, and the next pass still returns the attempt
    (before, the claim was gone and the queued job had no token: it never started)."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    picked = await queue.pick(pool, f"{job.id}:0", dispatch_shares(s), claim_seconds=0)
    assert isinstance(picked, queue.Picked)

    def lost_connection(*args: Any) -> None:  # while the fresh token's command is built
        raise redis.ConnectionError("lost the connection")

    enqueue_call = queue._enqueue_call
    monkeypatch.setattr(queue, "_enqueue_call", lost_connection)
    with pytest.raises(redis.ConnectionError):
        await leases.reap(store, pool, s)
    assert await queue.lost_claims(pool) == [picked]
    assert await pool.hget(queue.DISPATCHED, job.id) == f"{job.id}:0".encode()

    monkeypatch.setattr(queue, "_enqueue_call", enqueue_call)
    await leases.reap(store, pool, s)
    assert await queue.lost_claims(pool) == []
    assert await run_one_worker(s) == [job.id]
    await store.close()
    await pool.aclose()


async def test_a_claim_whose_worker_started_it_late_keeps_its_token(redis_url: str) -> None:
    """The worker's compare-and-set came after the claim's deadline, and the reaper looked
    before the worker ended the claim: the claim ends, but the running attempt keeps its
    token (a lost worker's re-queue later drops it; KEDA counts the job meanwhile)."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    token = f"{job.id}:0"
    picked = await queue.pick(pool, token, dispatch_shares(s), claim_seconds=0)
    assert isinstance(picked, queue.Picked)
    run = lambda j: msgspec.structs.replace(j, status=JobStatus.running)  # noqa: E731
    await store.update_job(job.id, run)

    await leases.restore_lost_claims(store, pool, s)

    assert await queue.lost_claims(pool) == []
    assert await queue.dispatched(pool, job.id) == token
    assert [t.decode() for t in await pool.zrange(s.queue_name, 0, -1)] == [token]
    await store.close()
    await pool.aclose()


async def test_a_token_whose_worker_died_before_its_pick_is_replaced(redis_url: str) -> None:
    """A worker took a token (arq's in-progress key) and died before it picked an attempt: the
    reaper replaces that token with a fresh one, and leaves alone a token taken just now and one
    whose worker picked."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    for tenant in ("team-a", "team-b", "team-c"):
        await submit(store, pool, s, tenant)
    dead, fresh, picked = [t.decode() for t in await pool.zrange(s.queue_name, 0, -1)]
    # arq's in-progress expiry is job timeout + 10 s (here 100 s); taken 70 s ago / just now.
    await pool.set(f"arq:in-progress:{dead}", b"1", px=30_000)
    await pool.set(f"arq:in-progress:{fresh}", b"1", px=99_000)
    await pool.set(f"arq:in-progress:{picked}", b"1", px=30_000)
    await pool.hset(queue.DISPATCHED, "job_elsewhere", picked)

    dropped = await queue.replace_stranded_tokens(
        pool, queue_name=s.queue_name, in_progress_seconds=100
    )

    assert dropped == [dead]
    tokens = {t.decode() for t in await pool.zrange(s.queue_name, 0, -1)}
    assert dead not in tokens and {fresh, picked} <= tokens and len(tokens) == 3
    assert await pool.exists(f"arq:in-progress:{dead}") == 0
    await store.close()
    await pool.aclose()


async def test_a_token_queued_before_fair_dispatch_still_starts_its_job(redis_url: str) -> None:
    """arq jobs queued by an older API carried (job id, attempt) and have no pending entry."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    await pool.flushall()  # as an older API left it: the job record, an arq job, no pending set
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    await pool.enqueue_job(queue.TASK, job.id, 0, _job_id=f"{job.id}:0", _queue_name=s.queue_name)
    ctx = {
        "store": store,
        "settings": s,
        "redis": pool,
        "worker_id": "w1",
        "job_id": f"{job.id}:0",
        "limits": dispatch_shares(s),
    }
    claimed = await claim_next(ctx, job.id, 0)
    assert isinstance(claimed, Job) and claimed.id == job.id
    await pool.zrem(s.queue_name, f"{job.id}:0")  # arq ends the old token
    assert queue_count(s) == 1  # the running job's token
    await store.close()
    await pool.aclose()


async def test_reaper_replaces_a_token_whose_worker_died_before_picking(redis_url: str) -> None:
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    other = await submit(store, pool, s, "team-b")
    in_progress_ms = int((s.job_timeout_hours * 3600 + 10) * 1000)
    # A worker took job's token 2 minutes ago (arq's in-progress key) and never picked: it
    # died. Another took other's token a second ago and is about to pick: left alone.
    dead, live = f"{job.id}:0", f"{other.id}:0"
    await pool.set(f"arq:in-progress:{dead}", b"1", px=in_progress_ms - 120_000)
    await pool.set(f"arq:in-progress:{live}", b"1", px=in_progress_ms - 1_000)
    await leases.reap(store, pool, s)
    tokens = sorted(t.decode() for t in await pool.zrange(s.queue_name, 0, -1))
    assert len(tokens) == 2 and tokens[0].startswith("dispatch_") and tokens[1] == live
    assert not await pool.exists(f"arq:in-progress:{dead}", f"arq:job:{dead}")
    await store.close()
    await pool.aclose()


async def test_a_stale_entry_of_a_job_running_elsewhere_leaves_its_lease(redis_url: str) -> None:
    """E.g. the reaper returned a claim of a slow but living worker, which then started it."""
    s = settings(redis_url)
    store, pool = Store.from_url(redis_url), await queue.connect(redis_url)
    job = await submit(store, pool, s, "team-a")
    running = lambda j: msgspec.structs.replace(j, status=JobStatus.running)  # noqa: E731
    await store.update_job(job.id, running)
    await store.renew_lease(job.id, "w-other", 30)
    ctx = {
        "store": store,
        "settings": s,
        "redis": pool,
        "worker_id": "w1",
        "job_id": f"{job.id}:0",
        "limits": dispatch_shares(s),
    }
    assert await claim_next(ctx) == "idle"
    assert await store.redis.exists(f"ftune:lease:{job.id}")  # the other worker keeps it
    assert await leases.reap(store, pool, s) == []
    await store.close()
    await pool.aclose()
