"""Cost cutters on the CPU: DPO with precomputed reference log-probs against the per-step
reference forward, and SFT with packing (TRL's padding-free best-fit packing) against padded
batches.

Both sides of each pair run in one child process (`python -m bench.cost_cutters CONFIG`),
interleaved and repeated so a change in the machine's load hits them alike, through our own
`build_trainer` on the tests' tiny 4-bit Llama, torch on one thread. The precompute pass runs
inside TRL's trainer constructor, so it is timed as the constructor's extra time over the
baseline's and reported on its own; steps are timed from one `on_step_end` to the next.
Liger's kernels, torch.compile on a GPU and bf16 cannot run here: they are checked on paper only
(docs/training-quality.md, "Cost cutters").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PY, Figure, Section, build_model, median, run_json, scratch

THREADS = {"OMP_NUM_THREADS": "1"}
ROWS = 64
HYPERPARAMETERS = {
    "learning_rate": 1e-3,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 128,
    "warmup_ratio": 0.0,
    "gradient_checkpointing": False,
    "checkpoint_steps": 1_000_000,
}


precompute: list[float] = []
"""Seconds spent in TRL's precompute pass (train rows) during the current run."""


def _time_precompute() -> None:
    """Time TRL's precompute pass, which runs inside the trainer's constructor (bench only)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    original = DPOTrainer._precompute_ref_logps

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute.append(time.perf_counter() - t0)

    DPOTrainer._precompute_ref_logps = timed


def _train(model_dir: Path, out: Path, method: str, hp: dict[str, Any]) -> dict[str, Any]:
    """One training run at the trainer level; its timings and metrics."""
    import msgspec
    from transformers import TrainerCallback

    from gpu_worker.data import apply_chat_template, to_dataset
    from gpu_worker.model import load_model, load_tokenizer
    from gpu_worker.trainer import adapt_to_device, build_config, build_trainer
    from service.contract import JobSpec
    from tests.fixtures.tiny_model import preference_rows

    spec, _ = adapt_to_device(
        msgspec.convert(
            {
                "base_model": model_dir.as_uri(),
                "dataset_id": "ds_bench",
                "eval_fraction": 0.0,
                "method": method,
                "hyperparameters": {**HYPERPARAMETERS, **hp},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "quantization": {"compute_dtype": "float32"},
            },
            JobSpec,
        ),
        "cpu",
    )
    rows: list[dict[str, Any]] = list(preference_rows(ROWS))
    if method == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    tokenizer = load_tokenizer(model_dir)
    rows = apply_chat_template(rows, tokenizer, spec.chat_template, lambda _: None)
    model = load_model(model_dir, spec, "cpu")

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.step_ends: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.step_ends.append(time.perf_counter())

        def on_log(self, *args: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            self.logs.append(dict(logs or {}))

    clock = Clock()
    precompute.clear()
    trainer = build_trainer(
        model, tokenizer, spec, build_config(spec, out, "cpu"), to_dataset(rows), None, [clock]
    )
    started = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    steps = [b - a for a, b in zip([started, *clock.step_ends], clock.step_ends, strict=False)]
    train_logs = [log for log in clock.logs if "loss" in log]
    return {
        "precompute": sum(precompute),
        "train": ended - started,
        "steps": steps,
        "losses": [log["loss"] for log in train_logs],
        "tokens": train_logs[-1].get("num_tokens", 0.0),
    }


def child(config_path: str) -> None:
    """Run every (name, method, hyperparameters) in the config `repeats` times, interleaved."""
    import torch

    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    _time_precompute()
    model_dir, work = Path(config["model_dir"]), Path(config["out"])
    for name, method, hp in config["runs"]:  # warm-up: lazy imports and first-call costs
        _train(model_dir, work / f"{name}-warm", method, {**hp, "num_epochs": 1.0, "max_steps": 2})
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(config["repeats"]):
        for name, method, hp in config["runs"]:
            result = _train(model_dir, work / f"{name}-{i}", method, hp)
            out.setdefault(name, []).append(result)
    print(json.dumps(out))


def _runs(root: Path, model_dir: Path, runs: list[Any], repeats: int) -> dict[str, Any]:
    config = root / f"config-{runs[0][0]}.json"
    config.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "out": str(root / "out"),
                "runs": runs,
                "repeats": repeats,
            }
        )
    )
    result: dict[str, Any] = run_json(
        [PY, "-m", "bench.cost_cutters", str(config)], env=THREADS, timeout=3600
    )
    return result


def _median_step(runs: list[dict[str, Any]]) -> float:
    # The first step of a run also pays for the dataloader's first batch and lazy inits.
    return median([s for r in runs for s in r["steps"][1:]])


def run(full: bool) -> Section:
    repeats = 3 if full else 2
    epochs = [1.0, 3.0] if full else [1.0, 2.0]
    section = Section(
        f"Cost cutters on the CPU (tiny Llama, QLoRA, {ROWS} rows, batch 4, torch on 1 thread)",
        f"python -m bench --{'full' if full else 'quick'} --only cutters",
    )
    with scratch("cutters") as root:
        model_dir = root / "models" / "tiny"
        build_model(model_dir)
        dpo_runs = []
        for n in epochs:
            base = {"num_epochs": n}
            dpo_runs += [
                (f"ref-{n:g}", "dpo", base),
                (f"pre-{n:g}", "dpo", {**base, "precompute_ref_log_probs": True}),
            ]
        dpo = _runs(root, model_dir, dpo_runs, repeats)
        sft_runs = [
            ("padded", "sft", {"num_epochs": 1.0}),
            ("packed", "sft", {"num_epochs": 1.0, "packing": True}),
        ]
        sft = _runs(root, model_dir, sft_runs, repeats)

    one = f"{epochs[0]:g}"
    pre, ref = dpo[f"pre-{one}"], dpo[f"ref-{one}"]
    precompute = median([p["precompute"] for p in pre])
    section.add(
        Figure(
            "DPO median step, precomputed reference log-probs",
            1000 * _median_step(pre),
            1000 * _median_step(ref),
            "ms",
            "reference forward every step",
            why="noise: the step no longer runs the reference forward, so it cannot be "
            "slower by itself; the machine is shared",
        )
    )
    for n in epochs:
        p, r = dpo[f"pre-{n:g}"], dpo[f"ref-{n:g}"]
        section.add(
            Figure(
                f"DPO {n:g} epoch{'s' if n > 1 else ''}: precompute pass + training",
                median([x["precompute"] + x["train"] for x in p]),
                median([x["train"] for x in r]),
                "s",
                "reference forward every step",
                why="one epoch runs as many reference forwards either way (all up front "
                "instead of one per step), so precomputing pays off from the second epoch on: "
                "this is why it is off by default",
            )
        )
    diff = max(
        abs(a - b)
        for n in epochs
        for x, y in zip(dpo[f"pre-{n:g}"], dpo[f"ref-{n:g}"], strict=True)
        for a, b in zip(x["losses"], y["losses"], strict=True)
    )
    section.facts.append(
        f"the precompute pass over the {ROWS} rows took {precompute:.2f} s (median, timed "
        f"inside TRL's trainer constructor); the losses of every step agree with the "
        f"per-step reference to {diff:.1e}: the same training"
    )
    padded, packed = sft["padded"], sft["packed"]

    def tokens_per_second(runs: list[dict[str, Any]]) -> float:
        return median([r["tokens"] / r["train"] for r in runs])

    section.add(
        Figure(
            "SFT tokens/s over one epoch, packing (padding-free)",
            tokens_per_second(packed),
            tokens_per_second(padded),
            "tok/s",
            "padded batches of 4 rows",
            better="higher",
            why="on rows of similar length little padding is saved, and a packed batch holds "
            "4 sequences of up to max_length tokens, so fewer, longer steps",
        )
    )
    section.facts.append(
        f"SFT steps in one epoch: {len(packed[0]['steps'])} packed against "
        f"{len(padded[0]['steps'])} padded; tokens trained {packed[0]['tokens']:.0f} against "
        f"{padded[0]['tokens']:.0f} (the same tokens, no padding counted on either side)"
    )
    section.facts.append(
        "padding-free DPO is not measurable: TRL 1.16 disables DPOConfig.padding_free (it warns "
        "and pads). Liger's kernels, torch.compile on a GPU and bf16 are checked on paper only"
    )
    return section


if __name__ == "__main__":
    child(sys.argv[1])
