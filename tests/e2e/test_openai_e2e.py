"""A team's OpenAI fine-tuning pipeline, unchanged but for base_url and the key, trains the tiny
model on our API and a real worker: upload, wait, DPO jobs with explicit and "auto"
hyperparameters, events to the end, checkpoints, the result file, a cancel."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Stack
from tests.fixtures.openai_sdk import jsonl, openai_rows, sdk

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SHORT = {"max_length": 128, "gradient_checkpointing": False, "warmup_ratio": 0.0}


def follow(client: openai.OpenAI, job_id: str, timeout: float = 300) -> list[Any]:
    """Every event of the job once it has ended, oldest first (paged 5 at a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = client.fine_tuning.jobs.list_events(job_id, limit=1).data
        if newest and newest[0].message.startswith(("Job succeeded", "Job failed")):
            return list(client.fine_tuning.jobs.list_events(job_id, limit=5))[::-1]
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end: {client.fine_tuning.jobs.retrieve(job_id)}")


def test_openai_pipeline_trains_on_our_worker(stack: Stack) -> None:
    client = sdk(stack.api.url)
    model = f"file://{stack.settings.models_dir / 'tiny'}"
    uploaded = client.files.create(
        file=("prefs.jsonl", jsonl(openai_rows(64))), purpose="fine-tune"
    )
    train = client.files.wait_for_processing(uploaded.id, poll_interval=0.2)
    assert train.status == "processed"
    stack.start_worker()

    explicit = client.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        method={
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "beta": 0.1,
                    "batch_size": 4,
                    "learning_rate_multiplier": 200,
                }
            },
        },
        suffix="explicit",
        metadata={"run": "explicit"},
        extra_body={
            "training": {**SHORT, "max_steps": 6, "checkpoint_steps": 2},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "eval_fraction": 0.1,
        },
    )
    auto = client.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        method={
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "beta": "auto",
                    "batch_size": "auto",
                    "learning_rate_multiplier": "auto",
                    "n_epochs": "auto",
                }
            },
        },
        extra_body={"training": {**SHORT, "max_steps": 3}},
    )
    doomed = client.fine_tuning.jobs.create(
        model=model, training_file=train.id, seed=3, extra_body={"training": SHORT}
    )
    assert client.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"

    events = follow(client, explicit.id)
    job = client.fine_tuning.jobs.retrieve(explicit.id)
    assert job.status == "succeeded", (job, [e.message for e in events], stack.logs()[-4000:])
    assert job.hyperparameters.model_dump() == {
        "batch_size": 4,
        "learning_rate_multiplier": 200.0,
        "n_epochs": 1,
    }
    assert job.finished_at is not None and job.finished_at >= job.created_at
    assert job.trained_tokens is not None and job.trained_tokens > 0
    assert job.metadata == {"run": "explicit"} and job.model_extra == {"suffix": "explicit"}
    artifact = f"{stack.settings.store_url}/jobs/{job.id}/artifacts/adapter/"
    assert job.fine_tuned_model == artifact
    assert (Path(artifact.removeprefix("file://")) / "adapter_model.safetensors").is_file()

    messages = [e.message for e in events]
    assert messages[0] == "Job queued" and messages[-1] == "Job succeeded"
    assert "Job started" in messages and "Phase: training" in messages
    points = [e.data for e in events if e.type == "metrics" and e.data]
    train = {d["step"]: d for d in points if d["train_loss"] is not None}
    train_loss = {step: d["train_loss"] for step, d in train.items()}
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    assert all(d["total_steps"] == 6 for d in points) and "rewards/accuracies" in train[6]
    [final_eval] = [d for d in points if d["valid_loss"] is not None]  # eval split at the end

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert [c.step_number for c in checkpoints] == [6, 4]  # the worker keeps the newest two
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.metrics.train_loss == train_loss[checkpoint.step_number]
        assert checkpoint.metrics.train_rewards_accuracies is not None
        folder = Path(checkpoint.fine_tuned_model_checkpoint.removeprefix("file://"))
        assert (folder / "adapter_model.safetensors").is_file()

    [result_id] = job.result_files
    result = client.files.retrieve(result_id)
    assert result.purpose == "fine-tune-results"
    content = client.files.content(result_id).read()
    assert result.bytes == len(content)
    table = list(csv.DictReader(io.StringIO(content.decode())))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4, 5, 6]
    assert {int(r["step"]): float(r["train_loss"]) for r in table} == train_loss
    assert float(table[-1]["valid_loss"]) == final_eval["valid_loss"]

    follow(client, auto.id)
    auto = client.fine_tuning.jobs.retrieve(auto.id)
    assert auto.status == "succeeded", auto
    assert auto.method is not None and auto.method.dpo is not None
    assert auto.method.dpo.hyperparameters is not None
    used = auto.method.dpo.hyperparameters
    assert (used.beta, used.batch_size, used.learning_rate_multiplier, used.n_epochs) == (
        0.1,
        8,
        1.0,
        1,  # "auto" epochs give way to max_steps: 3 steps of 8 pairs are 1 epoch of 64
    )
    results = {f.id for f in client.files.list(purpose="fine-tune-results")}
    assert results == {result_id, *auto.result_files}

    doomed = client.fine_tuning.jobs.retrieve(doomed.id)
    assert doomed.status == "cancelled" and doomed.result_files == []
    assert [e.message for e in client.fine_tuning.jobs.list_events(doomed.id)] == [
        "Job cancelled",
        "Job queued",
    ]
