"""Our spec → TRL's DPOConfig, and the explicit choices a CPU worker makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker.errors import ConfigError
from gpu_worker.trainer import (
    adapt_to_device,
    build_config,
    mixed_precision,
    resolve_device,
)
from service.contract import JobSpec


def _spec(**fields: Any) -> JobSpec:
    return msgspec.convert({"base_model": "org/tiny", "dataset_id": "ds_x", **fields}, JobSpec)


def test_bf16_on_a_cpu_is_refused_with_the_fix_in_the_message() -> None:
    with pytest.raises(ConfigError) as exc:
        adapt_to_device(_spec(hyperparameters={"bf16": True}), "cpu")
    assert str(exc.value) == "bf16 needs a GPU: set hyperparameters.bf16 false"


def test_cpu_runs_16_bit_compute_and_gpu_optimizers_in_their_cpu_form() -> None:
    spec = _spec(
        hyperparameters={"optimizer": "paged_adamw_8bit"},
        quantization={"compute_dtype": "float16"},
    )

    adapted, notes = adapt_to_device(spec, "cpu")

    assert adapted.quantization.compute_dtype == "float32"
    assert adapted.hyperparameters.optimizer == "adamw_torch"
    assert notes == [
        "CPU worker: quantization.compute_dtype float16 -> float32 "
        "(16-bit matmuls are emulated and slow on a CPU)",
        "CPU worker: optimizer paged_adamw_8bit -> adamw_torch "
        "(paged and 8-bit optimizers are GPU memory savers)",
    ]
    assert spec.quantization.compute_dtype == "float16"  # the job's own spec is untouched
    assert adapt_to_device(spec, "cuda") == (spec, [])
    plain = _spec(quantization={"compute_dtype": "float32"})
    assert adapt_to_device(plain, "cpu") == (plain, [])


def test_device_setting() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_dpo_config_carries_every_hyperparameter(tmp_path: Path) -> None:
    spec, _ = adapt_to_device(
        _spec(
            hyperparameters={
                "beta": 0.3,
                "loss_type": "ipo",
                "learning_rate": 1e-4,
                "num_epochs": 2,
                "batch_size": 3,
                "gradient_accumulation_steps": 5,
                "warmup_ratio": 0.25,
                "lr_scheduler": "cosine",
                "weight_decay": 0.02,
                "max_grad_norm": 0.7,
                "max_length": 256,
                "seed": 11,
                "logging_steps": 3,
                "eval_steps": 9,
                "checkpoint_steps": 13,
                "gradient_checkpointing": True,
            }
        ),
        "cpu",
    )

    config = build_config(spec, tmp_path, "cpu", has_eval=True)

    assert config.output_dir == str(tmp_path)
    assert config.use_cpu and not config.bf16 and not config.fp16
    assert config.beta == 0.3 and config.loss_type == ["ipo"]
    assert config.learning_rate == 1e-4 and config.num_train_epochs == 2 and config.max_steps == -1
    assert config.per_device_train_batch_size == 3 and config.gradient_accumulation_steps == 5
    assert config.warmup_steps == 0.25  # transformers 5: a float below 1 is a ratio
    assert config.lr_scheduler_type == "cosine"
    assert config.weight_decay == 0.02 and config.max_grad_norm == 0.7
    assert config.max_length == 256 and config.seed == 11
    assert config.activation_checkpointing
    assert config.logging_steps == 3
    assert config.eval_strategy == "steps" and config.eval_steps == 9
    assert config.save_strategy == "steps" and config.save_steps == 13
    assert config.optim == "adamw_torch"
    assert config.report_to == []


def test_dpo_config_without_eval_data_or_with_max_steps(tmp_path: Path) -> None:
    spec = _spec(hyperparameters={"eval_steps": 5, "max_steps": 7, "warmup_ratio": 0.0})

    config = build_config(spec, tmp_path, "cpu", has_eval=False)

    assert config.eval_strategy == "no"
    assert config.max_steps == 7 and config.warmup_steps == 0


@pytest.mark.parametrize(
    ("fields", "bf16_supported", "expected"),
    [
        ({}, True, "no"),  # 4-bit computes in bfloat16 inside bitsandbytes; adapter in fp32
        ({"quantization": {"compute_dtype": "float16"}}, True, "fp16"),  # + loss scaling
        ({"quantization": {"bits": 8, "compute_dtype": "float16"}}, False, "fp16"),
        ({"quantization": {"bits": None}}, True, "bf16"),  # plain LoRA: autocast, not fp32
        ({"quantization": {"bits": None}}, False, "fp16"),  # pre-Ampere GPU
        ({"hyperparameters": {"bf16": True}}, True, "bf16"),
    ],
    ids=["4bit-bf16", "4bit-fp16", "8bit-fp16", "lora-ampere", "lora-older-gpu", "asked-bf16"],
)
def test_gpu_mixed_precision_per_path(
    fields: dict[str, Any], bf16_supported: bool, expected: str
) -> None:
    spec = _spec(**fields)

    assert mixed_precision(spec, "cuda", bf16_supported=bf16_supported) == expected
    assert mixed_precision(spec, "cpu", bf16_supported=bf16_supported) == "no"


def test_bf16_on_a_gpu_without_it_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"hyperparameters.bf16 needs a GPU with bf16 support"):
        mixed_precision(_spec(hyperparameters={"bf16": True}), "cuda", bf16_supported=False)


def test_float16_compute_trains_with_loss_scaling_on_a_gpu(tmp_path: Path) -> None:
    """fp16=True is what makes transformers' Trainer scale the loss (a GradScaler)."""
    fp16 = build_config(_spec(quantization={"compute_dtype": "float16"}), tmp_path, "cuda")
    assert fp16.fp16 and not fp16.bf16 and not fp16.use_cpu

    default = build_config(_spec(), tmp_path, "cuda")
    assert not default.fp16 and not default.bf16


def test_constant_scheduler_with_warmup_warms_up(tmp_path: Path) -> None:
    import torch
    from transformers import get_scheduler

    def learning_rates(**hyperparameters: Any) -> list[float]:
        config = build_config(
            _spec(hyperparameters={"learning_rate": 1.0, **hyperparameters}), tmp_path, "cpu"
        )
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=config.get_warmup_steps(10),
            num_training_steps=10,
        )
        rates = []
        for _ in range(10):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    assert learning_rates(lr_scheduler="constant", warmup_ratio=0.3) == pytest.approx(
        [0.0, 1 / 3, 2 / 3] + [1.0] * 7
    )
    assert learning_rates(lr_scheduler="constant", warmup_ratio=0.0) == [1.0] * 10
