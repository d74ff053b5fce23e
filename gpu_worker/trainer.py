"""Turn a JobSpec into a TRL config and trainer of its method, with the device's choices made
explicit (the per-method parts are in gpu_worker/methods.py).

The reference model (dpo, kto) is the base with the adapter disabled (TRL does this when it
gets a `peft_config`), so only one copy of the weights is in memory; a job continuing an adapter
(`init_from`) is referenced against that adapter, frozen (TRL's `ref` copy). Two choices differ
from what a plain TRL script gets, on purpose (docs/training-quality.md): the adapter's weights
stay float32 on every path, and the training step's mixed precision follows the base's compute
dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gpu_worker.errors import ConfigError
from gpu_worker.model import build_lora_config
from service.contract import JobSpec, learning_rate_of

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

Precision = Literal["bf16", "fp16", "no"]
"""Autocast dtype of the training step (`no`: each layer computes in its weights' dtype)."""


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

    On a CPU: bf16 mixed precision and Liger's kernels are refused (the user asked for them
    explicitly), 16-bit compute dtypes become float32, paged/8-bit optimizers become adamw_torch
    (both run on a CPU, but fall back to slow paths and change nothing about the result's
    quality) and torch_compile is turned off (a GPU speed-up; on a CPU its compile time
    dominates). On a GPU, Liger's kernels are refused unless `liger-kernel` is installed.
    """
    hp = spec.hyperparameters
    if hp.use_liger_kernel:
        _check_liger(device)
    if device != "cpu":
        return spec, []
    notes: list[str] = []
    if hp.bf16:
        raise ConfigError("bf16 needs a GPU: set hyperparameters.bf16 false")
    if hp.torch_compile:
        notes.append(
            "CPU worker: torch_compile True -> False (compiling takes longer than the short "
            "jobs a CPU worker runs save)"
        )
        hp = msgspec.structs.replace(hp, torch_compile=False)
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


def _check_liger(device: str) -> None:
    """Refuse Liger's kernels where they cannot run: they are Triton kernels (GPU only), and
    `liger-kernel` is not part of the worker's dependencies (it pulls in triton)."""
    import importlib.util

    if device == "cpu":
        raise ConfigError(
            "hyperparameters.use_liger_kernel needs a GPU (Liger's kernels are Triton "
            "kernels): set it false on a CPU worker"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            "hyperparameters.use_liger_kernel: the package liger-kernel is not installed in "
            "this worker (pip install liger-kernel in the worker image), or set it false"
        )


def mixed_precision(spec: JobSpec, device: str, *, bf16_supported: bool) -> Precision:
    """The training step's autocast dtype; the adapter's weights stay float32 whatever it is.

    - `hyperparameters.bf16` asks for bf16 autocast (refused on a CPU by `adapt_to_device`, and
      here on a GPU without bf16).
    - A 4/8-bit base computing in float16 gets fp16 autocast, which in transformers' Trainer
      also means loss scaling: without it, small gradients of float16 activations underflow to
      zero. (Loss scaling needs float32 trainable weights, which `build_trainer` ensures.)
    - Plain LoRA (`bits: null`) holds the base in float32, so on a GPU it autocasts to bf16
      where the GPU supports it, else to fp16 with loss scaling, instead of running every
      matmul in float32.
    - Otherwise no autocast: a 4/8-bit layer computes in `compute_dtype` (bfloat16 by default)
      inside bitsandbytes, and the small adapter matmuls in float32.
    """
    hp, quant = spec.hyperparameters, spec.quantization
    if device == "cpu":
        return "no"
    if hp.bf16:
        if not bf16_supported:
            raise ConfigError(
                "hyperparameters.bf16 needs a GPU with bf16 support (Ampere or newer): set it "
                "false (training then follows quantization.compute_dtype)"
            )
        return "bf16"
    if quant.bits is None:
        return "bf16" if bf16_supported else "fp16"
    return "fp16" if quant.compute_dtype == "float16" else "no"


def scheduler_name(spec: JobSpec) -> str:
    """transformers' scheduler for the spec: its `constant` would silently skip the warmup."""
    hp = spec.hyperparameters
    if hp.lr_scheduler == "constant" and hp.warmup_ratio > 0:
        return "constant_with_warmup"
    return hp.lr_scheduler


def build_config(
    spec: JobSpec,
    output_dir: Path,
    device: str,
    *,
    has_eval: bool = False,
    parallel: Mapping[str, Any] | None = None,
) -> TrainingArguments:
    """TRL's config of the spec's method; `spec` must already be adapted to the device.
    `parallel`: the settings of a multi-process run (`distributed.parallel_arguments`)."""
    from gpu_worker.methods import method_config

    common = training_arguments(spec, output_dir, device, has_eval=has_eval)
    return method_config(spec, common | dict(parallel or {}))


