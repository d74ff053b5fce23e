"""sft, kto, orpo and simpo train like a plain TRL script of the same method, given the same
model, data and settings (test_training_matches_trl.py does the same for dpo).

Each reference is written from TRL's documentation without any of our builders, applying by
hand only the fix that changes the arithmetic (float32 adapter weights), so a wrong translation
of the spec into a method's config shows up as different per-step losses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.pipeline import run
from gpu_worker.reporter import ListReporter
from service.blobs import open_store
from service.settings import Settings
from tests.fixtures.tiny_model import conversational_rows, stage_job

COMMON: dict[str, Any] = {
    "learning_rate": 2e-3,
    "max_steps": 3,
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
OWN: dict[str, dict[str, Any]] = {
    "sft": {},
    "kto": {"beta": 0.2, "desirable_weight": 1.5},
    "orpo": {"beta": 0.2},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.7},
}


def _rows(method: str) -> list[dict[str, Any]]:
    pairs = conversational_rows(16)
    if method == "sft":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    if method == "kto":
        return [
            {
                "prompt": r["prompt"],
                "completion": r["chosen" if i % 2 else "rejected"],
                "label": bool(i % 2),
            }
            for i, r in enumerate(pairs)
        ]
    return pairs


ASSISTANT_TURNS_TEMPLATE = (  # renders as tiny_model.CHAT_TEMPLATE, answers marked for TRL
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson) + '</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _plain_trl_losses(
    method: str,
    model_dir: Path,
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    assistant_only_loss: bool = False,
    max_length: int = 96,
) -> list[float]:
    import torch
    from bitsandbytes.nn.modules import Linear4bit
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

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
    common = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        learning_rate=2e-3,
        max_steps=3,
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
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        args: Any = SFTConfig(**common, assistant_only_loss=assistant_only_loss)
        trainer_cls: Any = SFTTrainer
    elif method == "kto":
        from trl import KTOConfig, KTOTrainer

        args, trainer_cls = KTOConfig(**common, beta=0.2, desirable_weight=1.5), KTOTrainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args, trainer_cls = ORPOConfig(**common, beta=0.2), ORPOTrainer
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0)
        trainer_cls = CPOTrainer
    if method == "kto":  # as documented: kto's rows are shuffled once with the job's seed
        rows = list(rows)
        random.Random(7).shuffle(rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if assistant_only_loss:
        tokenizer.chat_template = ASSISTANT_TURNS_TEMPLATE
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    for param in trainer.model.parameters():  # our deliberate difference: float32 adapter weights
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _our_losses(
    method: str,
    rows: list[dict[str, Any]],
    hyperparameters: dict[str, Any],
    model_dir: Path,
    tmp_path: Path,
) -> list[float]:
    """The per-step losses of a job of ours on `rows`, with the reference's LoRA and 4-bit."""
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        model_dir,
        rows,
        method=method,
        eval_fraction=0.0,
        hyperparameters=hyperparameters,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True},
    )
    settings = Settings(models_dir=model_dir.parent, work_dir=tmp_path, device="cpu")
    reporter = ListReporter()
    run(job, tmp_path / "work", reporter, settings=settings, store=store)
    return [values["loss"] for _, values in reporter.points if "loss" in values]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "kto", "orpo", "simpo"])
def test_per_step_losses_equal_a_plain_trl_run(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = _rows(method)
    ours = _our_losses(method, rows, COMMON | OWN[method], tiny_model_dir, tmp_path)

    reference = _plain_trl_losses(method, tiny_model_dir, rows, tmp_path / "trl")

    assert len(ours) == len(reference) == 3
    assert ours == pytest.approx(reference, abs=1e-4)
    assert ours[-1] != ours[0]  # the adapter moved


WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def _chats(pairs: list[dict[str, Any]], tools: bool) -> list[list[dict[str, Any]]]:
    """Two answers a chat; with `tools`, the first is a function call and its result."""
    chats = []
    for i, pair in enumerate(pairs):
        after = pairs[(i + 1) % len(pairs)]
        first = pair["chosen"]
        if tools:
            city = {"city": f"City {i}"}
            call = {"type": "function", "function": {"name": "weather", "arguments": city}}
            first = [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": pair["chosen"][0]["content"]},
            ]
        chats.append([*pair["prompt"], *first, *after["prompt"][-1:], *after["chosen"]])
    return chats


@pytest.mark.slow
@pytest.mark.parametrize("tools", [False, True], ids=["answers", "function-calls"])
def test_sft_on_chats_trains_every_answer_like_trls_assistant_only_loss(
    tools: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A chat's earlier answers (marked weight 1 by the upload), function calls among them,
    train as TRL trains every assistant turn of a `messages` row with `assistant_only_loss`
    (the template's generation marks): same tokens in the loss, same per-step losses."""
    chats = _chats(conversational_rows(16), tools)
    rows = [
        {
            "prompt": [{**m, "weight": 1} if m["role"] == "assistant" else m for m in chat[:-1]],
            "completion": chat[-1:],
            **({"tools": WEATHER} if tools else {}),
        }
        for chat in chats
    ]
    ours = _our_losses("sft", rows, COMMON | {"max_length": 160}, tiny_model_dir, tmp_path)

    reference = _plain_trl_losses(
        "sft",
        tiny_model_dir,
        [{"messages": chat, **({"tools": WEATHER} if tools else {})} for chat in chats],
        tmp_path / "trl",
        assistant_only_loss=True,
        max_length=160,
    )

    assert len(ours) == len(reference) == 3
    assert ours == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
def test_kto_rows_that_call_functions_train_like_trl(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each row lists functions and the desirable completions call one: TRL's KTOTrainer
    renders each row with its own tools (from a JSON string column), and so do we."""
    rows = []
    for i, row in enumerate(_rows("kto")):
        if row["label"]:
            call = {"type": "function", "function": {"name": "weather", "arguments": {"n": i}}}
            row = {
                **row,
                "completion": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            }
        rows.append({**row, "tools": WEATHER})
    hyperparameters = COMMON | OWN["kto"] | {"max_length": 160}
    ours = _our_losses("kto", rows, hyperparameters, tiny_model_dir, tmp_path)

    given = [{**r, "tools": json.dumps(r["tools"])} for r in rows]
    reference = _plain_trl_losses("kto", tiny_model_dir, given, tmp_path / "trl", max_length=160)

    assert len(ours) == len(reference) == 3
    assert ours == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_rows_that_call_functions_train_as_trl_does_them_rendered(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """TRL's ORPO and CPO trainers render a conversational row without its tools: a TRL user
    renders such rows first, with TRL's own `apply_chat_template` and each row's tools, and
    so do we."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    rows = []
    for i, pair in enumerate(_rows(method)):
        call = {"type": "function", "function": {"name": "weather", "arguments": {"n": i}}}
        chosen = [{"role": "assistant", "content": "", "tool_calls": [call]}]
        rows.append({**pair, "chosen": chosen, "tools": WEATHER})
    hyperparameters = COMMON | OWN[method] | {"max_length": 160}
    ours = _our_losses(method, rows, hyperparameters, tiny_model_dir, tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    given = [apply_chat_template(r, tokenizer, tools=r["tools"]) for r in rows]
    assert "Tools: " in given[0]["prompt"]
    reference = _plain_trl_losses(method, tiny_model_dir, given, tmp_path / "trl", max_length=160)

    assert len(ours) == len(reference) == 3
    assert ours == pytest.approx(reference, abs=1e-4)
