"""The tenants file, both forms; what a grant covers; where a tenant's limits come from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service import tenants
from service.blobs import DRAFTS
from service.contract import JobTemplate
from service.settings import Principal, Settings, SettingsError, hash_api_key, write_api_keys

STORE = "s3://svc-store/ftune"


def load(tmp_path: Path, doc: Any) -> tenants.Tenants:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(doc))
    return tenants.load(Settings(api_keys_file=path))


def team(**grants: Any) -> dict[str, Any]:
    return {"keys": [{"sha256": hash_api_key("k")}], "grants": grants}


def template(**fields: Any) -> JobTemplate:
    return msgspec.convert({"base_model": "org/model", **fields}, JobTemplate)


def test_the_old_form_still_works_and_grants_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_api_keys(path, {"k": Principal("search", admin=True)})
    known = tenants.load(Settings(api_keys_file=path))
    assert known.keys == {hash_api_key("k"): Principal("search", admin=True)}
    assert known.grants_of("search") == tenants.Grants()
    assert tenants.load(Settings()) == tenants.Tenants()  # no file: no key at all


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"tenants": {"a": {"keys": [{"sha256": "abc"}]}}}, "must be"),
        ({"tenants": {"a": {"grants": {"s3_read": ["gs://b/x"]}}}}, "is not s3://bucket"),
        ({"tenants": {"a": {"limits": {"queued_jobs": 0}}}}, "must be"),
        ({"tenants": {"a": {"limits": {"unknown": 1}}}}, "must be"),
        ({"tenants": {"a": team(), "b": team()}}, "listed twice"),
        # A ':' would make tenant `acme:queued`'s index of jobs acme's queued ones.
        ({"tenants": {"acme:queued": team()}}, "matching regex"),
        ({hash_api_key("k"): {"tenant": "acme:queued"}}, "matching regex"),
    ],
)
def test_a_malformed_tenants_file_is_named(tmp_path: Path, doc: Any, says: str) -> None:
    with pytest.raises(SettingsError, match=f"FTUNE_API_KEYS_FILE .*{says}"):
        load(tmp_path, doc)


def test_limits_are_the_tenants_own_else_the_defaults(tmp_path: Path) -> None:
    doc = {"tenants": {"a": {**team(), "limits": {"queued_jobs": 3, "share": 2.5}}}}
    known = load(tmp_path, doc)
    settings = replace(Settings(), max_policies=7)
    mine = tenants.limits_for(settings, known, "a")
    assert (mine.queued_jobs, mine.share, mine.policies) == (3, 2.5, 7)
    other = tenants.limits_for(settings, known, "nobody")
    assert (other.queued_jobs, other.share, other.running_jobs) == (100, 1.0, None)


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("s3://data/models", True),
        ("s3://data/models/", True),
        ("s3://data/models/llama/", True),
        ("s3://data/models-old/llama/", False),  # a prefix ends at a '/'
        ("s3://data/models/../secrets/", False),
        ("s3://data/", False),
        ("s3://other/models/", False),
    ],
)
def test_an_s3_grant_covers_its_prefix_only(tmp_path: Path, uri: str, allowed: bool) -> None:
    known = load(tmp_path, {"tenants": {"a": team(s3_read=["s3://data/models"])}})
    spec = template(base_model=uri if uri.endswith("/") else uri + "/")
    if allowed:
        tenants.check_job(known, "a", spec, STORE)
    else:
        with pytest.raises(tenants.GrantMissing) as refused:
            tenants.check_job(known, "a", spec, STORE)
        assert refused.value.grant == "s3_read" and refused.value.status == 403


def test_the_store_is_never_a_source_or_destination_even_with_every_grant(
    tmp_path: Path,
) -> None:
    every = team(hub_tokens=["*"], hub_namespaces=["*"], s3_read=["*"], s3_write=["*"])
    known = load(tmp_path, {"tenants": {"a": every}})
    tenants.check_job(known, "a", template(base_model="s3://svc-store/elsewhere/"), STORE)
    for spec in (
        template(base_model="s3://svc-store/ftune/jobs/job_1/artifacts/"),
        template(base_model=f"s3://svc-store/ftune/{DRAFTS}0123abcd-0"),  # an upload's draft
        template(output={"destination": {"type": "s3", "uri": "s3://svc-store/ftune/x"}}),
    ):
        with pytest.raises(tenants.GrantMissing) as refused:
            tenants.check_job(known, "a", spec, STORE)
        assert refused.value.status == 422 and "own store" in refused.value.detail


def test_hub_tokens_and_namespaces(tmp_path: Path) -> None:
    grants = team(hub_tokens=["HF_TOKEN", "team"], hub_namespaces=["acme"])
    known = load(tmp_path, {"tenants": {"a": grants}})
    ok = [{"repo_id": "acme/m"}, {"repo_id": "acme/m", "credentials": "team"}]
    for dest in ok:
        out = {"destination": {"type": "hub", **dest}}
        tenants.check_job(known, "a", template(output=out), STORE)
    for dest, grant in (
        ({"repo_id": "acme/m", "credentials": "other"}, "hub_tokens"),
        ({"repo_id": "acme-evil/m"}, "hub_namespaces"),
    ):
        out = {"destination": {"type": "hub", **dest}}
        with pytest.raises(tenants.GrantMissing) as refused:
            tenants.check_job(known, "a", template(output=out), STORE)
        assert refused.value.grant == grant


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380/1", "unix:///run/r.sock"])
def test_the_rate_limiter_accepts_every_redis_url_the_settings_do(url: str) -> None:
    from service.api.limits import rate_limiter
    from service.store import Store

    assert rate_limiter(Store.from_url(url), url) is not None  # unix:// is not taken as Valkey


def test_a_process_with_a_malformed_tenants_file_does_not_start(tmp_path: Path) -> None:
    """The workers and the scheduler read the grants too: they refuse to start, as the API
    does, rather than fail every job later."""
    from typer.testing import CliRunner

    from service.cli.app import app

    bad = tmp_path / "tenants.json"
    bad.write_text(json.dumps({"tenants": {"a": {"grants": {"s3_write": ["bucket"]}}}}))
    result = CliRunner().invoke(app, ["scheduler"], env={"FTUNE_API_KEYS_FILE": str(bad)})
    assert result.exit_code == 2, result.output
    assert "is not s3://bucket[/prefix]" in result.stderr


def test_an_init_from_adapter_in_s3_needs_s3_read_and_is_never_in_the_store(
    tmp_path: Path,
) -> None:
    known = load(tmp_path, {"tenants": {"a": team(s3_read=["s3://data/adapters"])}})
    tenants.check_job(known, "a", template(init_from={"adapter": "s3://data/adapters/sft/"}), STORE)
    tenants.check_job(known, "a", template(init_from={"adapter": "hf://org/sft"}), STORE)
    # Another tenant's artifact in the store is reached through init_from.job_id, which checks
    # the tenant; a path into the store would skip that.
    for uri, status in [
        ("s3://data/other/", 403),
        ("s3://svc-store/ftune/jobs/job_1/artifacts/adapter/", 422),
    ]:
        with pytest.raises(tenants.GrantMissing) as refused:
            tenants.check_job(known, "a", template(init_from={"adapter": uri}), STORE)
        assert refused.value.status == status
        assert refused.value.loc == ["body", "init_from", "adapter"]
