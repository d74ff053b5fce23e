"""The training methods: which TRL config and trainer each uses, and the settings of its own.

`trainer.training_arguments` gives what every method shares (schedule, batch, precision,
logging, checkpoints); each method here adds its own fields from the spec and names its
trainer. ORPO and SimPO come from `trl.experimental` through gpu_worker/trl_experimental.py.
Every trainer gets the same model, LoRA config, callbacks and fixes (`trainer.build_trainer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.contract import JobSpec, beta_of

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments


def method_config(spec: JobSpec, common: dict[str, Any]) -> TrainingArguments:
    """The TRL config of the spec's method: `common` plus the method's own settings."""
    # TRL's preference trainers would zero LoRA's dropout too (disable_dropout): build_trainer
    # turns off only the base model's. SFTTrainer leaves dropout alone.
    hp, beta = spec.hyperparameters, beta_of(spec)
    method = spec.method
    if method == "dpo":
        from trl.trainer.dpo_config import DPOConfig

        return DPOConfig(
            **common,
            disable_dropout=False,
            beta=beta,
            loss_type=[hp.loss_type.value],
            label_smoothing=hp.label_smoothing,
            max_length=hp.max_length,
            precompute_ref_log_probs=hp.precompute_ref_log_probs,
        )
    if method == "sft":
        from trl.trainer.sft_config import SFTConfig

        return SFTConfig(
            **common,
            max_length=hp.max_length,
            completion_only_loss=hp.completion_only_loss,
            # Best-fit packing is TRL's padding-free path: each row keeps its own positions
            # and attends only to itself. (padding_free without packing is refused by TRL
            # 1.16 whenever max_length is set, and DPOConfig's is disabled in 1.16.)
            packing=hp.packing,
            packing_strategy="bfd",
        )
    if method == "kto":
        from trl.trainer.kto_config import KTOConfig

        return KTOConfig(
            **common,
            disable_dropout=False,
            beta=beta,
            desirable_weight=hp.desirable_weight,
            undesirable_weight=hp.undesirable_weight,
            max_length=hp.max_length,
        )
    from gpu_worker import trl_experimental

    if method == "orpo":
        return trl_experimental.orpo_config(
            **common, disable_dropout=False, beta=beta, max_length=hp.max_length
        )
    assert method == "simpo", method
    return trl_experimental.simpo_config(
        **common,
        disable_dropout=False,
        beta=beta,
        simpo_gamma=hp.simpo_gamma,
        max_length=hp.max_length,
    )


def method_trainer(method: str, **kwargs: Any) -> Trainer:
    """The method's TRL trainer, built with `kwargs` (model, args, datasets, peft_config, ...)."""
    if method == "dpo":
        from trl.trainer.dpo_trainer import DPOTrainer

        return DPOTrainer(**kwargs)
    if method == "sft":
        from trl.trainer.sft_trainer import SFTTrainer

        return SFTTrainer(**kwargs)
    if method == "kto":
        from trl.trainer.kto_trainer import KTOTrainer

        return KTOTrainer(**kwargs)
    from gpu_worker import trl_experimental

    if method == "orpo":
        return trl_experimental.orpo_trainer(**kwargs)
    assert method == "simpo", method
    return trl_experimental.simpo_trainer(**kwargs)
