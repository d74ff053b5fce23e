"""Our pipeline trains like a plain TRL script given the same model, data and settings, plus
the fixes docs/training-quality.md lists.

The reference below is written straight from TRL's and transformers' documentation, without
any of our builders, so a wrong translation of the spec (a dropped hyperparameter, a different
loss, warmup or LoRA setting, a second reference model) shows up as different per-step losses.
It applies by hand the one fix that changes the arithmetic of these settings: float32 adapter
weights (TRL casts them to bfloat16 on a quantized base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.pipeline import run
from gpu_worker.reporter import ListReporter
from service.blobs import open_store
from service.settings import Settings
from tests.fixtures.tiny_model import stage_job

HYPERPARAMETERS: dict[str, Any] = {
    "beta": 0.2,
    "learning_rate": 2e-3,
    "max_steps": 4,
    "batch_size": 2,
    "gradient_accumulation_steps": 2,
    "warmup_ratio": 0.25,
    "lr_scheduler": "cosine",
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "max_length": 96,
    "seed": 7,
    "logging_steps": 1,
    "gradient_checkpointing": False,
}


def _standalone_trl_losses(
    model_dir: Path, rows: list[dict[str, Any]], output_dir: Path, max_length: int = 96
) -> list[float]:
    import torch
    from bitsandbytes.nn.modules import Linear4bit
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    for module in model.modules():  # the stack notes' CPU fix, as any CPU user must apply it
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    args = DPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        beta=0.2,
        learning_rate=2e-3,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=0.25,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        max_grad_norm=0.5,
        max_length=max_length,
        seed=7,
        logging_steps=1,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    assert trainer.model is not None
    for param in trainer.model.parameters():  # our deliberate difference: float32 adapter weights
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def _calling(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs whose chosen answer calls a function (the same arguments in every row: a plain
    `Dataset.from_list` then holds them as they are, so the reference reads what we do)."""
    rows = []
    for i, pair in enumerate(pairs):
        call = {"type": "function", "function": {"name": "weather", "arguments": {"city": f"C{i}"}}}
        chosen = [{"role": "assistant", "content": "", "tool_calls": [call]}]
        rows.append({**pair, "chosen": chosen, "tools": WEATHER})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("tools", [False, True], ids=["answers", "function-calls"])
def test_per_step_losses_equal_a_plain_trl_run(
    tools: bool,
    tiny_model_dir: Path,
    tiny_conversational_rows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """With `tools`, each row lists functions and its chosen answer calls one (OpenAI's and
    Azure's DPO files): TRL renders each row with its own tools, from a JSON string column."""
    rows = _calling(tiny_conversational_rows) if tools else tiny_conversational_rows
    max_length = 160 if tools else 96  # the tools' schema is in every prompt
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        tiny_model_dir,
        rows,
        eval_fraction=0.0,
        hyperparameters=HYPERPARAMETERS | {"max_length": max_length},
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True},
    )
    settings = Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path, device="cpu")
    reporter = ListReporter()
    run(job, tmp_path / "work", reporter, settings=settings, store=store)
    ours = [values["loss"] for _, values in reporter.points if "loss" in values]

    given = [{**r, "tools": json.dumps(r["tools"])} for r in rows] if tools else rows
    reference = _standalone_trl_losses(tiny_model_dir, given, tmp_path / "trl", max_length)

    assert len(ours) == len(reference) == 4
    assert ours == pytest.approx(reference, abs=1e-4)
    assert ours[-1] < ours[0]  # and it did learn something
