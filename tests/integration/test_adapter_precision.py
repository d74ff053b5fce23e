"""The adapter's weights stay float32 on every quantization path, while training and when saved.

TRL 1.16 casts trainable weights to bfloat16 on any 4- or 8-bit base, whatever the device, and the
optimizer then updates them with no float32 copy: at our default learning rate an update is far
below bf16's resolution at a `lora_A` weight and rounds away (5% of `lora_A` moved in 4 steps,
against 100% in float32). The CPU worker computes in float32 (`adapt_to_device`), so these tests
build the trainer with the spec's own 16-bit compute dtype, as a GPU worker does: bitsandbytes
computes 4-bit layers in bfloat16 on the CPU too.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from gpu_worker.data import apply_chat_template, to_dataset
from gpu_worker.model import load_model, load_tokenizer
from gpu_worker.trainer import build_config, build_trainer
from service.contract import JobSpec
from service.contract.spec import DEFAULT_LEARNING_RATES

STEPS = 4


def _spec(bits: int | None, compute_dtype: str) -> JobSpec:
    return msgspec.convert(
        {
            "base_model": "org/tiny",
            "dataset_id": "ds_x",
            "hyperparameters": {
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_length": 64,
                "max_steps": STEPS,
                "warmup_ratio": 0.0,
                "gradient_checkpointing": False,
                "checkpoint_steps": 1000,
            },
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "quantization": {"bits": bits, "compute_dtype": compute_dtype},
        },
        JobSpec,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bits", "compute_dtype"),
    [(4, "bfloat16"), (8, "bfloat16"), (None, "float32")],
    ids=["4-bit", "8-bit", "plain-lora"],
)
def test_adapter_weights_stay_float32_and_every_update_lands(
    bits: int | None,
    compute_dtype: str,
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    spec = _spec(bits, compute_dtype)
    assert spec.hyperparameters.learning_rate == DEFAULT_LEARNING_RATES["dpo"]  # our default
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = apply_chat_template(tiny_preference_rows, tokenizer, spec.chat_template, print)
    trainer = build_trainer(
        load_model(tiny_model_dir, spec, "cpu"),
        tokenizer,
        spec,
        build_config(spec, tmp_path / "out", "cpu"),
        to_dataset(rows),
        None,
    )
    assert trainer.model is not None
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(trainable) == 28 and all("lora_" in n for n in trainable)
    assert {n: p.dtype for n, p in trainable.items()} == dict.fromkeys(trainable, torch.float32)
    before = {n: p.detach().clone() for n, p in trainable.items()}

    trainer.train()

    assert {n: p.dtype for n, p in trainable.items()} == dict.fromkeys(trainable, torch.float32)
    lora_a = [n for n in trainable if "lora_A" in n]
    moved = sum(int((trainable[n] != before[n]).sum()) for n in lora_a)
    total = sum(trainable[n].numel() for n in lora_a)
    assert moved / total > 0.99, f"only {moved / total:.1%} of lora_A entries moved"
    if bits == 4:  # the base still computes in the spec's 16-bit dtype; only the adapter is fp32
        from bitsandbytes.nn.modules import Linear4bit

        layers = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
        assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}

    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 28
    assert {t.dtype for t in saved.values()} == {torch.float32}
