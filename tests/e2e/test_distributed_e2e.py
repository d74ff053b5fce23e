"""A worker with 2 processes (FTUNE_WORKER_GPUS=2; gloo on the CPU) runs each job on both:
it succeeds with an adapter peft loads, stops every rank on a cancel, and fails with the rank's
name, not a hang, when one of them dies."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from service.client import Client
from tests.e2e.conftest import Stack
from tests.e2e.test_jobs_end_to_end import spec, store_path
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TWO = {"FTUNE_WORKER_GPUS": "2", "FTUNE_DEVICE": "cpu"}


def _ranks(stack: Stack) -> list[psutil.Process]:
    """The worker's training processes of rank 1 and up (rank 0 is the training child)."""
    found = []
    for worker in stack.workers:
        for child in psutil.Process(worker.pid).children(recursive=True):
            try:
                if "gpu_worker.distributed" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:  # exiting as it was listed
                continue
    return found


def _logs(stack: Stack, job_id: str) -> list[str]:
    with Client(stack.api.url, "key-alice") as client:
        return [e.data["message"] for e in client.events(job_id) if e.event == "log"]


def test_job_trains_on_two_processes_and_publishes_an_adapter(stack: Stack) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ds = stack.upload(preference_rows(64))
    stack.start_worker(TWO)
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 8, "batch_size": 2}))
    job = stack.wait_done(job["id"])
    assert job["status"] == "succeeded", job
    logs = _logs(stack, job["id"])
    assert any("2 processes (ddp, gloo)" in line and "= 4 rows" in line for line in logs), logs
    assert (
        "data parallel across 2 processes: rank 0 trained 8 steps, rank 1 trained 8 steps; "
        "adapters identical on every rank"
    ) in logs
    adapter_dir = store_path(stack, job["artifacts"][0]["uri"])
    # The final evaluation ran on both ranks and its loss is in the model card.
    assert "eval_loss" in (adapter_dir / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(stack.settings.models_dir / "tiny")
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        assert torch.isfinite(tuned(torch.tensor([[1, 5, 9, 42]])).logits).all()
    assert _ranks(stack) == []


def test_cancel_stops_every_rank(stack: Stack) -> None:
    ds = stack.upload(preference_rows(64))
    stack.start_worker(TWO)
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 2000}))
    stack.wait(job["id"], lambda j: j["progress"]["step"] >= 2, timeout=180)
    assert len(_ranks(stack)) == 1
    assert stack.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert stack.wait_done(job["id"], timeout=60)["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while _ranks(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ranks(stack) == [], "rank 1 must stop with rank 0"


def test_a_rank_that_dies_fails_the_job_naming_it(stack: Stack) -> None:
    ds = stack.upload(preference_rows(64))
    stack.start_worker(TWO)
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": 2000}))
    stack.wait(job["id"], lambda j: j["progress"]["step"] >= 2, timeout=180)
    (rank1,) = _ranks(stack)
    rank1.send_signal(signal.SIGKILL)
    done = stack.wait_done(job["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "DistributedError"
    assert "rank 1 of 2 died (signal 9)" in done["error"]["message"]
