"""A job POSTed to the API really trains in a worker process and lands where its spec says."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from service.client import Client
from service.store import job_key
from tests.e2e.conftest import Stack, soon
from tests.fixtures.api import KEYS, write_tenants
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TRL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def spec(stack: Stack, dataset_id: str, **over: Any) -> dict[str, Any]:
    hp = {
        "learning_rate": 1e-3,
        "max_steps": 12,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_length": 64,
        "warmup_ratio": 0.0,
        "logging_steps": 1,
        "checkpoint_steps": 4,
        "gradient_checkpointing": False,
        **over.pop("hyperparameters", {}),
    }
    return {
        "base_model": f"file://{stack.settings.models_dir / 'tiny'}",
        "dataset_id": dataset_id,
        "eval_fraction": 0.1,
        "hyperparameters": hp,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        **over,
    }


def training_pid(stack: Stack, job_id: str) -> int:
    """The pid of the process that trained the job, from the line it logs first."""
    with Client(stack.api.url, "key-alice") as client:
        for event in client.events(job_id):
            found = re.match(r"training process (\d+) ", str(event.data.get("message", "")))
            if event.event == "log" and found:
                return int(found.group(1))
    raise AssertionError(f"job {job_id} logged no training process")


def tree_sha(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def store_path(stack: Stack, uri: str) -> Path:
    root = stack.settings.store_url.removeprefix("file://")
    assert uri.startswith("file://"), uri
    path = Path(uri.removeprefix("file://"))
    assert str(path).startswith(root)
    return path


def test_job_trains_merges_and_reports_metrics(stack: Stack) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir = stack.settings.models_dir / "tiny"
    base_before = tree_sha(base_dir)
    ds = stack.upload(preference_rows(64))
    stack.start_worker()
    job = stack.submit(
        spec(stack, ds["id"], output={"artifacts": "both"}, eval_prompts=["How was the park?"])
    )
    job = stack.wait_done(job["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == 12 and job["progress"]["total_steps"] == 12
    assert tree_sha(base_dir) == base_before, "training must never write to the base model"

    kinds = {a["kind"]: a for a in job["artifacts"]}
    assert set(kinds) == {"adapter", "merged"}
    adapter_dir = store_path(stack, kinds["adapter"]["uri"])
    merged_dir = store_path(stack, kinds["merged"]["uri"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "spec.json", "metrics.jsonl"):
        assert (adapter_dir / name).exists(), name
    for rel, digest in kinds["adapter"]["sha256"].items():
        assert hashlib.sha256((adapter_dir / rel).read_bytes()).hexdigest() == digest

    # The adapter trained: LoRA's B matrices start at zero and must have moved.
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b_norm = sum(t.float().abs().sum().item() for k, t in lora.items() if "lora_B" in k)
    assert b_norm > 0

    # The merged model loads on its own and matches base + adapter.
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        diff = (merged(ids).logits - tuned(ids).logits).abs().max().item()
    assert diff < 1e-3, diff

    # Every logged step reports TRL's own keys, plus ours.
    points = stack.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
    train = [p for p in points if "loss" in p["values"]]
    assert [p["step"] for p in train] == list(range(1, 13))
    for p in train:
        assert p["values"].keys() >= TRL_KEYS, p
        assert {"tokens_per_second", "step_seconds", "memory_bytes"} <= p["values"].keys()
    assert any(k.startswith("eval_") for p in points for k in p["values"])
    assert job["eval_generations"][0]["prompt"] == "How was the park?"
    assert job["eval_generations"][0]["generated_by"] == "merged"  # "after" = what we published


def test_cancel_during_training_stops_within_seconds(stack: Stack) -> None:
    ds = stack.upload(preference_rows(64))
    stack.start_worker()
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 2000}))
    stack.wait(job["id"], lambda j: j["progress"]["step"] >= 2, timeout=180)
    asked = time.monotonic()
    resp = stack.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    done = stack.wait_done(job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert time.monotonic() - asked < 15
    assert done["progress"]["step"] < 2000
    pid = training_pid(stack, job["id"])
    assert soon(lambda: not psutil.pid_exists(pid)), "its process must be gone"


def test_killed_worker_job_resumes_from_checkpoint_elsewhere(stack: Stack) -> None:
    ds = stack.upload(preference_rows(64))
    first = stack.start_worker()
    # Progress arrives at most twice a second (~25 steps apart at 0.02 s a step on a fast
    # machine): enough steps that the kill lands mid-training, after a checkpoint.
    total, every = 200, 10
    hp = {"max_steps": total, "checkpoint_steps": every}
    job = stack.submit(spec(stack, ds["id"], hyperparameters=hp))
    stack.wait(job["id"], lambda j: j["progress"]["step"] >= every + 2, timeout=180)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # No worker exists now: the API's scheduler re-queues the lost attempt by itself.
    requeued = stack.wait(job["id"], lambda j: j["status"] == "queued", timeout=30)
    assert requeued["attempt"] == 1
    stack.start_worker()
    done = stack.wait_done(job["id"], timeout=300)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1
    steps = [
        p["step"]
        for p in stack.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
        if "loss" in p["values"]
    ]
    with Client(stack.api.url, "key-alice") as client:
        logs = [
            e.data["message"]
            for e in client.events(job["id"])
            if e.event == "log" and "resuming from the checkpoint" in e.data["message"]
        ]
    assert len(logs) == 1, logs
    resumed_from = int(logs[0].rsplit("step ", 1)[1])
    assert every <= resumed_from < total and resumed_from % every == 0, logs
    # attempt 1 trained only what came after the checkpoint; attempt 0 had reported 1..k
    # (k may stop short of the checkpoint when the worker died with points still in flight)
    k = len(steps) - (total - resumed_from)
    assert steps == list(range(1, k + 1)) + list(range(resumed_from + 1, total + 1)), steps


def test_failures_end_failed_with_phase_and_message(stack: Stack) -> None:
    ds = stack.upload(preference_rows(16))
    short = {"hyperparameters": {"max_steps": 2}}
    # There at submit (the API checks what it can see), gone when the worker loads it.
    gone = stack.settings.models_dir / "gone"
    gone.mkdir()
    (gone / "config.json").write_text("{}")
    missing_model = stack.submit({**spec(stack, ds["id"], **short), "base_model": f"file://{gone}"})
    shutil.rmtree(gone)
    stack.start_worker({"FTUNE_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    bad_upload = stack.submit(
        spec(
            stack,
            ds["id"],
            **short,
            output={"destination": {"type": "s3", "uri": "s3://no-such-bucket-ftune/x"}},
        )
    )
    other = stack.upload(preference_rows(8), name="blob-lost")
    (stack.store_dir / "datasets" / f"{other['sha256']}.jsonl").unlink()
    missing_blob = stack.submit(spec(stack, other["id"], **short))
    for job_id, phase, needle in (
        (missing_model["id"], "preparing", "gone"),
        (bad_upload["id"], "uploading", "no-such-bucket-ftune"),
        (missing_blob["id"], "preparing", other["sha256"][:12]),
    ):
        done = stack.wait_done(job_id)
        assert done["status"] == "failed", done
        assert done["error"]["phase"] == phase, done["error"]
        assert needle in done["error"]["message"], done["error"]
    # and no job is left running without a live worker
    running = stack.http.get("/v1/jobs", params={"status": "running"}).json()["items"]
    assert running == []


def test_a_worker_refuses_a_job_whose_record_was_edited_past_its_grants(stack: Stack) -> None:
    """The API let the job in; somebody then rewrote it in Redis to publish with a token its
    tenant may not use. The worker fails it before it downloads or uploads anything."""
    ds = stack.upload(preference_rows(8))
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 2}))
    assert stack.settings.api_keys_file is not None
    write_tenants(stack.settings.api_keys_file, KEYS, {"alice": {"hub_tokens": ["team-a"]}})
    r = redis.Redis.from_url(stack.settings.redis_url)
    record = json.loads(r.get(job_key(job["id"])) or b"")
    record["spec"]["output"]["destination"] = {"type": "hub", "repo_id": "x/y", "credentials": "b"}
    r.set(job_key(job["id"]), json.dumps(record))
    stack.start_worker()
    done = stack.wait_done(job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "ConfigError" and done["error"]["phase"] == "preparing"
    assert "refused before any download or upload" in done["error"]["message"]
    assert "Hub token 'b'" in done["error"]["message"]
    assert not list(stack.settings.work_dir.glob(f"{job['id']}.*/data"))
