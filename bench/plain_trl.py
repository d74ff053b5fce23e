"""`python -m bench.plain_trl MODEL_DIR ROWS_JSONL OUT_DIR MAX_STEPS`: the baseline training run.

A plain standalone QLoRA DPO script written from TRL's and transformers' documentation, with
none of our code: the same settings the bench's job spec asks of the service, plus by hand our
one fix that changes the arithmetic (float32 adapter weights: TRL casts them to bfloat16 on a
quantized base, see docs/training-quality.md), so both sides run the same training. It prints
one JSON line: its phase timings, the loss at every step, and the wall-clock time of every
training log (one per step) so step periods can be compared with the service's metric points.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.time()


def main() -> None:
    model_dir, rows_path, out_dir, max_steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
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
    with open(rows_path) as f:
        standard = [json.loads(line) for line in f if line.strip()]
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in standard
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
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
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        beta=0.1,
        learning_rate=1e-3,
        max_steps=int(max_steps),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=0.0,
        lr_scheduler_type="linear",
        max_length=128,
        optim="adamw_torch",  # the job spec's default; TRL's own default is the fused AdamW
        seed=42,
        logging_steps=1,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[times],
    )
    assert trainer.model is not None
    for param in trainer.model.parameters():  # as the service does: float32 adapter weights
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    trained = time.time()
    trainer.save_model(out_dir + "/adapter")
    saved = time.time()
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
                "printed_at": time.time(),
            }
        )
    )


if __name__ == "__main__":
    main()
