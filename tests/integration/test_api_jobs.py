"""Jobs over HTTP: validation, tenancy, idempotency, cancel, pagination, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import AsyncTestClient

from service import queue
from service import store as store_module
from service.api.app import create_app
from service.contract import Job, MetricPoint
from service.settings import Settings
from service.store import Store, job_key, new_id
from tests.fixtures.api import ADMIN, ALICE, BOB, Api

ROWS = b"".join(
    json.dumps({"prompt": f"q{i}", "chosen": "short.", "rejected": "long long long."}).encode()
    + b"\n"
    for i in range(4)
)


async def dataset(api: Api, headers: dict[str, str] = ALICE) -> str:
    resp = await api.client.post(
        "/v1/datasets",
        content=ROWS,
        params={"name": "d"},
        headers={**headers, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def spec(ds: str, **extra: object) -> dict[str, object]:
    return {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset_id": ds, **extra}


def queued_attempts(api: Api) -> list[str]:
    r = redis.Redis.from_url(api.settings.redis_url)
    return [m.decode() for m in r.zrange(api.settings.queue_name, 0, -1)]


async def test_submit_queues_the_job_once(api: Api) -> None:
    ds = await dataset(api)
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, labels={"team": "search"}), headers=ALICE
    )
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["attempt"] == 0 and job["tenant"] == "alice"
    assert job["dataset"]["id"] == ds and job["dataset"]["rows"] == 4
    assert job["spec"]["hyperparameters"]["beta"] == 0.1  # defaults filled in
    assert queued_attempts(api) == [f"{job['id']}:0"]
    got = await api.client.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert got.json() == job


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"hyperparameters": {"beta": 0}}, ["body", "hyperparameters", "beta"]),
        ({"hyperparameters": {"learning_rate": 2}}, ["body", "hyperparameters", "learning_rate"]),
        ({"lora": {"r": 0}}, ["body", "lora", "r"]),
        ({"hyperparameters": {"max_length": 8}}, ["body", "hyperparameters", "max_length"]),
        ({"quantization": {"bits": 3}}, ["body", "quantization", "bits"]),
        ({"hyperparamters": {}}, ["body"]),
        (
            {"output": {"destination": {"type": "hub", "repo_id": "no slash"}}},
            ["body", "output", "destination", "repo_id"],
        ),
        ({"hyperparameters": {"loss_type": "exo_pair"}}, ["body", "hyperparameters"]),
        ({"base_model": "not a model"}, ["body"]),
    ],
    ids=[
        "beta",
        "lr",
        "lora-r",
        "max-length",
        "bits",
        "unknown-field",
        "repo-id",
        "exo-pair-needs-smoothing",
        "model-ref",
    ],
)
async def test_bad_specs_answer_422_saying_where(
    api: Api, patch: dict[str, object], loc: list[str]
) -> None:
    ds = await dataset(api)
    resp = await api.client.post("/v1/jobs", json={**spec(ds), **patch}, headers=ALICE)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["errors"][0]["loc"][: len(loc)] == loc, problem
    assert queued_attempts(api) == []


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"hyperparameters": {"label_smoothing": 0.1}}, "label_smoothing"),  # sigmoid ignores it
        ({"hyperparameters": {"loss_type": "aot_pair"}}, "loss_type"),  # not in TRL 1.16
        ({"hyperparameters": {"loss_type": "sft", "beta": 0.5}}, "beta"),
        ({"hyperparameters": {"max_steps": 10, "num_epochs": 3}}, "num_epochs"),
        ({"eval_fraction": 0, "hyperparameters": {"eval_steps": 5}}, "eval_steps"),
    ],
    ids=["smoothing-sigmoid", "aot-pair", "beta-sft", "epochs-and-steps", "eval-steps-no-eval"],
)
async def test_settings_that_would_do_nothing_are_refused_naming_the_field(
    api: Api, patch: dict[str, object], field: str
) -> None:
    ds = await dataset(api)
    resp = await api.client.post("/v1/jobs", json={**spec(ds), **patch}, headers=ALICE)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert field in problem["detail"], problem
    assert queued_attempts(api) == []


async def test_the_refusal_says_what_to_change(api: Api) -> None:
    ds = await dataset(api)
    patch = {"hyperparameters": {"label_smoothing": 0.1}}
    resp = await api.client.post("/v1/jobs", json={**spec(ds), **patch}, headers=ALICE)
    (error,) = resp.json()["errors"]
    assert error["loc"] == ["body", "hyperparameters"]
    assert error["msg"] == (
        "label_smoothing has no effect with loss_type 'sigmoid' (TRL reads it only in exo_pair, "
        "robust, aot and aot_unpaired): set label_smoothing to 0, or use loss_type 'robust' to "
        "train on noisy preference labels"
    )


async def test_bf16_with_float16_compute_is_refused_naming_both(api: Api) -> None:
    """bf16 autocast does no loss scaling, which float16 activations need."""
    ds = await dataset(api)
    body = spec(ds, hyperparameters={"bf16": True}, quantization={"compute_dtype": "float16"})
    resp = await api.client.post("/v1/jobs", json=body, headers=ALICE)
    assert resp.status_code == 422, resp.text
    assert "hyperparameters.bf16 and quantization.compute_dtype 'float16'" in resp.text
    assert queued_attempts(api) == []
    fp16_alone = spec(ds, quantization={"compute_dtype": "float16"})
    assert (await api.client.post("/v1/jobs", json=fp16_alone, headers=ALICE)).status_code == 201


async def test_model_outside_models_dir_and_foreign_dataset_are_refused(api: Api) -> None:
    ds = await dataset(api)
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, base_model="file:///etc/passwd"), headers=ALICE
    )
    assert resp.status_code == 422 and "models dir" in resp.json()["detail"]
    # Inside it but not there (a typo): said now, not when a worker fails to load it.
    models = api.settings.models_dir
    typo = spec(ds, base_model=f"file://{models}/tinny")
    resp = await api.client.post("/v1/jobs", json=typo, headers=ALICE)
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["loc"] == ["body", "base_model"]
    assert f"no config.json in {models}/tinny" in resp.json()["detail"]
    (models / "tiny").mkdir()
    (models / "tiny" / "config.json").write_text("{}")
    there = spec(ds, base_model=f"file://{models}/tiny")
    assert (await api.client.post("/v1/jobs", json=there, headers=ALICE)).status_code == 201
    bobs = await dataset(api, BOB)
    resp = await api.client.post("/v1/jobs", json=spec(bobs), headers=ALICE)
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["loc"] == ["body", "dataset_id"]
    assert len(queued_attempts(api)) == 1  # the one whose model is there


async def test_idempotency_key_returns_the_first_job(api: Api) -> None:
    ds = await dataset(api)
    headers = {**ALICE, "Idempotency-Key": "abc"}
    first = await api.client.post("/v1/jobs", json=spec(ds), headers=headers)
    again = await api.client.post("/v1/jobs", json=spec(ds), headers=headers)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = await api.client.post("/v1/jobs", json=spec(ds, eval_fraction=0.1), headers=headers)
    assert other.status_code == 409
    assert len(queued_attempts(api)) == 1


async def test_cancel_queued_then_conflict(api: Api) -> None:
    ds = await dataset(api)
    job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
    nosy = await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=BOB)
    # Named, and just as for a job that does not exist at all: bob learns nothing of alice's.
    assert (nosy.status_code, nosy.json()["detail"]) == (404, f"job {job['id']} does not exist")
    missing = await api.client.get("/v1/jobs/job_nosuch", headers=BOB)
    assert missing.json()["detail"] == "job job_nosuch does not exist"
    resp = await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    assert queued_attempts(api) == []
    again = await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    # the dataset is free again once no live job uses it
    assert (await api.client.delete(f"/v1/datasets/{ds}", headers=ALICE)).status_code == 204


async def test_dataset_in_use_cannot_be_deleted(api: Api) -> None:
    ds = await dataset(api)
    await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)
    resp = await api.client.delete(f"/v1/datasets/{ds}", headers=ALICE)
    assert resp.status_code == 409 and "live jobs" in resp.json()["detail"]


async def test_list_filters_and_pages(api: Api) -> None:
    ds = await dataset(api)
    ids = []
    for i in range(5):
        labels = {"team": "a" if i % 2 else "b"}
        resp = await api.client.post("/v1/jobs", json=spec(ds, labels=labels), headers=ALICE)
        ids.append(resp.json()["id"])
    await api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=ALICE)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/jobs", params=params, headers=ALICE)).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    queued = (await api.client.get("/v1/jobs", params={"status": "queued"}, headers=ALICE)).json()
    assert [j["id"] for j in queued["items"]] == ids[1:][::-1]
    team_a = (await api.client.get("/v1/jobs", params={"label": "team=a"}, headers=ALICE)).json()
    assert [j["id"] for j in team_a["items"]] == [ids[3], ids[1]]
    assert (await api.client.get("/v1/jobs", headers=BOB)).json()["items"] == []
    assert len((await api.client.get("/v1/jobs", headers=ADMIN)).json()["items"]) == 5
    bad = await api.client.get("/v1/jobs", params={"status": "nope"}, headers=ALICE)
    assert bad.status_code == 400


async def test_a_label_filter_few_jobs_match_reads_a_bounded_share_per_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that only the oldest job matches does not read the whole index in one
    request: each page looks at LABEL_SCAN records, and the cursor leads on to the match."""
    monkeypatch.setattr(store_module, "LABEL_SCAN", 3)
    ds = await dataset(api)
    ids = []
    for i in range(8):
        labels = {"team": "a" if i == 0 else "b"}
        resp = await api.client.post("/v1/jobs", json=spec(ds, labels=labels), headers=ALICE)
        ids.append(resp.json()["id"])
    pages, cursor = [], None
    while True:
        params = {"label": "team=a", "limit": 5, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/jobs", params=params, headers=ALICE)).json()
        pages.append([j["id"] for j in page["items"]])
        if (cursor := page["next_cursor"]) is None:
            break
    assert pages == [[], [], [ids[0]]]  # 3 + 3 + 2 records looked at


async def test_a_label_filter_reads_label_page_records_a_round_trip(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LABEL_PAGE records (100) however small the page: a page of 1 read 4 records a round
    trip, and OpenAI's SDK listing a tenant's jobs by metadata took one per 4 jobs."""
    monkeypatch.setattr(store_module, "LABEL_PAGE", 10)
    ds = await dataset(api)
    for i in range(40):
        labels = {"team": "a" if i == 0 else "b"}
        resp = await api.client.post("/v1/jobs", json=spec(ds, labels=labels), headers=ALICE)
        assert resp.status_code == 201
    r = redis.Redis.from_url(api.settings.redis_url)
    r.config_resetstat()
    page = await api.client.get("/v1/jobs", params={"label": "team=a", "limit": 1}, headers=ALICE)
    stats = r.info("commandstats")
    r.close()
    assert len(page.json()["items"]) == 1
    assert stats["cmdstat_mget"]["calls"] == 4  # 40 records, 10 a round trip


async def test_metrics_since_step(api: Api) -> None:
    ds = await dataset(api)
    job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
    store = Store.from_url(api.settings.redis_url)
    for step in (1, 2, 3):
        point = MetricPoint(step=step, time=time.time(), values={"loss": 1 / step})
        await store.add_metrics(job["id"], point)
    await store.close()
    resp = await api.client.get(
        f"/v1/jobs/{job['id']}/metrics", params={"since_step": 2}, headers=ALICE
    )
    assert [p["step"] for p in resp.json()["points"]] == [2, 3]
    assert resp.json()["points"][0]["values"] == {"loss": 0.5}


async def test_a_poll_for_new_metrics_reads_only_them(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long job's series holds up to 100,000 points: `since_step` near its end reads a page,
    not the whole stream, and a whole read goes a page at a time. A resumed job's steps go
    back; the points of the attempt it replaced are left out from where they fall behind."""
    monkeypatch.setattr(store_module, "METRICS_PAGE", 4)
    ds = await dataset(api)
    job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
    store = Store.from_url(api.settings.redis_url)
    steps = [*range(1, 31), *range(25, 33)]  # resumed from a checkpoint at step 24
    for step in steps:
        point = MetricPoint(step=step, time=time.time(), values={"loss": 1 / step})
        await store.add_metrics(job["id"], point)
    await store.close()
    r = redis.Redis.from_url(api.settings.redis_url)

    async def read(since: int) -> tuple[list[int], int]:
        r.config_resetstat()
        resp = await api.client.get(
            f"/v1/jobs/{job['id']}/metrics", params={"since_step": since}, headers=ALICE
        )
        assert resp.status_code == 200, resp.text
        calls = r.info("commandstats")["cmdstat_xrevrange"]["calls"]
        return [p["step"] for p in resp.json()["points"]], calls

    assert await read(31) == ([31, 32], 1)
    assert await read(26) == ([26, 27, 28, 29, 30, 31, 32], 2)
    assert await read(0) == (steps, 10)  # 38 points, 4 a page
    r.close()


async def test_racing_cancels_and_updates_lose_nothing(api: Api) -> None:
    ds = await dataset(api)
    job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
    store = Store.from_url(api.settings.redis_url)

    def bump(j):  # type: ignore[no-untyped-def]
        import msgspec

        return msgspec.structs.replace(
            j, latest_metrics={**j.latest_metrics, str(len(j.latest_metrics)): 1.0}
        )

    await asyncio.gather(*(store.update_job(job["id"], bump) for _ in range(20)))
    final = await store.get_job(job["id"], None)
    await store.close()
    assert len(final.latest_metrics) == 20


async def test_a_tenant_at_its_queued_job_limit_gets_429(api_settings: Settings) -> None:
    async with AsyncTestClient(create_app(replace(api_settings, max_queued_jobs=2))) as client:
        api = Api(client, api_settings)
        ds = await dataset(api)
        ids = []
        for seed in range(2):
            body = spec(ds, hyperparameters={"seed": seed})
            ids.append((await client.post("/v1/jobs", json=body, headers=ALICE)).json()["id"])
        over = await client.post("/v1/jobs", json=spec(ds), headers=ALICE)
        assert over.status_code == 429, over.text
        assert "2 queued jobs, the limit (queued_jobs) is 2" in over.json()["detail"]
        assert over.headers["Retry-After"] == "60"
        assert over.headers["RateLimit-Policy"] == '"queued_jobs";q=2'
        assert over.headers["RateLimit"] == '"queued_jobs";r=0;t=60'
        other = await client.post("/v1/jobs", json=spec(await dataset(api, BOB)), headers=BOB)
        assert other.status_code == 201  # the limit is per tenant
        await client.post(f"/v1/jobs/{ids[0]}/cancel", headers=ALICE)
        again = await client.post("/v1/jobs", json=spec(ds), headers=ALICE)
        assert again.status_code == 201, again.text


def stored_keys(api: Api) -> set[str]:
    """Every key in Redis but the rate limiter's and the datasets': what a submit writes."""
    r = redis.Redis.from_url(api.settings.redis_url)
    return {k.decode() for k in r.keys("*") if b":rate" not in k and b":ds" not in k}


async def test_a_refused_submit_stores_nothing_and_queues_nothing(api_settings: Settings) -> None:
    async with AsyncTestClient(create_app(replace(api_settings, max_queued_jobs=1))) as client:
        api = Api(client, api_settings)
        ds = await dataset(api)
        first = await client.post("/v1/jobs", json=spec(ds), headers=ALICE)
        assert first.status_code == 201, first.text
        before = stored_keys(api)
        r = redis.Redis.from_url(api_settings.redis_url)
        queue_before = r.zrange(api_settings.queue_name, 0, -1)
        over = await client.post("/v1/jobs", json=spec(ds), headers=ALICE)
        assert over.status_code == 429, over.text
        missing = await client.post(
            "/v1/jobs", json=spec("ds_000000000000000000000000"), headers=ALICE
        )
        assert missing.status_code == 422, missing.text
        assert stored_keys(api) == before  # no record, index entry, event or token
        assert r.zrange(api_settings.queue_name, 0, -1) == queue_before
        listed = await client.get("/v1/jobs", headers=ALICE)
        assert [j["id"] for j in listed.json()["items"]] == [first.json()["id"]]


async def test_concurrent_submits_never_pass_the_queued_job_limit(api_settings: Settings) -> None:
    async with AsyncTestClient(create_app(replace(api_settings, max_queued_jobs=5))) as client:
        api = Api(client, api_settings)
        ds = await dataset(api)
        answers = await asyncio.gather(
            *(client.post("/v1/jobs", json=spec(ds), headers=ALICE) for _ in range(20))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [201] * 5 + [429] * 15
        created = {a.json()["id"] for a in answers if a.status_code == 201}
        assert {a.split(":")[0] for a in queued_attempts(api)} == created


async def test_a_failure_before_the_token_is_queued_leaves_no_record(api: Api) -> None:
    """The record and its dispatch token go to Redis in one MULTI/EXEC: a failure while the
    token's command is being built (here a lost connection) leaves neither."""
    ds = await dataset(api)
    store = Store.from_url(api.settings.redis_url)
    try:
        job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
        record = msgspec.json.decode(json.dumps(job).encode(), type=Job)
        fresh = msgspec.structs.replace(record, id=new_id("job"))

        def token(pipe: Any, key: str) -> None:
            queue.enqueue_in(pipe, fresh, queue_name=api.settings.queue_name, requires=key)
            raise redis.ConnectionError("lost the connection")

        with pytest.raises(redis.ConnectionError):
            await store.create_job(fresh, then=token)
        assert await store.redis.exists(job_key(fresh.id)) == 0
        assert {a.split(":")[0] for a in queued_attempts(api)} == {job["id"]}
        assert not [k for k in stored_keys(api) if fresh.id in k]  # no record, no events
        listed = await api.client.get("/v1/jobs", headers=ALICE)
        assert [j["id"] for j in listed.json()["items"]] == [job["id"]]  # in no index
    finally:
        await store.close()


async def test_a_submit_wakes_idle_workers_and_a_refused_one_does_not(
    api_settings: Settings,
) -> None:
    """The wake-up is published by the enqueue script in the submit's transaction: once for a
    queued job, never for a submit refused at the queued-jobs limit."""
    async with AsyncTestClient(create_app(replace(api_settings, max_queued_jobs=1))) as client:
        api = Api(client, api_settings)
        ds = await dataset(api)
        listener = redis.asyncio.Redis.from_url(api_settings.redis_url)
        pubsub = listener.pubsub()
        try:
            await pubsub.subscribe(queue.wake_channel(api_settings.queue_name))
            await pubsub.get_message(timeout=1)  # the subscription's confirmation
            job = (await client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
            heard = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert heard is not None and heard["data"].decode() == f"{job['id']}:0"
            over = await client.post("/v1/jobs", json=spec(ds), headers=ALICE)
            assert over.status_code == 429
            assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
        finally:
            await pubsub.aclose()
            await listener.aclose()
