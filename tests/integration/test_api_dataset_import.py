"""Datasets imported by reference from the (local) Hub and S3: streamed and validated exactly
like an upload, with the service's own store never a source."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from litestar.testing import AsyncTestClient

from service.api.app import create_app
from service.blobs import DRAFTS
from service.settings import Settings
from tests.fixtures.api import ALICE, Api
from tests.fixtures.hub import USER, HubServer
from tests.fixtures.s3 import S3Server

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


def gz(name: str) -> bytes:
    return gzip.compress((FIXTURES / name).read_bytes())


def parquet(name: str) -> bytes:
    rows = [json.loads(line) for line in (FIXTURES / name).open()]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
async def importer(
    api_settings: Settings, hub_server: HubServer, s3_server: S3Server
) -> AsyncIterator[Api]:
    settings = replace(
        api_settings,
        hf_endpoint=hub_server.endpoint,
        hf_tokens={"": hub_server.read_token},
        s3_endpoint_url=s3_server.endpoint_url,
    )
    async with AsyncTestClient(create_app(settings)) as client:
        yield Api(client, settings)


async def post_import(api: Api, **body: Any) -> Any:
    return await api.client.post("/v1/datasets/import", json=body, headers=ALICE)


@pytest.fixture
def hh_repo(hub_server: HubServer) -> str:
    """A dataset repo laid out like Anthropic/hh-rlhf: one folder per subset, gzipped JSONL."""
    repo = f"{USER}/hh-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        repo,
        {
            "README.md": b"# test data\n",
            "harmless-base/train.jsonl.gz": gz("hh.jsonl"),
            "harmless-base/test.jsonl.gz": gz("trl_implicit.jsonl"),
            "helpful-base/train.jsonl.gz": gzip.compress(
                (FIXTURES / "hh.jsonl").read_bytes().splitlines(keepends=True)[0]
            ),
        },
    )
    return repo


async def test_import_a_hub_subset_folder_and_split(importer: Api, hh_repo: str) -> None:
    resp = await post_import(
        importer,
        source=f"hf://datasets/{hh_repo}/harmless-base",
        split="train",
        on_invalid="skip",
        max_invalid_fraction=0.5,
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["rows"], ds["skipped_rows"], ds["source_format"], ds["compressed"]) == (
        2,
        1,
        "hh",
        True,
    )
    assert ds["name"] == f"{hh_repo.split('/')[1]}-harmless-base train"
    rows = (await importer.client.get(f"/v1/datasets/{ds['id']}/rows", headers=ALICE)).json()
    assert rows["rows"][1]["prompt"] == [
        {"role": "user", "content": "What is the boiling point of water at sea level?"}
    ]


async def test_import_a_split_across_files_numbers_rows_on(importer: Api, hh_repo: str) -> None:
    """Without a folder, the split is every train file (as load_dataset does), in name order;
    lines count on from one file to the next."""
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}")
    assert resp.status_code == 422
    assert [(e["line"], e["field"]) for e in resp.json()["errors"]] == [(2, "rejected")]
    resp = await post_import(
        importer, source=f"hf://datasets/{hh_repo}", on_invalid="skip", max_invalid_fraction=0.5
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["rows"] == 3  # 2 of harmless-base/train, 1 of helpful-base/train


async def test_import_parquet_shards_of_a_named_split_at_a_revision(
    importer: Api, hub_server: HubServer
) -> None:
    repo = f"{USER}/uf-{uuid.uuid4().hex[:8]}"
    first = hub_server.seed_dataset(
        repo,
        {
            "data/train_prefs-00000-of-00001.parquet": parquet("ultrafeedback.jsonl"),
            "data/train_sft-00000-of-00001.parquet": parquet("trl_implicit.jsonl"),
        },
    )
    hub_server.seed_dataset(
        repo, {"data/train_prefs-00000-of-00001.parquet": parquet("axolotl_intel.jsonl")}
    )
    resp = await post_import(
        importer, source=f"hf://datasets/{repo}", split="train_prefs", revision=first
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["source_format"]) == ("parquet", "ultrafeedback")
    latest = await post_import(importer, source=f"hf://datasets/{repo}", split="train_prefs")
    assert latest.json()["source_format"] == "intel"

    missing = await post_import(importer, source=f"hf://datasets/{repo}")
    assert missing.status_code == 422
    assert missing.json()["detail"] == (
        f"source: hf://datasets/{repo} has no data files for split 'train'; splits found: "
        "train_prefs, train_sft"
    )


async def test_import_errors_say_what_is_wrong(importer: Api, hh_repo: str) -> None:
    resp = await post_import(importer, source=f"hf://datasets/{USER}/no-such-set")
    assert resp.status_code == 422 and "was not found on the Hub" in resp.json()["detail"]
    assert resp.json()["errors"] == [{"msg": resp.json()["detail"], "loc": ["body", "source"]}]
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", revision="nope")
    assert resp.status_code == 422 and "revision 'nope'" in resp.json()["detail"]
    resp = await post_import(importer, source="https://example.com/data.jsonl")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "source"]


async def test_import_an_s3_object(importer: Api, s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="exports/prefs.jsonl.gz", Body=gz("medicalgpt.jsonl"))
    resp = await post_import(importer, source=f"s3://{s3_bucket}/exports/prefs.jsonl.gz")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["name"], ds["source_format"], ds["rows"]) == ("prefs.jsonl.gz", "medicalgpt", 2)
    assert ds["source_bytes"] == len(gz("medicalgpt.jsonl"))

    resp = await post_import(importer, source=f"s3://{s3_bucket}/exports/missing.jsonl")
    assert resp.status_code == 422
    assert (
        resp.json()["detail"]
        == f"source: there is no object at s3://{s3_bucket}/exports/missing.jsonl"
    )


async def test_the_service_store_is_never_a_source(
    api_settings: Settings, s3_server: S3Server, s3_bucket: str
) -> None:
    """Another tenant's datasets live under the store's prefix: importing them is refused."""
    settings = replace(
        api_settings, store_url=f"s3://{s3_bucket}/ftune", s3_endpoint_url=s3_server.endpoint_url
    )
    s3_server.client().put_object(
        Bucket=s3_bucket,
        Key="ftune/datasets/abc.jsonl",
        Body=b'{"prompt":"p","chosen":"c","rejected":"r"}\n',
    )
    async with AsyncTestClient(create_app(settings)) as client:
        api = Api(client, settings)
        refused = await post_import(api, source=f"s3://{s3_bucket}/ftune/datasets/abc.jsonl")
        assert refused.status_code == 422
        assert "inside the service's own store" in refused.json()["detail"]
        # Nor an upload's draft, staged under the store's drafts/ before it is committed.
        draft = f"ftune/{DRAFTS}0123abcd-0"
        s3_server.client().put_object(
            Bucket=s3_bucket, Key=draft, Body=b'{"prompt":"p","chosen":"c","rejected":"r"}\n'
        )
        refused = await post_import(api, source=f"s3://{s3_bucket}/{draft}")
        assert refused.status_code == 422
        assert "inside the service's own store" in refused.json()["detail"]
        # A sibling prefix that merely starts the same is somebody's own data.
        s3_server.client().put_object(
            Bucket=s3_bucket,
            Key="ftune-exports/abc.jsonl",
            Body=b'{"prompt":"p","chosen":"c","rejected":"r"}\n',
        )
        ok = await post_import(api, source=f"s3://{s3_bucket}/ftune-exports/abc.jsonl")
        assert ok.status_code == 201, ok.text


async def test_a_name_the_hub_cannot_have_is_a_422(importer: Api) -> None:
    resp = await post_import(importer, source="hf://datasets/org/name.")
    assert resp.status_code == 422, resp.text
    assert "not a valid Hub dataset name" in resp.json()["detail"]
