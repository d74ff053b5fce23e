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
        f"split: hf://datasets/{repo} has no data files for split 'train'; splits found: "
        "train_prefs, train_sft"
    )


async def test_import_errors_say_what_is_wrong(importer: Api, hh_repo: str) -> None:
    resp = await post_import(importer, source=f"hf://datasets/{USER}/no-such-set")
    assert resp.status_code == 422 and "was not found on the Hub" in resp.json()["detail"]
    assert resp.json()["errors"] == [{"msg": resp.json()["detail"], "loc": ["body", "source"]}]
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", revision="nope")
    assert resp.status_code == 422 and "commit 'nope'" in resp.json()["detail"]
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

    intel = (FIXTURES / "axolotl_intel.jsonl").read_bytes()
    client.put_object(Bucket=s3_bucket, Key="team exports/prefs 2024.jsonl", Body=intel)
    spaced = await post_import(importer, source=f"s3://{s3_bucket}/team exports/prefs 2024.jsonl")
    assert spaced.status_code == 201, spaced.text
    assert (spaced.json()["name"], spaced.json()["rows"]) == ("prefs 2024.jsonl", 2)

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


CARD = b"""---
license: mit
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train-*.jsonl
  - split: test
    path: "en/holdout/*.jsonl"
- config_name: zh
  default: true
  data_dir: zh
  data_files: "*.jsonl"
---
# A set with two subsets
"""


@pytest.fixture
def configs_repo(hub_server: HubServer) -> str:
    """A repo whose README card lists two configs, one marked default, with file names the
    split-name rules alone would not find."""
    repo = f"{USER}/cfg-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        repo,
        {
            "README.md": CARD,
            "en/train-00000.jsonl": (FIXTURES / "trl_implicit.jsonl").read_bytes(),
            "en/train-00001.jsonl": (FIXTURES / "medicalgpt.jsonl").read_bytes(),
            "en/holdout/v2.jsonl": (FIXTURES / "axolotl_intel.jsonl").read_bytes(),
            "en/train-extra/ignored.jsonl": (FIXTURES / "hh.jsonl").read_bytes(),
            "zh/prefs.jsonl": (FIXTURES / "ultrafeedback.jsonl").read_bytes(),
        },
    )
    return repo


async def test_import_follows_the_configs_of_the_readme_card(
    importer: Api, configs_repo: str
) -> None:
    """As load_dataset: the default config's files only (never every subset merged), a named
    config's split by its data_files globs (``*`` within a folder), data_dir as their base."""
    source = f"hf://datasets/{configs_repo}"
    default = await post_import(importer, source=source)
    assert default.status_code == 201, default.text
    assert (default.json()["rows"], default.json()["source_format"]) == (2, "ultrafeedback")
    assert default.json()["name"] == f"{configs_repo.split('/')[1]} train"

    en = await post_import(importer, source=source, config="en")
    assert en.status_code == 201, en.text
    assert en.json()["rows"] == 5  # 3 + 2 rows of the two shards; not train-extra/
    assert en.json()["name"] == f"{configs_repo.split('/')[1]}-en train"
    held = await post_import(importer, source=source, config="en", split="test")
    assert (held.status_code, held.json()["source_format"]) == (201, "intel")


async def test_import_config_and_split_errors_name_the_field(
    importer: Api, configs_repo: str, hh_repo: str
) -> None:
    source = f"hf://datasets/{configs_repo}"
    resp = await post_import(importer, source=source, config="fr")
    assert resp.status_code == 422
    assert resp.json()["detail"] == (
        f"config: {source} has no config 'fr'; its README declares en, zh"
    )
    assert resp.json()["errors"][0]["loc"] == ["body", "config"]
    resp = await post_import(importer, source=source, config="en", split="validation")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "split"]
    assert "has no split 'validation'; its splits: train, test" in resp.json()["detail"]
    resp = await post_import(importer, source=f"{source}/en", config="en")
    assert resp.status_code == 422 and "not both" in resp.json()["detail"]

    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", config="en")
    assert resp.status_code == 422 and "declares no configs" in resp.json()["detail"]
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", split="dev")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "split"]
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", revision="nope")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "revision"]
    assert resp.json()["detail"] == (
        f"revision: hf://datasets/{hh_repo} has no branch, tag or commit 'nope'"
    )
    resp = await post_import(importer, source=f"hf://datasets/{hh_repo}", revision="")
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["loc"] == ["body", "revision"]


