"""The OpenAPI contract: exported file up to date, and the app honours it under fuzzing."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.openapi import render
from service.settings import Settings
from tests.fixtures.api import ALICE, Api, LiveServer
from tests.fixtures.hub import HubServer
from tests.fixtures.s3 import S3Server

EXPORTED = Path(__file__).parents[2] / "openapi" / "openapi.json"
FUZZ_EXAMPLES = int(os.environ.get("FTUNE_FUZZ_EXAMPLES", "25"))
"""Cases per operation; raise it to fuzz longer than CI does (`FTUNE_FUZZ_EXAMPLES=500`)."""


@pytest.fixture
def api_settings(api_settings: Settings, hub_server: HubServer, s3_server: S3Server) -> Settings:
    """Fuzzed imports go to the local Hub and S3: a test never waits on the internet."""
    return replace(
        api_settings, hf_endpoint=hub_server.endpoint, s3_endpoint_url=s3_server.endpoint_url
    )


def test_exported_openapi_is_current() -> None:
    assert EXPORTED.read_bytes() == render(), "openapi/openapi.json is stale: run `make openapi`"


def test_every_route_has_an_operation_id() -> None:
    spec = json.loads(render())
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("operationId"), f"{method.upper()} {path} has no operationId"


def test_fuzzed_requests_get_no_server_error_and_match_the_schema(live_api: LiveServer) -> None:
    session = requests.Session()
    auth = {"Authorization": "Bearer key-alice"}
    ds = session.post(
        f"{live_api.url}/v1/datasets",
        params={"name": "fuzz"},
        data=b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n',
        headers={"Authorization": "Bearer key-alice", "Content-Type": "application/x-ndjson"},
    ).json()
    job = session.post(
        f"{live_api.url}/v1/jobs",
        json={"base_model": "org/model", "dataset_id": ds["id"]},
        headers=auth,
    ).json()
    # A finished job: its event stream replays and ends instead of following forever.
    session.post(f"{live_api.url}/v1/jobs/{job['id']}/cancel", headers=auth)
    schema = schemathesis.openapi.from_url(f"{live_api.url}/docs/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(), real_ids=st.booleans())
        def check(case: schemathesis.Case, real_ids: bool) -> None:
            # Half the cases aim at records that exist, so success responses are checked too.
            if real_ids and case.path_parameters:
                for name, value in (("dataset_id", ds["id"]), ("job_id", job["id"])):
                    if name in case.path_parameters:
                        case.path_parameters[name] = value
            case.call_and_validate(
                base_url=live_api.url,
                session=session,
                headers={"Authorization": "Bearer key-alice"},
                checks=checks,
            )

        try:
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


async def test_the_documented_request_examples_are_accepted(api: Api) -> None:
    """The examples a reader copies from the docs work as they are."""
    paths = json.loads(render())["paths"]
    upload = paths["/v1/datasets"]["post"]["requestBody"]["content"]
    for name, example in upload["application/x-ndjson"]["examples"].items():
        r = await api.client.post(
            "/v1/datasets",
            content=example["value"],
            headers={**ALICE, "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 201, (name, r.text)
    for name, example in upload["multipart/form-data"]["examples"].items():
        files = {"file": ("rows.jsonl", example["value"]["file"].encode())}
        r = await api.client.post("/v1/datasets", files=files, headers=ALICE)
        assert r.status_code == 201, (name, r.text)
    feedback = paths["/v1/feedback/{stream}"]["post"]["requestBody"]["content"]
    for name, example in feedback["application/json"]["examples"].items():
        r = await api.client.post(f"/v1/feedback/{name}", json=example["value"], headers=ALICE)
        assert r.status_code == 200, (name, r.text)
