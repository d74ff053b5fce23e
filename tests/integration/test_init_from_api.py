"""`init_from` at submit: which earlier jobs a job may continue, refused with the field named."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.contract import Artifact, Job, JobStatus, Lora
from service.store import Store
from tests.fixtures.api import ALICE, BOB, Api
from tests.integration.test_api_jobs import dataset, spec
from tests.integration.test_policies import (
    ACC,
    Loop,
    events,
    feed,
    get,
    loop,  # noqa: F401 (the fixture)
    policy_body,
    put,
    stage_adapter,
)


async def _finished(
    api: Api, headers: dict[str, str], status: JobStatus, kinds: tuple[str, ...], **extra: Any
) -> str:
    """A job of the caller's, moved to `status` with artifacts of `kinds` (what a worker does)."""
    created = await api.client.post(
        "/v1/jobs", json=spec(await dataset(api, headers), **extra), headers=headers
    )
    assert created.status_code == 201, created.text
    job_id = str(created.json()["id"])
    artifacts = [
        Artifact(kind=k, uri=f"s3://bucket/runs/{job_id}/{k}/", files=[], sha256={})  # type: ignore[arg-type]
        for k in kinds
    ]

    def finish(job: Job) -> Job:
        return msgspec.structs.replace(job, status=status, artifacts=artifacts)

    store = Store.from_url(api.settings.redis_url)
    await store.update_job(job_id, finish)
    await store.close()
    return job_id


async def test_a_job_continues_an_earlier_jobs_adapter(api: Api) -> None:
    first = await _finished(api, ALICE, JobStatus.succeeded, ("adapter", "merged"), lora={"r": 8})
    ds = await dataset(api)
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, init_from={"job_id": first}, lora={"r": 8}), headers=ALICE
    )
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["init_adapter"] == f"s3://bucket/runs/{first}/adapter/"
    assert job["spec"]["init_from"] == {"job_id": first, "adapter": None}
    # lora may be left out: the adapter keeps its own settings.
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, init_from={"job_id": first}), headers=ALICE
    )
    assert resp.status_code == 201, resp.text
    # An hf:// or s3:// adapter is taken as given (the worker checks its base model).
    ref = "hf://acme/sft-adapter@v2/adapter"
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, init_from={"adapter": ref}), headers=ALICE
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["init_adapter"] == ref


async def test_init_from_is_refused_naming_the_field(api: Api) -> None:
    ds = await dataset(api)
    running = await _finished(api, ALICE, JobStatus.running, ())
    merged_only = await _finished(api, ALICE, JobStatus.succeeded, ("merged",))
    other_base = await _finished(
        api, ALICE, JobStatus.succeeded, ("adapter",), base_model="Qwen/Qwen2.5-0.5B-Instruct"
    )
    fine = await _finished(api, ALICE, JobStatus.succeeded, ("adapter",))
    bobs = await _finished(api, BOB, JobStatus.succeeded, ("adapter",))
    cases: list[tuple[dict[str, Any], list[str], str]] = [
        ({"job_id": "job_missing"}, ["init_from", "job_id"], "does not exist"),
        ({"job_id": bobs}, ["init_from", "job_id"], "does not exist"),  # another tenant's
        ({"job_id": running}, ["init_from", "job_id"], "is running"),
        ({"job_id": merged_only}, ["init_from", "job_id"], "published only a merged model"),
        ({"job_id": other_base}, ["init_from", "job_id"], "Qwen/Qwen2.5-0.5B-Instruct"),
        ({}, ["body", "init_from"], "exactly one of job_id and adapter"),
        ({"adapter": "file:///etc/adapter"}, ["body", "init_from", "adapter"], "match"),
    ]
    for init_from, loc, words in cases:
        resp = await api.client.post("/v1/jobs", json=spec(ds, init_from=init_from), headers=ALICE)
        assert resp.status_code == 422, (init_from, resp.text)
        problem = resp.json()
        full_loc = loc if loc[0] == "body" else ["body", *loc]
        assert [e["loc"] for e in problem["errors"]] == [full_loc], problem
        assert words in problem["errors"][0]["msg"], problem
    # The adapter's own LoRA settings win: a different `lora` would silently do nothing.
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, init_from={"job_id": fine}, lora={"r": 64}), headers=ALICE
    )
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "lora"]
    resp = await api.client.post(
        "/v1/jobs",
        json=spec(ds, init_from={"adapter": "s3://bucket/a/"}, lora={"r": 64}),
        headers=ALICE,
    )
    assert resp.status_code == 422 and "leave lora out" in resp.text
    assert Lora().r == 16  # the default the rule compares with


async def test_a_policy_continues_its_promoted_adapter(
    api: Api,
    loop: Loop,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    body = policy_body(init_from_promoted=True)
    body["gate"] = {"at_least": {ACC: 0.5}}
    assert (await put(api, "p", body)).status_code in (200, 201)
    await feed(api, "chat", events(0, 10))
    await loop.tick()
    first = (await get(api, "p"))["runs"][0]
    job = (await api.client.get(f"/v1/jobs/{first['job_id']}", headers=ALICE)).json()
    assert job["init_adapter"] is None and job["spec"]["init_from"] is None  # nothing promoted
    adapter = stage_adapter(loop, first["job_id"], tmp_path)
    await loop.finish(first["job_id"], metrics={ACC: 1.0}, artifacts=[adapter])
    await loop.tick()
    assert (await get(api, "p"))["promoted"]["job_id"] == first["job_id"]
    # Past the retention period the promoted job's record is gone; the policy's record of its
    # promoted run is enough.
    assert first["job_id"] in await loop.store.forget_finished(time.time() + 1)

    await feed(api, "chat", events(10, 20))
    [line] = await loop.tick()
    assert "fired run 2" in line
    second = (await get(api, "p"))["runs"][0]
    job = (await api.client.get(f"/v1/jobs/{second['job_id']}", headers=ALICE)).json()
    assert job["spec"]["init_from"] == {"job_id": first["job_id"], "adapter": None}
    assert job["init_adapter"] == adapter.uri


@pytest.mark.parametrize("artifacts", ["adapter", "both"])
async def test_a_policy_may_continue_its_promoted_adapter(api: Api, artifacts: str) -> None:
    body = {
        "stream": "chat",
        "template": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "trigger": {"min_new_pairs": 10},
        "init_from_promoted": True,
    }
    body["template"] = {**body["template"], "output": {"artifacts": artifacts}}  # type: ignore[dict-item]
    resp = await api.client.put("/v1/policies/p1", json=body, headers=ALICE)
    assert resp.status_code in (200, 201), resp.text
    body["template"] = {**body["template"], "output": {"artifacts": "merged"}}  # type: ignore[dict-item]
    resp = await api.client.put("/v1/policies/p2", json=body, headers=ALICE)
    assert resp.status_code == 422 and "init_from_promoted" in resp.text