async def test_a_card_with_configs_but_no_default_asks_for_one(
    importer: Api, hub_server: HubServer
) -> None:
    repo = f"{USER}/two-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        repo,
        {
            "README.md": b"---\nconfigs:\n- config_name: a\n  data_files: a.jsonl\n"
            b"- config_name: b\n  data_dir: b\n---\n",
            "a.jsonl": (FIXTURES / "trl_implicit.jsonl").read_bytes(),
            "b/train.jsonl": (FIXTURES / "medicalgpt.jsonl").read_bytes(),
            "b/test.jsonl": (FIXTURES / "hh.jsonl").read_bytes(),
        },
    )
    resp = await post_import(importer, source=f"hf://datasets/{repo}")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "config"]
    assert "declares configs a, b in its README; choose one with config" in resp.json()["detail"]
    b = await post_import(importer, source=f"hf://datasets/{repo}", config="b")  # data_dir only
    assert (b.status_code, b.json()["source_format"]) == (201, "medicalgpt"), b.text

    # Two defaults (one marked, one named so): load_dataset refuses it; so do we, unless named.
    both = f"{USER}/both-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        both,
        {
            "README.md": b"---\nconfigs:\n- config_name: default\n  data_files: a.jsonl\n"
            b"- config_name: b\n  default: true\n  data_dir: b\n---\n",
            "a.jsonl": (FIXTURES / "trl_implicit.jsonl").read_bytes(),
            "b/train.jsonl": (FIXTURES / "medicalgpt.jsonl").read_bytes(),
        },
    )
    resp = await post_import(importer, source=f"hf://datasets/{both}")
    assert resp.status_code == 422 and resp.json()["errors"][0]["loc"] == ["body", "config"]
    assert "makes both 'default' and 'b' its default config" in resp.json()["detail"]
    b = await post_import(importer, source=f"hf://datasets/{both}", config="b")
    assert (b.status_code, b.json()["source_format"]) == (201, "medicalgpt"), b.text


async def test_import_reads_file_names_as_load_dataset_does(
    importer: Api, hub_server: HubServer
) -> None:
    """A lone data file is the train split; `training/` and `dev.*` name train and
    validation; metadata and hidden files are never rows; a config's data_dir may start
    with ./ and its patterns may hold character classes."""
    intel = (FIXTURES / "axolotl_intel.jsonl").read_bytes()
    lone = f"{USER}/lone-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(lone, {"data.jsonl": intel, ".hidden/x.jsonl": b"not rows"})
    resp = await post_import(importer, source=f"hf://datasets/{lone}")
    assert (resp.status_code, resp.json().get("rows")) == (201, 2), resp.text

    named = f"{USER}/named-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        named,
        {"training/part1.jsonl": intel, "dev.jsonl": (FIXTURES / "medicalgpt.jsonl").read_bytes()},
    )
    resp = await post_import(importer, source=f"hf://datasets/{named}")
    assert (resp.status_code, resp.json().get("source_format")) == (201, "intel"), resp.text
    resp = await post_import(importer, source=f"hf://datasets/{named}", split="validation")
    assert (resp.status_code, resp.json().get("source_format")) == (201, "medicalgpt"), resp.text

    card = b"---\nconfigs:\n- config_name: default\n  data_dir: ./sub\n  data_files:\n"
    card += b"  - split: train\n    path: 'shard-0[0-9].json*'\n---\n"
    shaped = f"{USER}/shaped-{uuid.uuid4().hex[:8]}"
    hub_server.seed_dataset(
        shaped,
        {
            "README.md": card,
            "sub/shard-01.jsonl": intel,
            "sub/shard-x1.jsonl": b"not rows",
            "sub/shard-02.json": json.dumps([json.loads(x) for x in intel.splitlines()]).encode(),
        },
    )
    resp = await post_import(importer, source=f"hf://datasets/{shaped}")
    assert (resp.status_code, resp.json().get("rows")) == (201, 4), resp.text  # not shard-x1
