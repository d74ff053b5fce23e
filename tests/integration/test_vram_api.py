"""A job that cannot fit the workers' GPUs is refused at submit with what it needs (422)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.settings import Settings
from tests.fixtures.api import ALICE, Api
from tests.integration.test_api_jobs import dataset, queued_attempts, spec


@pytest.fixture
async def gpu24(api_settings: Settings) -> AsyncIterator[Api]:
    """The API of a service whose workers have 24 GB GPUs."""
    settings = replace(api_settings, worker_gpu_memory_gb=24.0)
    async with AsyncTestClient(create_app(settings)) as client:
        yield Api(client, settings)


async def test_a_job_too_big_for_the_workers_is_refused_saying_what_it_needs(gpu24: Api) -> None:
    ds = await dataset(gpu24)
    resp = await gpu24.client.post(
        "/v1/jobs", json=spec(ds, base_model="meta-llama/Llama-2-70b-hf"), headers=ALICE
    )
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert "GB" in problem["detail"] and "24 GB" in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", "base_model"]
    assert queued_attempts(gpu24) == []  # nothing was queued


async def test_jobs_that_fit_or_cannot_be_judged_are_accepted(gpu24: Api) -> None:
    ds = await dataset(gpu24)
    for model in ("meta-llama/Llama-2-7b-hf", "org/mystery-model"):
        resp = await gpu24.client.post("/v1/jobs", json=spec(ds, base_model=model), headers=ALICE)
        assert resp.status_code == 201, resp.text


async def test_gradient_checkpointing_off_can_be_what_makes_a_job_not_fit(gpu24: Api) -> None:
    ds = await dataset(gpu24)
    body = spec(
        ds,
        base_model="Qwen/Qwen2.5-14B-Instruct",
        hyperparameters={"gradient_checkpointing": False, "max_length": 2048},
    )
    resp = await gpu24.client.post("/v1/jobs", json=body, headers=ALICE)
    assert resp.status_code == 422, resp.text
    body["hyperparameters"] = {"gradient_checkpointing": True, "max_length": 2048}
    resp = await gpu24.client.post("/v1/jobs", json=body, headers=ALICE)
    assert resp.status_code == 201, resp.text


async def test_without_a_configured_limit_nothing_is_refused(api: Api) -> None:
    ds = await dataset(api)
    resp = await api.client.post(
        "/v1/jobs", json=spec(ds, base_model="meta-llama/Llama-2-70b-hf"), headers=ALICE
    )
    assert resp.status_code == 201, resp.text


async def test_the_estimate_route_says_what_a_submit_would_compare(gpu24: Api) -> None:
    small = {"base_model": "meta-llama/Llama-2-7b-hf"}
    resp = await gpu24.client.post("/v1/jobs/estimate", json=small, headers=ALICE)
    assert resp.status_code == 200, resp.text
    fits = resp.json()
    assert fits["fits"] is True and fits["gpu_memory_gb"] == 24.0
    assert 3 < fits["total_gb"] < 24 and fits["architecture"]
    assert abs(sum(fits["parts_gb"].values()) - fits["total_gb"]) < 0.05
    big = {"base_model": "meta-llama/Llama-2-70b-hf"}
    resp = await gpu24.client.post("/v1/jobs/estimate", json=big, headers=ALICE)
    assert resp.json()["fits"] is False and resp.json()["total_gb"] > 24
    # The same spec is refused at submit: the estimate and the check agree.
    ds = await dataset(gpu24)
    refused = await gpu24.client.post("/v1/jobs", json=spec(ds, **big), headers=ALICE)
    assert refused.status_code == 422


async def test_an_estimate_of_an_unknown_shape_says_so_and_bad_specs_are_refused(
    gpu24: Api,
) -> None:
    resp = await gpu24.client.post(
        "/v1/jobs/estimate", json={"base_model": "org/mystery-model"}, headers=ALICE
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["total_gb"] is None and resp.json()["fits"] is None
    assert "unknown" in resp.json()["summary"]
    bad = {"base_model": "org/m", "hyperparameters": {"beta": -1}}
    resp = await gpu24.client.post("/v1/jobs/estimate", json=bad, headers=ALICE)
    assert resp.status_code == 422 and "beta" in resp.text
    resp = await gpu24.client.post("/v1/jobs/estimate", json={"base_model": "org/m"})
    assert resp.status_code == 401


async def test_with_four_gpus_per_worker_an_fsdp_job_is_estimated_per_gpu(
    api_settings: Settings,
) -> None:
    settings = replace(api_settings, worker_gpu_memory_gb=24.0, worker_gpus=4)
    async with AsyncTestClient(create_app(settings)) as client:
        api = Api(client, settings)
        big = {"base_model": "meta-llama/Llama-2-70b-hf"}
        fsdp = {**big, "parallelism": {"strategy": "fsdp"}}
        resp = await client.post("/v1/jobs/estimate", json=fsdp, headers=ALICE)
        assert resp.status_code == 200, resp.text
        assert resp.json()["fits"] is True
        assert resp.json()["summary"].startswith("per GPU of 4 (fsdp): about 15")
        ds = await dataset(api)
        refused = await client.post("/v1/jobs", json=spec(ds, **big), headers=ALICE)
        assert refused.status_code == 422
        assert "parallelism.strategy 'fsdp'" in refused.json()["detail"]
        accepted = await client.post("/v1/jobs", json=spec(ds, **fsdp), headers=ALICE)
        assert accepted.status_code == 201, accepted.text
        bad = {**big, "parallelism": {"strategy": "fsdp"}, "quantization": {"bits": 8}}
        resp = await client.post("/v1/jobs/estimate", json=bad, headers=ALICE)
        assert resp.status_code == 422 and "LLM.int8" in resp.text
