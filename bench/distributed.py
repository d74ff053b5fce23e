"""Data parallelism: the same job on a worker with 2 processes (`FTUNE_WORKER_GPUS=2`, gloo on
the CPU) against a worker with 1, through the whole service.

Same tiny local Llama (4-bit NF4), same 64 preference rows, seed and steps, and the same global
batch: 1 process with batch_size 4 against 2 processes with batch_size 2 each, so that both
see the same 4 rows per optimizer step and the per-step losses can be compared. Each process
runs torch on one thread, so the 2-process run uses 2 cores where the 1-process run uses 1: the
CPU stand-in for a second GPU. Runs are interleaved (1, 2, 1, 2, ...) so a change in the
machine's load hits both alike.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Figure, Section, Stack, build_model, median, scratch, stop_process
from tests.fixtures.tiny_model import preference_rows

ROWS = 64
THREADS = {"OMP_NUM_THREADS": "1"}
"""One thread per training process (see bench/training.py for why on a shared 2-core box)."""


def _spec(stack: Stack, dataset_id: str, steps: int, batch_size: int) -> dict[str, Any]:
    return {
        "base_model": (stack.models_dir / "tiny").as_uri(),
        "dataset_id": dataset_id,
        "eval_fraction": 0.0,
        "hyperparameters": {
            "learning_rate": 1e-3,
            "max_steps": steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": 1,
            "warmup_ratio": 0.0,
            "max_length": 128,
            "seed": 42,
            "logging_steps": 1,
            "checkpoint_steps": 1000,
            "gradient_checkpointing": False,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "output": {"artifacts": "adapter", "destination": {"type": "store"}},
    }


def _run_job(stack: Stack, dataset_id: str, steps: int, processes: int) -> dict[str, Any]:
    """Start a worker with `processes` training processes, run one job on it, stop it."""
    stack.extra_env["FTUNE_WORKER_GPUS"] = str(processes)
    worker = stack.start_worker()
    try:
        posted = time.time()
        job = stack.submit(_spec(stack, dataset_id, steps, batch_size=4 // processes))
        done = stack.wait_done(job["id"], timeout=900)
    finally:
        stop_process(worker)
    if done["status"] != "succeeded":
        raise RuntimeError(f"the bench job did not succeed: {done}\n{stack.logs()}")
    points = stack.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
    train = [p for p in points if "loss" in p["values"]]
    return {
        "wall": done["finished_at"] - posted,
        "losses": [p["values"]["loss"] for p in train],
        "step_seconds": [p["values"]["step_seconds"] for p in train],
        "training": train[-1]["time"] - train[0]["time"],
    }


def run(full: bool) -> Section:
    steps = 100 if full else 30
    pairs = 2 if full else 1
    section = Section(
        f"Data parallelism: 2 gloo processes against 1 (tiny Llama, QLoRA DPO, {steps} steps, "
        "global batch 4)",
        f"python -m bench --{'full' if full else 'quick'} --only distributed",
    )
    ones: list[dict[str, Any]] = []
    twos: list[dict[str, Any]] = []
    with scratch("distributed") as root:
        stack = Stack(root / "stack", env=dict(THREADS))
        with stack:
            build_model(stack.models_dir / "tiny")
            dataset = stack.upload_rows(preference_rows(ROWS))
            for _ in range(pairs):
                ones.append(_run_job(stack, dataset["id"], steps, 1))
                twos.append(_run_job(stack, dataset["id"], steps, 2))
    if any(len(r["losses"]) != steps for r in ones + twos):
        raise RuntimeError(f"a run did not log {steps} steps")
    worst = max(
        abs(b - a) / abs(a)
        for one in ones
        for two in twos
        for a, b in zip(one["losses"], two["losses"], strict=True)
    )
    section.facts.append(
        f"same training: at every one of the {steps} steps the 2-process loss (the mean of the "
        f"ranks' losses) agrees with the 1-process loss to {worst:.1e} relative (float32 sums "
        f"in another order); loss {ones[0]['losses'][0]:.4f} -> {ones[0]['losses'][-1]:.4f}"
        + ("" if worst < 1e-4 else " -- TOO FAR APART: not the same training")
    )
    section.add(
        Figure(
            "median optimizer step (2 rows on each of 2 processes vs 4 rows on 1)",
            median([x for r in twos for x in r["step_seconds"]]),
            median([x for r in ones for x in r["step_seconds"]]),
            "s",
            "1 process, batch 4",
            why="every optimizer step adds collectives over gloo on loopback: DDP's all-reduce "
            "of the adapter's gradients, StepSync's broadcast of rank 0's stop decision and, "
            "with a log every step as here, the trainer's gather of the loss and TRL's gathers "
            "of each logged metric; each waits for the other process, which on 2 cores shared "
            "with other work is often descheduled, and together they cost more than halving a "
            "step of tens of milliseconds saves. On GPUs each rank has its own device and NCCL "
            "overlaps the all-reduce with the backward pass: the speed-up is the point there, "
            "not here",
        )
    )
    section.add(
        Figure(
            "training phase (first to last step's log)",
            median([r["training"] for r in twos]),
            median([r["training"] for r in ones]),
            "s",
            "1 process",
            why="as the step time above: no spare cores here",
        )
    )
    section.add(
        Figure(
            "wall time, job submitted -> adapter stored",
            median([r["wall"] for r in twos]),
            median([r["wall"] for r in ones]),
            "s",
            "1 process",
            why="rank 1 is a second process that imports the training stack and loads the "
            "model on the same 2 cores as rank 0 (it starts with the job, so on a GPU worker its "
            "imports overlap rank 0's preparation instead of competing with it), plus the "
            "training phase above",
        )
    )
    return section