def training_arguments(
    spec: JobSpec, output_dir: Path, device: str, *, has_eval: bool = False
) -> dict[str, Any]:
    """The settings every method's config shares (transformers' TrainingArguments)."""
    import torch

    hp = spec.hyperparameters
    evaluate_during_training = has_eval and hp.eval_steps is not None
    bf16_supported = device == "cuda" and torch.cuda.is_bf16_supported()
    precision = mixed_precision(spec, device, bf16_supported=bf16_supported)
    return dict(
        output_dir=str(output_dir),
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        learning_rate=learning_rate_of(spec),
        num_train_epochs=hp.num_epochs,
        max_steps=hp.max_steps if hp.max_steps is not None else -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        # transformers 5 dropped warmup_ratio: a float in [0, 1) here is a ratio of all steps.
        warmup_steps=float(hp.warmup_ratio),
        lr_scheduler_type=scheduler_name(spec),
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        activation_checkpointing=hp.gradient_checkpointing,
        use_liger_kernel=hp.use_liger_kernel,
        torch_compile=hp.torch_compile,
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
        dataloader_num_workers=0,
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    config: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    callbacks: Sequence[TrainerCallback] = (),
    init_adapter: Path | None = None,
) -> Trainer:
    """The method's TRL trainer, wrapping `model` in a float32 LoRA adapter: a fresh one, whose
    reference (dpo, kto) is the bare base, or the one in `init_adapter`, whose reference is that
    adapter frozen."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from gpu_worker.callbacks import EndAtMaxSteps
    from gpu_worker.methods import method_trainer

    policy: PreTrainedModel | PeftModel = model
    peft_config: LoraConfig | None = build_lora_config(spec)
    if init_adapter is not None:
        policy, peft_config = continue_adapter(model, init_adapter), None
    trainer = method_trainer(
        spec.method,
        model=policy,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[EndAtMaxSteps(), *callbacks],
    )
    disable_base_dropout(model)  # the LoRA layers were injected into it in place
    disable_reference_dropout(model)
    assert trainer.model is not None
    keep_trainable_fp32(trainer.model)
    if init_adapter is not None:
        restore_adapter(trainer.model, init_adapter)
    # Our callback reports every log; the console printers would only duplicate it.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def train(trainer: Trainer, resume_from: str | None) -> bool:
    """`trainer.train()`, resuming from the checkpoint folder `resume_from`; False when that
    checkpoint was of the last step, so that nothing was left to train."""
    from gpu_worker.callbacks import AlreadyTrained

    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except AlreadyTrained:
        return False
    return True


def continue_adapter(model: PreTrainedModel, adapter_dir: Path) -> PeftModel:
    """`model` with the LoRA adapter in `adapter_dir` loaded trainable.

    Given a PeftModel and no reference model, TRL's DPOTrainer adds a frozen copy of the
    adapter named `ref` and computes the reference log-probs with it: DPO after SFT measures
    its rewards against the SFT model, as the DPO paper prescribes, not against the bare base.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def restore_adapter(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Set the continued adapter back to its exact saved (float32) weights.

    TRL's trainers round trainable weights to bfloat16 on a quantized base (see
    keep_trainable_fp32), after DPO's and KTO's copied them into their frozen `ref` adapter:
    without this, the policy would start one rounding away from the adapter it continues (and
    from its reference: measured rewards of about 1e-4 at step 1, not 0).
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)), adapter_name="default")


def disable_reference_dropout(model: torch.nn.Module) -> int:
    """Turn off the dropout of TRL's frozen `ref` adapter (present when an adapter is continued),
    so the reference log-probs, computed in train mode, are exact; returns how many."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and name.endswith("lora_dropout.ref"):
            count += module.p > 0
            module.p = 0.0
    return count


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


def keep_trainable_fp32(model: torch.nn.Module) -> None:
    """Put every trainable (adapter) weight back in float32.

    TRL 1.16's trainers cast them to bfloat16 on any 4- or 8-bit base, on every device (after
    the QLoRA paper); the optimizer then updates them with no float32 copy, so a step smaller
    than bf16's resolution at that weight (1/256 of it) rounds away: at our default learning
    rate most `lora_A` updates were lost. Must run before the optimizer is created (in `train`).
    A resumed run loads the checkpoint's adapter in float32 too (peft upcasts on load), so both
    paths train the same weights. Compute stays in the base's dtype: peft casts the layer's
    input to the adapter's dtype and its output back.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
