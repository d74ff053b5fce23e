"""`python -m bench.plain_trl CONFIG_JSON`: the baseline training run, a plain TRL script.

A standalone QLoRA DPO script written from TRL's and transformers' documentation, with none of
our code: it maps a job spec's fields onto TRL's config by hand, as a careful user would, and
applies only what any CPU user must (bitsandbytes' repacking fix, see the stack notes).

CONFIG_JSON holds `model_dir`, `rows` (standard rows, JSONL), `eval_rows` (JSONL or null),
`out_dir`, `spec` (a whole job spec as the CPU worker runs it: every field filled in) and
`fp32_adapter`: true applies by hand our one fix that changes the arithmetic (float32 adapter
weights: TRL casts them to bfloat16 on a quantized base, see docs/training-quality.md), for
benchmarks that need both sides to run the same training.

It prints one JSON line: its phase timings, the loss at every step, the wall-clock time of every
training log (one per step) so step periods can be compared with the service's metric points,
and TRL's evaluation of the eval rows after training (empty without them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.time()


def _conversational(path: str) -> list[dict[str, Any]]:
    """Standard rows in TRL's conversational form, so TRL applies the chat template."""
    with open(path) as f:
        standard = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in standard
    ]


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    spec = config["spec"]
    hp, lora, quant = spec["hyperparameters"], spec["lora"], spec["quantization"]
    if quant["bits"] != 4:
        raise SystemExit("this script trains QLoRA: quantization.bits must be 4")
    import torch
    from bitsandbytes.nn.modules import Linear4bit
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    imported = time.time()
    rows = _conversational(config["rows"])
    eval_rows = _conversational(config["eval_rows"]) if config.get("eval_rows") else None
    compute_dtype = getattr(torch, quant["compute_dtype"])
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        config["model_dir"],
        dtype=compute_dtype,
        quantization_config=BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=compute_dtype,
        ),
    )
    for module in model.modules():  # bitsandbytes' CPU repacking breaks gradients otherwise
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    loaded = time.time()

    class Times(TrainerCallback):
        def __init__(self) -> None:
            self.log_times: list[float] = []
            self.step_seconds: list[float] = []
            self._began = 0.0

        def on_step_begin(self, args: object, state: object, control: object, **kw: object) -> None:
            self._began = time.perf_counter()

        def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
            self.step_seconds.append(time.perf_counter() - self._began)

        def on_log(
            self, args: object, state: object, control: object, logs: object = None, **kw: object
        ) -> None:
            if isinstance(logs, dict) and "loss" in logs:
                self.log_times.append(time.time())

    times = Times()
    args = DPOConfig(
        output_dir=config["out_dir"],
        use_cpu=True,
        bf16=False,
        beta=hp["beta"],
        loss_type=hp["loss_type"],
        label_smoothing=hp["label_smoothing"],
        learning_rate=hp["learning_rate"],
        num_train_epochs=hp["num_epochs"],
        max_steps=hp["max_steps"] or -1,
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        warmup_steps=hp["warmup_ratio"],  # transformers 5: a float below 1 is a ratio
        lr_scheduler_type=hp["lr_scheduler"],
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"],
        max_length=hp["max_length"],
        optim=hp["optimizer"],
        seed=hp["seed"],
        logging_steps=hp["logging_steps"],
        activation_checkpointing=hp["gradient_checkpointing"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
        callbacks=[times],
    )
    if config["fp32_adapter"]:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainer.train()
    trained = time.time()
    trainer.save_model(config["out_dir"] + "/adapter")
    saved = time.time()
    evaluation = {k: float(v) for k, v in trainer.evaluate().items()} if eval_rows else {}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(
        json.dumps(
            {
                "import_seconds": imported - STARTED,
                "load_seconds": loaded - imported,
                "train_seconds": trained - loaded,
                "save_seconds": saved - trained,
                "losses": losses,
                "log_times": times.log_times,
                "step_seconds": times.step_seconds,
                "eval": evaluation,
                "printed_at": time.time(),
            }
        )
    )


if __name__ == "__main__":
    main()
