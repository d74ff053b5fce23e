"""Continuing an adapter (`init_from`) on the tiny model: SFT then DPO, the DPO job starting
where the SFT job ended and against it as the reference, resuming correctly; an adapter of
another base model is refused."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from safetensors.torch import load

from gpu_worker.errors import ConfigError, ModelLoadError
from gpu_worker.init_from import fetch_adapter
from gpu_worker.pipeline import run
from gpu_worker.reporter import JobCancelled, ListReporter
from service.blobs import BlobStore, open_store
from service.contract import Job
from service.settings import Settings, hash_api_key
from tests.fixtures.hub import HubServer
from tests.fixtures.s3 import S3Server
from tests.fixtures.tiny_model import stage_job


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path / "work", device="cpu")


def _continuing(job: Job, adapter_uri: str) -> Job:
    """What the API records for a job with init_from: where the adapter is."""
    return msgspec.structs.replace(job, init_adapter=adapter_uri)


def _weights(store: BlobStore, job_id: str) -> dict[str, Any]:
    return load(store.get_bytes(f"jobs/{job_id}/artifacts/adapter/adapter_model.safetensors"))


@pytest.mark.slow
def test_sft_then_dpo_continues_the_sft_adapter_against_it(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    rows = tiny_preference_rows[:32]
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    sft = stage_job(store, tiny_model_dir, sft_rows, job_id="job_sft", method="sft")
    (adapter,) = run(sft, tmp_path / "w1", ListReporter(), settings=settings, store=store).artifacts
    fresh = ListReporter()  # DPO on a fresh adapter: its policy starts as the bare base
    plain = stage_job(store, tiny_model_dir, rows, job_id="job_fresh")
    run(plain, tmp_path / "w2", fresh, settings=settings, store=store)

    job = _continuing(
        stage_job(
            store,
            tiny_model_dir,
            rows,
            job_id="job_dpo",
            init_from={"job_id": "job_sft"},
            hyperparameters={"checkpoint_steps": 2},
        ),
        adapter.uri,
    )
    interrupted = ListReporter()
    interrupted.cancel_after_step = 3
    with pytest.raises(JobCancelled):
        run(job, tmp_path / "w3", interrupted, settings=settings, store=store)

    step1, step1_fresh = interrupted.points[0][1], fresh.points[0][1]
    # The policy starts as the SFT adapter, not as a fresh one (= the bare base) ...
    assert abs(step1["logps/chosen"] - step1_fresh["logps/chosen"]) > 0.05
    assert abs(step1["logps/rejected"] - step1_fresh["logps/rejected"]) > 0.05
    # ... and the reference is the SFT model too: rewards (beta x (policy - reference)
    # log-probs) are exactly 0 at step 1 and the loss is ln 2. Against the bare base they would
    # be what SFT moved.
    assert step1["rewards/chosen"] == 0.0 and step1["rewards/rejected"] == 0.0
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # Another worker resumes it from the checkpoint at step 2: the same steps 3 and 4 follow.
    resumed = ListReporter()
    result = run(job, tmp_path / "w4", resumed, settings=settings, store=store)
    assert any("resuming from the checkpoint at step 2" in line for line in resumed.logs)
    losses = {s: v["loss"] for s, v in resumed.points if "loss" in v}
    assert list(losses) == [3, 4]
    assert losses[3] == pytest.approx(interrupted.points[2][1]["loss"], abs=1e-5)

    # The result is the continued adapter alone (not TRL's frozen reference copy), moved on
    # from the SFT job's weights.
    (artifact,) = result.artifacts
    assert not any(name.startswith("ref/") for name in artifact.files)
    before, after = _weights(store, "job_sft"), _weights(store, "job_dpo")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)


def test_an_adapter_of_another_base_model_is_refused_before_training(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    s3 = s3_server.client()
    config = {"peft_type": "LORA", "base_model_name_or_path": "meta-llama/Llama-2-7b-chat-hf"}
    s3.put_object(Bucket=s3_bucket, Key="a/adapter_config.json", Body=json.dumps(config))
    s3.put_object(Bucket=s3_bucket, Key="a/adapter_model.safetensors", Body=b"x")
    ref = f"s3://{s3_bucket}/a/"
    job = _continuing(
        stage_job(
            store,
            tiny_model_dir,
            tiny_preference_rows,
            init_from={"adapter": ref},
            lora={"r": 16, "alpha": 32, "dropout": 0.05},
        ),
        ref,
    )
    # The tenant may read the bucket (the grant is checked before anything is downloaded).
    tenants_file = tmp_path / "tenants.json"
    grants = {"s3_read": [f"s3://{s3_bucket}"]}
    entry = {"keys": [{"sha256": hash_api_key("k")}], "grants": grants}
    tenants_file.write_text(json.dumps({"tenants": {job.tenant: entry}}))
    s3_settings = replace(
        settings, s3_endpoint_url=s3_server.endpoint_url, api_keys_file=tenants_file
    )
    reporter = ListReporter()
    with pytest.raises(ConfigError, match="trained on base model 'meta-llama/Llama-2-7b-chat-hf'"):
        run(job, tmp_path / "w", reporter, settings=s3_settings, store=store)
    assert reporter.phases == ["preparing"]


def test_an_adapter_in_a_hub_subfolder_is_fetched_alone_and_checked(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
    hub_server: HubServer,
    hub_repo_id: str,
) -> None:
    # What a job with output.artifacts "both" leaves on the Hub: the merged model at the root,
    # the adapter under adapter/.
    folder = tmp_path / "repo"
    (folder / "adapter").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"a merged model, not to be downloaded")
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dir)}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    hub_server.seed(hub_repo_id, folder)
    ref = f"hf://{hub_repo_id}/adapter"
    job = _continuing(
        stage_job(
            store,
            tiny_model_dir,
            tiny_preference_rows,
            init_from={"adapter": ref},
            lora={"r": 16, "alpha": 32, "dropout": 0.05},
        ),
        ref,
    )
    hub_settings = replace(settings, hf_endpoint=hub_server.endpoint, hf_home=tmp_path / "hf")
    got = fetch_adapter(
        job, tiny_model_dir, settings=hub_settings, store=store, dest=tmp_path / "init"
    )
    assert got is not None and sorted(p.name for p in got.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list((tmp_path / "hf").rglob("model.safetensors"))  # only the subfolder came

    missing = _continuing(job, f"hf://{hub_repo_id}@nope/adapter")
    with pytest.raises(ModelLoadError, match="revision 'nope' of init_from adapter"):
        fetch_adapter(missing, tiny_model_dir, settings=hub_settings, store=store, dest=tmp_path)
