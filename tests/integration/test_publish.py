"""publish() against real destinations: a file:// store, moto's S3 server and the local Hub.

What a user notices: the files land where the spec says, byte for byte as the manifest says, the
model card tells the Hub what the model is, a private repo stays private, the "both" layout
loads with transformers and peft, and a failure says what to fix without leaking a credential.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from service.blobs import open_store
from service.contract import Artifact, DatasetRef, Job, JobSpec, JobStatus
from service.publish import PublishError, publish
from service.settings import Settings
from tests.fixtures.hub import HubServer
from tests.fixtures.s3 import S3Server

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATASET_SHA = hashlib.sha256(b"rows").hexdigest()
METRICS = {"loss": 0.3455, "rewards/accuracies": 1.0, "rewards/margins": 2.5, "eval_loss": 0.41}


def make_job(destination: dict[str, Any], *, artifacts: str = "adapter") -> Job:
    spec = msgspec.convert(
        {
            "base_model": HUB_BASE,
            "dataset_id": "ds_abc",
            "hyperparameters": {"beta": 0.2, "learning_rate": 1e-3, "max_steps": 30},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "output": {"artifacts": artifacts, "destination": destination},
        },
        JobSpec,
    )
    now = time.time()
    return Job(
        id=f"job_{uuid.uuid4().hex[:12]}",
        tenant="team-a",
        status=JobStatus.running,
        spec=spec,
        dataset=DatasetRef(id="ds_abc", sha256=DATASET_SHA, rows=64, format="standard"),
        created_at=now,
        updated_at=now,
    )


def fake_adapter(path: Path, job: Job, *, big_bytes: int = 0) -> Path:
    """An adapter folder as the pipeline leaves it (weights need not be real for uploading)."""
    path.mkdir(parents=True)
    config = {"base_model_name_or_path": "/work/ftune/models/base", "peft_type": "LORA", "r": 8}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(big_bytes or 4096))
    (path / "spec.json").write_bytes(msgspec.json.encode(job.spec))
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.5}\n')
    (path / "README.md").write_text("peft's own template card, to be replaced\n")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    data: dict[str, Any] = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    return data


def assert_matches_manifest(artifact: Artifact, blobs: dict[str, bytes]) -> dict[str, Any]:
    """Every uploaded file is in the artifact with the manifest's sha256 and size."""
    assert sorted(blobs) == artifact.files
    manifest = json.loads(blobs["manifest.json"])
    assert set(manifest["files"]) == set(artifact.files) - {"manifest.json"}
    for rel, data in blobs.items():
        assert artifact.sha256[rel] == sha256(data), rel
        if rel != "manifest.json":
            assert manifest["files"][rel] == {"sha256": sha256(data), "size": len(data)}
    return manifest


# ---------------------------------------------------------------------------- store


