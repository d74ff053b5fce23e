"""Guard against bitsandbytes' silent CPU gradient bug (see the stack notes).

On CPUs with AVX512-BF16, a 4-bit layer's first eval-mode forward without gradients repacks
its weight into an inference-only layout; afterwards no gradient flows through that layer, and
the only sign is a torch warning. Evaluation, reference log-probs and sample generations all do
such a forward, so without `load_model`'s fix a job would train on wrong gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from gpu_worker.data import apply_chat_template, to_dataset
from gpu_worker.model import build_lora_config, load_model, load_tokenizer
from gpu_worker.trainer import build_config, build_trainer
from service.contract import JobSpec

SPEC = msgspec.convert(
    {
        "base_model": "org/tiny",
        "dataset_id": "ds_x",
        "hyperparameters": {
            "learning_rate": 1e-3,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 128,
            "max_steps": 3,
            "warmup_ratio": 0.0,
            "gradient_checkpointing": False,
            "checkpoint_steps": 1000,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
    },
    JobSpec,
)


def _lora_grads(model_dir: Path, *, eval_forward_first: bool, fix: bool = True) -> dict[str, Any]:
    """Gradients of every LoRA weight for one LM loss, optionally after an eval-mode forward."""
    from bitsandbytes.nn.modules import Linear4bit
    from peft import get_peft_model

    model = load_model(model_dir, SPEC, "cpu")
    if not fix:
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    peft_model = get_peft_model(model, build_lora_config(SPEC))
    with torch.no_grad():  # B starts at zero, which would leave every lora_A without a gradient
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer(["How was the park? I think the park was great."], return_tensors="pt")
    if eval_forward_first:
        peft_model.eval()
        with torch.no_grad():
            peft_model(**batch)
    peft_model.train()
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    return {
        name: param.grad.clone()
        for name, param in peft_model.named_parameters()
        if param.requires_grad and param.grad is not None
    }


def test_lora_gradients_survive_an_eval_mode_forward(tiny_model_dir: Path) -> None:
    plain = _lora_grads(tiny_model_dir, eval_forward_first=False)
    after_eval = _lora_grads(tiny_model_dir, eval_forward_first=True)

    assert plain.keys() == after_eval.keys()
    assert len(plain) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in 2 blocks
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_fix_this_cpu_loses_gradients(tiny_model_dir: Path) -> None:
    """The control: shows the test above would catch the bug on this machine."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():  # type: ignore[no-untyped-call]
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks its weights")
    plain = _lora_grads(tiny_model_dir, eval_forward_first=False, fix=False)
    broken = _lora_grads(tiny_model_dir, eval_forward_first=True, fix=False)

    differing = [n for n, g in plain.items() if not torch.allclose(broken.get(n, 0 * g), g)]
    assert differing, "bitsandbytes no longer repacks on eval: the fix may be obsolete"


Weights = dict[str, torch.Tensor]


def _train(
    model_dir: Path, output_dir: Path, rows: list[dict[str, str]], *, evaluate_first: bool
) -> tuple[Weights, Weights, Weights, Weights]:
    """Train 3 steps with our builders: (LoRA before, LoRA after, base before, base after)."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, SPEC, "cpu")
    data = apply_chat_template(rows, tokenizer, SPEC.chat_template, print)
    trainer = build_trainer(
        model,
        tokenizer,
        SPEC,
        build_config(SPEC, output_dir, "cpu", has_eval=True),
        to_dataset(data[:48]),
        to_dataset(data[56:]),
    )

    def snapshot(lora: bool) -> Weights:
        assert trainer.model is not None
        return {
            n: p.detach().clone()
            for n, p in trainer.model.named_parameters()
            if ("lora_" in n) == lora
        }

    if evaluate_first:
        trainer.evaluate()
    lora_before, base_before = snapshot(True), snapshot(False)
    trainer.train()
    return lora_before, snapshot(True), base_before, snapshot(False)


@pytest.mark.slow
def test_training_after_evaluate_moves_lora_as_much_and_keeps_the_base(
    tiny_model_dir: Path, tiny_preference_rows: list[dict[str, str]], tmp_path: Path
) -> None:
    lora0, lora1, base0, base1 = _train(
        tiny_model_dir, tmp_path / "a", tiny_preference_rows, evaluate_first=False
    )
    e_lora0, e_lora1, _, e_base1 = _train(
        tiny_model_dir, tmp_path / "b", tiny_preference_rows, evaluate_first=True
    )

    assert len(lora0) == 28 and len(base0) > 0
    for name in lora0:
        assert not torch.equal(lora1[name], lora0[name]), f"{name} did not move"
        torch.testing.assert_close(e_lora0[name], lora0[name])
        torch.testing.assert_close(e_lora1[name], lora1[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, before in base0.items():  # the 4-bit base weights (packed uint8) and norms
        assert torch.equal(base1[name], before), f"base weight {name} changed"
        assert torch.equal(e_base1[name], before), f"base weight {name} changed"
