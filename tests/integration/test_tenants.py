"""Tenants: grants at submit and in the worker, quotas and the request rate (429 with the
IETF headers), usage, admins over other tenants' streams and policies, the audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import AsyncTestClient

from service import queue
from service.api.app import create_app
from service.blobs import open_store
from service.contract import Job
from service.publish import hub_token
from service.retraining import runs
from service.settings import Principal, Settings
from service.store import Store, job_key
from tests.fixtures.api import ADMIN, ALICE, BOB, KEYS, Api, auth, write_tenants
from tests.fixtures.hub import HubServer
from tests.fixtures.s3 import S3Server
from tests.integration.test_api_jobs import ROWS, dataset, spec

CAROL = auth("key-carol")
CAROL_GRANTS = {
    "hub_tokens": ["team-c"],
    "hub_namespaces": ["carol-org"],
    "s3_read": ["s3://carol-data/models"],
    "s3_write": ["s3://carol-out/"],
}


def tenants_settings(api_settings: Settings, **grants: dict[str, Any]) -> Settings:
    """The fixture's keys plus carol's, written as a tenants file with `grants` per tenant."""
    path = api_settings.api_keys_file.with_name("tenants.json")  # type: ignore[union-attr]
    keys = {**KEYS, "key-carol": Principal("carol")}
    write_tenants(path, keys, {"carol": CAROL_GRANTS, **grants})
    return replace(api_settings, api_keys_file=path)


@pytest.fixture
async def carol_api(api_settings: Settings) -> AsyncIterator[Api]:
    settings = tenants_settings(api_settings)
    async with AsyncTestClient(create_app(settings)) as client:
        yield Api(client, settings)


def policy(stream: str) -> dict[str, Any]:
    return {
        "stream": stream,
        "template": {"base_model": "org/model"},
        "trigger": {"min_new_pairs": 10},
    }


def hub(repo_id: str, credentials: str | None = None) -> dict[str, Any]:
    dest: dict[str, Any] = {"type": "hub", "repo_id": repo_id}
    if credentials is not None:
        dest["credentials"] = credentials
    return {"destination": dest}


# -- grants at submit --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "grant", "loc"),
    [
        ({"output": hub("carol-org/m", "other")}, "hub_tokens", "credentials"),
        ({"output": hub("carol-org/m")}, "hub_tokens", "credentials"),  # HF_TOKEN not granted
        ({"output": hub("someone-else/m", "team-c")}, "hub_namespaces", "repo_id"),
        ({"output": {"destination": {"type": "s3", "uri": "s3://bob-out/x"}}}, "s3_write", "uri"),
        ({"base_model": "s3://carol-data/models-evil/x"}, "s3_read", "base_model"),
        ({"base_model": "s3://carol-data/models/../secret"}, "s3_read", "base_model"),
    ],
)
async def test_a_job_using_what_its_tenant_was_not_granted_is_403(
    carol_api: Api, extra: dict[str, Any], grant: str, loc: str
) -> None:
    ds = await dataset(carol_api, CAROL)
    resp = await carol_api.client.post("/v1/jobs", json=spec(ds, **extra), headers=CAROL)
    assert resp.status_code == 403, resp.text
    problem = resp.json()
    assert grant in problem["detail"] and problem["errors"][0]["loc"][-1] == loc
    jobs = await carol_api.client.get("/v1/jobs", headers=CAROL)
    assert jobs.json()["items"] == []  # nothing half-stored


async def test_what_was_granted_is_accepted_and_the_store_never_is(
    carol_api: Api, api_settings: Settings
) -> None:
    ds = await dataset(carol_api, CAROL)
    for extra in (
        {"output": hub("carol-org/m", "team-c")},
        {"output": {"destination": {"type": "s3", "uri": "s3://carol-out/run1/"}}},
        {"base_model": "s3://carol-data/models/tiny/"},
    ):
        resp = await carol_api.client.post("/v1/jobs", json=spec(ds, **extra), headers=CAROL)
        assert resp.status_code == 201, (extra, resp.text)
    # Even with every grant, the service's own store is neither a source nor a destination.
    settings = replace(carol_api.settings, store_url="s3://ftune-store/svc")
    async with AsyncTestClient(create_app(settings)) as client:
        body = spec(ds, base_model="s3://ftune-store/svc/jobs/job_x/artifacts/")
        inside = await client.post("/v1/jobs", json=body, headers=ALICE)
        assert inside.status_code == 422 and "own store" in inside.json()["detail"]
        out = {"destination": {"type": "s3", "uri": "s3://ftune-store/svc/datasets/"}}
        inside = await client.post("/v1/jobs", json=spec(ds, output=out), headers=ALICE)
        assert inside.status_code == 422 and "own store" in inside.json()["detail"]


async def test_imports_policies_and_openai_jobs_check_grants_too(carol_api: Api) -> None:
    imported = await carol_api.client.post(
        "/v1/datasets/import", json={"source": "s3://bob-data/prefs.jsonl"}, headers=CAROL
    )
    assert imported.status_code == 403 and "s3_read" in imported.json()["detail"]
    template = {"base_model": "org/model", "output": hub("someone-else/m", "team-c")}
    body = {"stream": "chat", "template": template, "trigger": {"min_new_pairs": 10}}
    policy = await carol_api.client.put("/v1/policies/p", json=body, headers=CAROL)
    assert policy.status_code == 403, policy.text
    where = ["body", "template", "output", "destination", "repo_id"]
    assert policy.json()["errors"][0]["loc"] == where
    upload = await carol_api.client.post(
        "/v1/files",
        files={"file": ("t.jsonl", ROWS)},
        data={"purpose": "fine-tune"},
        headers=CAROL,
    )
    file_id = upload.json()["id"]
    openai = await carol_api.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "s3://bob-data/model/", "training_file": file_id},
        headers=CAROL,
    )
    assert openai.status_code == 403, openai.text
    assert openai.json()["error"]["type"] == "permission_error"


# -- grants in the worker ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"output": hub("carol-org/m", "other")}, "Hub token 'other'"),
        ({"output": hub("elsewhere/m", "team-c")}, "namespace 'elsewhere'"),
        ({"output": {"destination": {"type": "s3", "uri": "s3://stolen/x"}}}, "s3://stolen/x"),
        ({"base_model": "s3://stolen/model/"}, "s3://stolen/model/"),
    ],
)
async def test_a_record_edited_in_redis_fails_in_the_worker_before_any_transfer(
    carol_api: Api,
    hub_server: HubServer,
    s3_server: S3Server,
    tmp_path: Path,
    edit: dict[str, Any],
    says: str,
) -> None:
    from gpu_worker.errors import ConfigError
    from gpu_worker.pipeline import run
    from gpu_worker.reporter import ListReporter

    ds = await dataset(carol_api, CAROL)
    created = await carol_api.client.post("/v1/jobs", json=spec(ds), headers=CAROL)
    job_id = created.json()["id"]
    # Somebody with access to Redis rewrites the queued job's spec.
    r = redis.Redis.from_url(carol_api.settings.redis_url)
    record = json.loads(r.get(job_key(job_id)) or b"")
    record["spec"] = {**record["spec"], **edit}
    r.set(job_key(job_id), json.dumps(record))
    job = msgspec.json.decode(r.get(job_key(job_id)) or b"", type=Job)

    worker = replace(
        carol_api.settings,
        work_dir=tmp_path / "work",
        hf_endpoint=hub_server.endpoint,
        s3_endpoint_url=s3_server.endpoint_url,
    )
    seen = len(hub_server.requests)
    reporter = ListReporter()
    with pytest.raises(ConfigError, match="refused before any download or upload") as failed:
        run(job, tmp_path / "job", reporter, settings=worker, store=open_store(worker.store_url))
    assert says in str(failed.value)
    assert len(hub_server.requests) == seen  # the Hub was never asked anything
    assert not (tmp_path / "job").exists()  # nothing was downloaded
    assert [p.value for p in reporter.phases] == ["preparing"]


async def test_a_granted_hub_token_the_workers_lack_fails_the_job_before_it_trains(
    carol_api: Api, hub_server: HubServer, tmp_path: Path
) -> None:
    """The grant is the tenants file's; the token itself is the workers' environment. A
    deployment that granted a name but never gave the workers its variable (docs/deploy.md)
    would train for hours and fail at the upload; it fails while preparing, saying which
    variable to set."""
    from gpu_worker.errors import ConfigError
    from gpu_worker.pipeline import run
    from gpu_worker.reporter import ListReporter

    ds = await dataset(carol_api, CAROL)
    body = {**spec(ds), "output": hub("carol-org/m", "team-c")}
    created = await carol_api.client.post("/v1/jobs", json=body, headers=CAROL)
    assert created.status_code == 201, created.text
    r = redis.Redis.from_url(carol_api.settings.redis_url)
    job = msgspec.json.decode(r.get(job_key(created.json()["id"])) or b"", type=Job)
    worker = replace(
        carol_api.settings, work_dir=tmp_path / "work", hf_endpoint=hub_server.endpoint
    )
    assert "team-c" not in worker.hf_tokens
    reporter = ListReporter()
    with pytest.raises(ConfigError, match="refused before training") as failed:
        run(job, tmp_path / "job", reporter, settings=worker, store=open_store(worker.store_url))
    assert "set FTUNE_HF_TOKEN_TEAM_C in the workers' environment" in str(failed.value)
    assert [p.value for p in reporter.phases] == ["preparing"] and reporter.points == []
    assert not (tmp_path / "job").exists()  # nothing was downloaded
    # The variable it names is the one the workers' settings read the token from.
    given = Settings.from_env({"FTUNE_HF_TOKEN_TEAM_C": "hf_team_c"})
    assert hub_token(job.spec.output.destination, given) == "hf_team_c"  # type: ignore[arg-type]  # a HubDestination here


# -- quotas and the request rate ---------------------------------------------------------------


def assert_429(resp: Any, limit: str, quota: int) -> None:
    assert resp.status_code == 429, resp.text
    assert f"({limit})" in resp.json()["detail"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["RateLimit-Policy"].startswith(f'"{limit}";q={quota}')
    assert resp.headers["RateLimit"].startswith(f'"{limit}";r=0;t=')


async def test_the_request_rate_is_per_tenant_and_shared_by_replicas(
    api_settings: Settings,
) -> None:
    settings = tenants_settings(api_settings, alice={"limits": {"requests_per_second": 4}})
    app_a, app_b = create_app(settings), create_app(settings)
    async with AsyncTestClient(app_a) as a, AsyncTestClient(app_b) as b:
        answers = await asyncio.gather(
            *(c.get("/v1/jobs", headers=ALICE) for c in (a, b, a, b, a, b, a, b))
        )
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 4 + [429] * 4  # two replicas, one count
        limited = next(r for r in answers if r.status_code == 429)
        assert_429(limited, "requests_per_second", 4)
        assert limited.headers["RateLimit-Policy"] == '"requests_per_second";q=4;w=1'
        sdk = await a.get("/v1/fine_tuning/jobs", headers=ALICE)  # OpenAI's envelope, and
        assert sdk.status_code == 429 and sdk.json()["error"]["type"] == "rate_limit_error"
        assert "x-should-retry" not in sdk.headers  # the SDK may retry after Retry-After
        assert (await b.get("/v1/jobs", headers=BOB)).status_code == 200  # bob is not slowed
        assert (await a.get("/healthz")).status_code == 200  # probes are never counted
        await asyncio.sleep(1.05)
        assert (await a.get("/v1/jobs", headers=ALICE)).status_code == 200


async def test_dataset_stream_and_policy_quotas(api_settings: Settings) -> None:
    limits = {"datasets": 2, "dataset_bytes": 10_000, "feedback_streams": 1, "policies": 1}
    limits |= {"requests_per_second": 1000}
    settings = tenants_settings(api_settings, alice={"limits": limits})
    async with AsyncTestClient(create_app(settings)) as client:
        api = Api(client, settings)
        first = await dataset(api)
        big = b"".join(
            json.dumps({"prompt": f"q{i}" + "x" * 200, "chosen": "a", "rejected": "b"}).encode()
            + b"\n"
            for i in range(60)
        )
        headers = {**ALICE, "Content-Type": "application/x-ndjson"}
        too_big = await client.post("/v1/datasets", content=big, headers=headers)
        assert_429(too_big, "dataset_bytes", 10_000)
        await dataset(api)
        third = await client.post("/v1/datasets", content=ROWS, headers=headers)
        assert_429(third, "datasets", 2)
        assert (await dataset(api, BOB)).startswith("ds_")  # per tenant
        await client.delete(f"/v1/datasets/{first}", headers=ALICE)
        await dataset(api)  # room again

        event = {"id": "e1", "prompt": "p", "chosen": "c", "rejected": "r"}
        ok = await client.post("/v1/feedback/one", json={"events": [event]}, headers=ALICE)
        assert ok.status_code == 200, ok.text
        again = await client.post("/v1/feedback/one", json={"events": [event]}, headers=ALICE)
        assert again.status_code == 200  # the same stream is not a new one
        second = await client.post("/v1/feedback/two", json={"events": [event]}, headers=ALICE)
        assert_429(second, "feedback_streams", 1)

        body = policy("one")
        assert (await client.put("/v1/policies/a", json=body, headers=ALICE)).status_code == 200
        assert (await client.put("/v1/policies/a", json=body, headers=ALICE)).status_code == 200
        assert_429(await client.put("/v1/policies/b", json=body, headers=ALICE), "policies", 1)

        usage = await client.get("/v1/usage", headers=ALICE)
        assert usage.status_code == 200, usage.text
        by_name = {item["name"]: item for item in usage.json()["limits"]}
        assert by_name["datasets"] == {"name": "datasets", "used": 2, "limit": 2}
        assert 0 < by_name["dataset_bytes"]["used"] < 10_000
        assert by_name["feedback_streams"]["used"] == 1
        assert by_name["policies"] == {"name": "policies", "used": 1, "limit": 1}
        assert by_name["queued_jobs"] == {"name": "queued_jobs", "used": 0, "limit": 100}
        assert by_name["requests_per_second"]["limit"] == 1000
        assert by_name["requests_per_second"]["used"] >= 1
        bobs = await client.get("/v1/usage", headers=BOB)
        assert {i["name"]: i["used"] for i in bobs.json()["limits"]}["datasets"] == 1
        peek = await client.get("/v1/usage", params={"tenant": "alice"}, headers=BOB)
        assert peek.status_code == 403


async def test_one_policy_tick_starts_at_most_the_tenants_jobs_per_tick(
    api_settings: Settings,
) -> None:
    settings = tenants_settings(api_settings, alice={"limits": {"jobs_per_policy_tick": 1}})
    async with AsyncTestClient(create_app(settings)) as client:
        events = [
            {"id": f"e{i}", "prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(12)
        ]
        await client.post("/v1/feedback/s", json={"events": events}, headers=ALICE)
        body = {
            "stream": "s",
            "template": {"base_model": "org/model"},
            "trigger": {"min_new_pairs": 5},
            "holdout_fraction": 0.2,
        }
        for name in ("a", "b"):
            resp = await client.put(f"/v1/policies/{name}", json=body, headers=ALICE)
            assert resp.status_code == 200, resp.text
        store = Store.from_url(settings.redis_url)
        pool = await queue.connect(settings.redis_url)
        try:
            blobs = open_store(settings.store_url)
            first = await runs.tick(store, pool, blobs, settings)
            assert sum("fired run" in line for line in first) == 1, first
            second = await runs.tick(store, pool, blobs, settings)
            assert sum("fired run" in line for line in second) == 1, second
        finally:
            await pool.aclose()
            await store.close()
        waiting = await client.get("/v1/policies", headers=ALICE)
        assert all(p["active_run"] for p in waiting.json()["items"])


# -- admins ------------------------------------------------------------------------------------


async def test_admins_see_and_manage_every_tenants_streams_and_policies(api: Api) -> None:
    event = {"id": "e1", "prompt": "p", "chosen": "c", "rejected": "r"}
    for who, name in ((ALICE, "a-stream"), (BOB, "b-stream")):
        resp = await api.client.post(f"/v1/feedback/{name}", json={"events": [event]}, headers=who)
        assert resp.status_code == 200
        body = policy(name)
        assert (await api.client.put(f"/v1/policies/{name}", json=body, headers=who)).is_success

    everyone = await api.client.get("/v1/feedback", headers=ADMIN)
    assert {(s["tenant"], s["name"]) for s in everyone.json()["items"]} == {
        ("alice", "a-stream"),
        ("bob", "b-stream"),
    }
    page = await api.client.get("/v1/policies", params={"limit": 1}, headers=ADMIN)
    assert [p["tenant"] for p in page.json()["items"]] == ["alice"]
    rest = await api.client.get(
        "/v1/policies", params={"limit": 1, "cursor": page.json()["next_cursor"]}, headers=ADMIN
    )
    assert [p["tenant"] for p in rest.json()["items"]] == ["bob"]
    only_bob = await api.client.get("/v1/feedback", params={"tenant": "bob"}, headers=ADMIN)
    assert [s["name"] for s in only_bob.json()["items"]] == ["b-stream"]
    # Alice still sees only her own.
    mine = await api.client.get("/v1/feedback", headers=ALICE)
    assert [s["name"] for s in mine.json()["items"]] == ["a-stream"]

    one = await api.client.get("/v1/feedback/b-stream", params={"tenant": "bob"}, headers=ADMIN)
    assert one.status_code == 200 and one.json()["tenant"] == "bob"
    gone = await api.client.delete("/v1/policies/b-stream", params={"tenant": "bob"}, headers=ADMIN)
    assert gone.status_code == 204
    assert (await api.client.get("/v1/policies/b-stream", headers=BOB)).status_code == 404
    dropped = await api.client.delete(
        "/v1/feedback/b-stream", params={"tenant": "bob"}, headers=ADMIN
    )
    assert dropped.status_code == 204
    assert (await api.client.get("/v1/feedback/b-stream", headers=BOB)).status_code == 404
    for route in ("/v1/feedback", "/v1/jobs", "/v1/datasets", "/v1/policies"):
        nosy = await api.client.get(route, params={"tenant": "bob"}, headers=ALICE)
        assert nosy.status_code == 403, route
    ds_alice, ds_bob = await dataset(api), await dataset(api, BOB)
    listed = await api.client.get("/v1/datasets", params={"tenant": "bob"}, headers=ADMIN)
    assert [d["id"] for d in listed.json()["items"]] == [ds_bob]
    listed = await api.client.get("/v1/datasets", headers=ADMIN)
    assert {d["id"] for d in listed.json()["items"]} == {ds_alice, ds_bob}

    missing = await api.client.get("/v1/policies/nope", params={"tenant": "bob"}, headers=ADMIN)
    assert missing.status_code == 404
    audit = await api.client.get("/v1/audit", params={"limit": 3}, headers=ADMIN)
    assert audit.status_code == 200, audit.text
    newest = audit.json()["items"]
    assert [(e["method"], e["path"], e["status"], e.get("tenant")) for e in newest] == [
        ("GET", "/v1/policies/nope", 404, "bob"),
        ("GET", "/v1/datasets", 200, None),
        ("GET", "/v1/datasets", 200, "bob"),
    ]
    assert all(e["actor"] == "ops" for e in newest)
    older = await api.client.get(
        "/v1/audit", params={"cursor": audit.json()["next_cursor"]}, headers=ADMIN
    )
    entries = [(e["method"], e["path"], e.get("tenant")) for e in older.json()["items"]]
    assert entries[:2] == [
        ("DELETE", "/v1/feedback/b-stream", "bob"),
        ("DELETE", "/v1/policies/b-stream", "bob"),
    ]
    assert ("GET", "/v1/feedback", None) in entries
    assert all(e["actor"] == "ops" for e in older.json()["items"])  # tenants are not audited
    assert (await api.client.get("/v1/audit", headers=ALICE)).status_code == 403


async def test_an_admin_cannot_name_a_tenant_no_tenants_file_can_hold(api: Api) -> None:
    """A ':' would reach into another tenant's Redis keys (they are split on it)."""
    event = {"id": "e1", "prompt": "p", "chosen": "c", "rejected": "r"}
    for name in ("a:b", "bob queued", "alice:"):
        resp = await api.client.post(
            "/v1/feedback/s", params={"tenant": name}, json={"events": [event]}, headers=ADMIN
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["errors"][0]["loc"] == ["query", "tenant"]


async def test_an_admin_cannot_make_records_for_a_tenant_the_file_does_not_hold(api: Api) -> None:
    """A typo in `?tenant=` would otherwise leave a stream or policy no key could ever read."""
    event = {"id": "e1", "prompt": "p", "chosen": "c", "rejected": "r"}
    made = {
        "feedback": await api.client.post(
            "/v1/feedback/s", params={"tenant": "bobb"}, json={"events": [event]}, headers=ADMIN
        ),
        "policy": await api.client.put(
            "/v1/policies/s", params={"tenant": "bobb"}, json=policy("s"), headers=ADMIN
        ),
        "snapshot": await api.client.post(
            "/v1/feedback/s/snapshot", params={"tenant": "bobb"}, headers=ADMIN
        ),
    }
    for what, resp in made.items():
        assert resp.status_code == 422, (what, resp.text)
        assert "'bobb' has no API key" in resp.json()["detail"], what
        assert resp.json()["errors"][0]["loc"] == ["query", "tenant"], what
    everyone = await api.client.get("/v1/feedback", headers=ADMIN)
    assert everyone.json()["items"] == []
    assert (await api.client.get("/v1/policies", headers=ADMIN)).json()["items"] == []
    # A tenant the file holds is still served, and reading an unknown one is harmless.
    ok = await api.client.post(
        "/v1/feedback/s", params={"tenant": "bob"}, json={"events": [event]}, headers=ADMIN
    )
    assert ok.status_code == 200, ok.text
    gone = await api.client.get("/v1/feedback/s", params={"tenant": "bobb"}, headers=ADMIN)
    assert gone.status_code == 404
