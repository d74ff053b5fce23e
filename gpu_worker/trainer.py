"""Turn a JobSpec into TRL's DPOConfig and DPOTrainer, with the CPU choices made explicit.

The reference model is the base with the adapter disabled (TRL does this when it gets a
`peft_config`), so only one copy of the weights is in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from gpu_worker.errors import ConfigError
from gpu_worker.model import build_lora_config
from service.contract import JobSpec

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer


def resolve_device(setting: str) -> str:
    """`cpu` or `cuda` from the worker's `device` setting (`auto` picks cuda if present)."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting not in ("cpu", "cuda"):
        raise ConfigError(f"worker device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the worker is configured with device=cuda but no GPU is visible")
    return setting


def adapt_to_device(spec: JobSpec, device: str) -> tuple[JobSpec, list[str]]:
    """The spec as this device can run it, and one log line per change made.

    On a CPU: bf16 mixed precision is refused (the user asked for it explicitly), 16-bit
    compute dtypes become float32 and paged/8-bit optimizers become adamw_torch (both run on a
    CPU, but fall back to slow paths and change nothing about the result's quality).
    """
    if device != "cpu":
        return spec, []
    notes: list[str] = []
    hp = spec.hyperparameters
    if hp.bf16:
        raise ConfigError("bf16 needs a GPU: set hyperparameters.bf16 false")
    quant = spec.quantization
    if quant.bits is not None and quant.compute_dtype != "float32":
        notes.append(
            f"CPU worker: quantization.compute_dtype {quant.compute_dtype} -> float32 "
            "(16-bit matmuls are emulated and slow on a CPU)"
        )
        quant = msgspec.structs.replace(quant, compute_dtype="float32")
    if hp.optimizer != "adamw_torch":
        notes.append(
            f"CPU worker: optimizer {hp.optimizer} -> adamw_torch "
            "(paged and 8-bit optimizers are GPU memory savers)"
        )
        hp = msgspec.structs.replace(hp, optimizer="adamw_torch")
    return msgspec.structs.replace(spec, hyperparameters=hp, quantization=quant), notes


def build_dpo_config(
    spec: JobSpec, output_dir: Path, device: str, *, has_eval: bool = False
) -> DPOConfig:
    """TRL's config from our spec; `spec` must already be adapted to the device."""
    from trl.trainer.dpo_config import DPOConfig

    hp = spec.hyperparameters
    evaluate_during_training = has_eval and hp.eval_steps is not None
    return DPOConfig(
        output_dir=str(output_dir),
        use_cpu=device == "cpu",
        bf16=hp.bf16,
        fp16=False,
        beta=hp.beta,
        loss_type=[hp.loss_type.value],
        label_smoothing=hp.label_smoothing,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_epochs,
        max_steps=hp.max_steps if hp.max_steps is not None else -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        # transformers 5 dropped warmup_ratio: a float in [0, 1) here is a ratio of all steps.
        warmup_steps=float(hp.warmup_ratio),
        lr_scheduler_type=hp.lr_scheduler,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        max_length=hp.max_length,
        seed=hp.seed,
        data_seed=hp.seed,
        activation_checkpointing=hp.gradient_checkpointing,
        optim=hp.optimizer,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        eval_strategy="steps" if evaluate_during_training else "no",
        eval_steps=hp.eval_steps if evaluate_during_training else None,
        save_strategy="steps",
        save_steps=hp.checkpoint_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        # TRL would also zero LoRA's dropout; build_trainer turns off only the base model's.
        disable_dropout=False,
        dataloader_num_workers=0,
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    config: DPOConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    callbacks: Sequence[TrainerCallback] = (),
) -> DPOTrainer:
    """A DPOTrainer that wraps `model` in a fresh LoRA adapter; the reference is the bare base."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_lora_config(spec),
        callbacks=list(callbacks),
    )
    disable_base_dropout(model)  # the LoRA layers were injected into it in place
    # Our callback reports every log; the console printers would only duplicate it.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def disable_base_dropout(model: torch.nn.Module) -> int:
    """Turn off the base model's dropout, keep the adapter's (`lora.dropout`); returns how many
    dropouts were turned off.

    TRL's `disable_dropout` zeroes LoRA's dropout as well, so `lora.dropout` would do nothing.
    The base's must go: the reference log-probs come from this model with the adapter
    disabled, in train mode, and base dropout would make them noisy and the policy differ from
    the reference before the first step. LoRA dropout acts only on the adapter's path, which
    the reference pass skips, and lora_B starts at zero, so step 1 still starts at loss ln 2.
    Attention dropout, which models apply as a float (`attention_dropout`) rather than a
    Dropout module, is turned off too (TRL misses it).
    """
    import torch

    count = 0
    for name, module in model.named_modules():
        rate = getattr(module, "attention_dropout", None)
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name.split("."):
            count += module.p > 0
            module.p = 0.0
        elif isinstance(rate, float):
            count += rate > 0
            module.attention_dropout = 0.0
    return count