def test_publish_to_the_store_writes_manifest_and_card(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    job = make_job({"type": "store"})
    prefix = f"jobs/{job.id}/artifacts/adapter/"
    store.put_bytes(prefix + "stale-from-attempt-1.bin", b"old")
    src = fake_adapter(tmp_path / "adapter", job)

    artifact = publish(
        src, kind="adapter", job=job, settings=Settings(), store=store, final_metrics=METRICS
    )

    assert artifact.kind == "adapter"
    assert artifact.uri == f"{store.url}/{prefix}"
    blobs = {key.removeprefix(prefix): store.get_bytes(key) for key in store.list(prefix)}
    assert "stale-from-attempt-1.bin" not in blobs  # the prefix mirrors the artifact
    manifest = assert_matches_manifest(artifact, blobs)
    assert {"spec.json", "metrics.jsonl", "README.md", "adapter_config.json"} <= set(blobs)
    assert manifest["job_id"] == job.id and manifest["dataset_sha256"] == DATASET_SHA

    # The adapter now names its Hub base, not the worker's local path.
    assert json.loads(blobs["adapter_config.json"])["base_model_name_or_path"] == HUB_BASE
    card = blobs["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE
    assert meta["library_name"] == "peft"
    assert {"dpo", "qlora", "trl"} <= set(meta["tags"])
    assert meta["datasets"] == [f"sha256:{DATASET_SHA}"]
    for text in ("| beta | 0.2 |", "| learning_rate | 0.001 |", "| r | 8 |", "q_proj, v_proj"):
        assert text in card
    assert "| bits | 4 |" in card and "| quant_type | nf4 |" in card
    assert "| rewards/accuracies | 1 |" in card and "| loss | 0.3455 |" in card
    assert "| rows | 64 |" in card
    assert 'PeftModel.from_pretrained(base, "./model")' in card


def test_nothing_to_publish_is_a_publish_error(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    job = make_job({"type": "store"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="missing or empty"):
        publish(
            tmp_path / "empty",
            kind="merged",
            job=job,
            settings=Settings(),
            store=store,
            final_metrics={},
        )


# ---------------------------------------------------------------------------- S3


def test_publish_to_s3_uploads_big_files_in_parts(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    job = make_job({"type": "s3", "uri": f"s3://{s3_bucket}/runs/exp1/"}, artifacts="merged")
    src = fake_adapter(tmp_path / "merged", job, big_bytes=9 * 1024 * 1024)  # > 8 MiB chunk
    settings = Settings(s3_endpoint_url=s3_server.endpoint_url)
    service_store = open_store(f"file://{tmp_path / 'store'}")

    artifact = publish(
        src, kind="merged", job=job, settings=settings, store=service_store, final_metrics=METRICS
    )

    assert artifact.uri == f"s3://{s3_bucket}/runs/exp1/merged/"
    client = s3_server.client()
    prefix = "runs/exp1/merged/"
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]
    blobs = {
        obj["Key"].removeprefix(prefix): client.get_object(Bucket=s3_bucket, Key=obj["Key"])[
            "Body"
        ].read()
        for obj in listed
    }
    assert_matches_manifest(artifact, blobs)
    assert {obj["Key"].removeprefix(prefix): obj["Size"] for obj in listed} == {
        rel: len(data) for rel, data in blobs.items()
    }
    big = client.head_object(Bucket=s3_bucket, Key=prefix + "adapter_model.safetensors")
    assert big["ContentLength"] == 9 * 1024 * 1024
    assert big["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    assert service_store.list("") == []  # nothing went to the service's own store
    client.close()


def test_s3_missing_bucket_says_so_without_leaking_keys(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access_key, secret_key = "AKIAFTUNESECRET0001", "ftune/SECRET+key/do-not-print-0123456789"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    job = make_job({"type": "s3", "uri": f"s3://{bucket}/x"})
    src = fake_adapter(tmp_path / "adapter", job)

    with pytest.raises(PublishError) as caught:
        publish(
            src,
            kind="adapter",
            job=job,
            settings=Settings(s3_endpoint_url=s3_server.endpoint_url),
            store=open_store(f"file://{tmp_path / 'store'}"),
            final_metrics={},
        )

    message = str(caught.value)
    assert f"bucket '{bucket}' does not exist" in message
    assert "output.destination.uri" in message
    assert access_key not in message and secret_key not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ---------------------------------------------------------------------------- Hub


def hub_settings(hub: HubServer, **tokens: str) -> Settings:
    return Settings(hf_endpoint=hub.endpoint, hf_tokens=tokens or {"": hub.token})


def test_publish_to_the_hub_creates_a_private_repo_and_commits(
    hub_server: HubServer, hub_repo_id: str, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    job = make_job({"type": "hub", "repo_id": hub_repo_id, "private": True})
    src = fake_adapter(tmp_path / "adapter", job)
    requests_before = len(hub_server.requests)

    artifact = publish(
        src,
        kind="adapter",
        job=job,
        settings=hub_settings(hub_server),
        store=open_store(f"file://{tmp_path / 'store'}"),
        final_metrics=METRICS,
    )

    assert artifact.uri == f"hf://{hub_repo_id}"
    repo = hub_server.repos[hub_repo_id]
    assert repo["private"] is True
    assert_matches_manifest(artifact, repo["files"])
    meta = front_matter(repo["files"]["README.md"].decode())
    assert {"dpo", "qlora", "trl"} <= set(meta["tags"])
    assert meta["library_name"] == "peft" and meta["base_model"] == HUB_BASE
    assert hub_server.commit_messages(hub_repo_id)[0] == f"ftune job {job.id}: upload adapter"
    # Every request carried the configured token ...
    made = hub_server.requests[requests_before:]
    assert {r.path for r in made} >= {"/api/repos/create", f"/api/models/{hub_repo_id}/commit/main"}
    assert all(r.token == hub_server.token for r in made)
    # ... and without one the repo is invisible.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.endpoint, token=False).model_info(hub_repo_id)


def test_hub_named_credentials(hub_server: HubServer, hub_repo_id: str, tmp_path: Path) -> None:
    job = make_job({"type": "hub", "repo_id": hub_repo_id, "credentials": "team-b"})
    store = open_store(f"file://{tmp_path / 'store'}")
    src = fake_adapter(tmp_path / "adapter", job)

    # A variable name holds no '-': the name's '-' is a '_' there.
    with pytest.raises(PublishError, match="FTUNE_HF_TOKEN_TEAM_B") as caught:
        publish(
            src,
            kind="adapter",
            job=job,
            settings=hub_settings(hub_server, other="x" * 20),
            store=store,
            final_metrics={},
        )
    assert "no HF token named 'team-b'" in str(caught.value)
    assert hub_repo_id not in hub_server.repos  # failed before touching the Hub

    # What FTUNE_HF_TOKEN_TEAM_B gives the settings: the name "team_b".
    settings = hub_settings(hub_server, **{"team_b": hub_server.token, "": "hf_" + "0" * 30})
    publish(src, kind="adapter", job=job, settings=settings, store=store, final_metrics={})
    assert "adapter_config.json" in hub_server.repos[hub_repo_id]["files"]


@pytest.mark.parametrize(
    ("which", "repo_exists", "expected"),
    [
        ("wrong", False, "rejected the token in HF_TOKEN"),
        ("read-only", False, "may not write to"),
        ("read-only", True, "may not write to"),
    ],
)
def test_hub_bad_token_is_a_publish_error_without_the_token(
    hub_server: HubServer,
    hub_repo_id: str,
    tmp_path: Path,
    which: str,
    repo_exists: bool,
    expected: str,
) -> None:
    token = "hf_WrongTokenDoNotPrint0123456789" if which == "wrong" else hub_server.read_token
    if repo_exists:
        hub_server.create_repo(hub_repo_id, private=True)
    job = make_job({"type": "hub", "repo_id": hub_repo_id})
    src = fake_adapter(tmp_path / "adapter", job)

    with pytest.raises(PublishError) as caught:
        publish(
            src,
            kind="adapter",
            job=job,
            settings=Settings(hf_endpoint=hub_server.endpoint, hf_tokens={"": token}),
            store=open_store(f"file://{tmp_path / 'store'}"),
            final_metrics={},
        )

    message = str(caught.value)
    assert expected in message and hub_repo_id in message
    assert token not in message
    assert caught.value.__cause__ is None
    assert hub_server.repos.get(hub_repo_id, {"files": {}})["files"] == {}  # nothing committed


def test_hub_revision_other_than_main_goes_to_that_branch(
    hub_server: HubServer, hub_repo_id: str, tmp_path: Path
) -> None:
    job = make_job({"type": "hub", "repo_id": hub_repo_id, "revision": "exp-1"})
    artifact = publish(
        fake_adapter(tmp_path / "adapter", job),
        kind="adapter",
        job=job,
        settings=hub_settings(hub_server),
        store=open_store(f"file://{tmp_path / 'store'}"),
        final_metrics={},
    )
    assert artifact.uri == f"hf://{hub_repo_id}@exp-1"
    _, files = hub_server.resolve(hub_repo_id, "exp-1")
    assert set(artifact.files) == set(files)
    assert hub_server.repos[hub_repo_id]["files"] == {}  # main untouched
    assert 'revision="exp-1"' in files["README.md"].decode()


def test_hub_refuses_to_put_a_private_model_in_an_existing_public_repo(
    hub_server: HubServer, hub_repo_id: str, tmp_path: Path
) -> None:
    hub_server.create_repo(hub_repo_id, private=False)
    job = make_job({"type": "hub", "repo_id": hub_repo_id, "private": True})
    with pytest.raises(PublishError, match="exists and is public"):
        publish(
            fake_adapter(tmp_path / "adapter", job),
            kind="adapter",
            job=job,
            settings=hub_settings(hub_server),
            store=open_store(f"file://{tmp_path / 's'}"),
            final_metrics={},
        )
    assert hub_server.repos[hub_repo_id]["files"] == {}


def test_hub_both_layout_loads_with_transformers_and_peft(
    hub_server: HubServer, hub_repo_id: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Merged model at the repo root, adapter under adapter/: both load from a download."""
    import torch
    from huggingface_hub import snapshot_download
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_worker.merge import merge_adapter

    job = make_job({"type": "hub", "repo_id": hub_repo_id, "private": True}, artifacts="both")
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    merge_adapter(tiny_model_dir, adapter, merged, dtype="float32")
    for folder in (adapter, merged):
        (folder / "spec.json").write_bytes(msgspec.json.encode(job.spec))
        (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.6}\n')
    store = open_store(f"file://{tmp_path / 'store'}")
    settings = hub_settings(hub_server)

    merged_art = publish(
        merged, kind="merged", job=job, settings=settings, store=store, final_metrics=METRICS
    )
    adapter_art = publish(
        adapter, kind="adapter", job=job, settings=settings, store=store, final_metrics=METRICS
    )

    assert merged_art.uri == f"hf://{hub_repo_id}"
    assert adapter_art.uri == f"hf://{hub_repo_id}/adapter"
    files = hub_server.repos[hub_repo_id]["files"]
    assert {"config.json", "model.safetensors", "manifest.json", "README.md"} <= set(files)
    assert {f"adapter/{f}" for f in adapter_art.files} <= set(files)
    assert not any(f.startswith("adapter_") for f in files)  # no adapter files at the root
    assert front_matter(files["README.md"].decode())["library_name"] == "transformers"
    assert front_matter(files["adapter/README.md"].decode())["library_name"] == "peft"
    assert 'subfolder="adapter"' in files["adapter/README.md"].decode()
    assert hub_server.commit_messages(hub_repo_id)[:2] == [
        f"ftune job {job.id}: upload adapter",
        f"ftune job {job.id}: upload merged",
    ]

    local = Path(
        snapshot_download(
            hub_repo_id,
            endpoint=hub_server.endpoint,
            token=hub_server.token,
            cache_dir=tmp_path / "hf-cache",
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(local)
    inputs = tokenizer("I think the weather was wonderful.", return_tensors="pt")
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(local).eval()(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        from_adapter = PeftModel.from_pretrained(base, local / "adapter").eval()(**inputs).logits
    assert (from_merged - from_adapter).abs().max().item() <= 1e-4  # float32, see test_merge


# ---------------------------------------------------------------------------- the local Hub


def test_local_hub_serves_seeded_models_like_the_hub(
    hub_server: HubServer, hub_repo_id: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Other tests load base models "from the Hub" through this: check it behaves."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    sha = hub_server.seed(hub_repo_id, tiny_model_dir, private=True)
    kwargs: dict[str, Any] = {"endpoint": hub_server.endpoint, "cache_dir": tmp_path / "c"}

    local = Path(snapshot_download(hub_repo_id, token=hub_server.read_token, **kwargs))
    assert local.name == sha
    expected = {p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*")}
    assert {p.relative_to(local).as_posix() for p in local.rglob("*")} == expected
    for rel in expected:
        assert (local / rel).read_bytes() == (tiny_model_dir / rel).read_bytes()

    kwargs["cache_dir"] = tmp_path / "empty-cache"  # else a failed call falls back to the cache
    with pytest.raises(RepositoryNotFoundError):  # private: no token, no repo
        hf_hub_download(hub_repo_id, "config.json", token=False, **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", token=hub_server.token, **kwargs)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "missing.bin", token=hub_server.token, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, "config.json", revision="v9", token=hub_server.token, **kwargs)
