"""merge_adapter on a real (tiny) Llama: the merged checkpoint must behave like base + adapter.

The adapter is a fresh LoRA whose ``lora_B`` is randomly perturbed (peft initializes it to zero,
which would make any merge look right); training is tested elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.errors import ConfigError, ModelLoadError
from gpu_worker.merge import merge_adapter

FP32_TOLERANCE = 1e-4
"""Max |merged - (base + adapter)| logit difference in float32: only float rounding remains."""
BF16_TOLERANCE = 0.05
"""The same in bfloat16, where rounding W + BA to an 8-bit mantissa moves logits by ~1e-2."""


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every linear layer with lora_B drawn at random, saved without a tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def _inputs(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What do you think of the weather?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text += "I think the weather was wonderful and lovely."
    return tokenizer(text, return_tensors="pt")


def _logits(model: Any, inputs: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def _reference_logits(base_dir: Path, adapter: Path, dtype: str, inputs: Any) -> Any:
    """base + adapter through peft, on the unquantized base in the same dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    return _logits(PeftModel.from_pretrained(base, adapter).eval(), inputs)


def test_merged_model_matches_base_plus_adapter_in_float32(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge_adapter(tiny_model_dir, adapter_dir, out, dtype="float32")

    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    # The tokenizer came along, chat template included (from the base: the adapter has none).
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    inputs = _inputs(out)
    merged_logits = _logits(merged, inputs)
    reference = _reference_logits(tiny_model_dir, adapter_dir, "float32", inputs)
    base_logits = _logits(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), inputs
    )

    assert (merged_logits - reference).abs().max().item() <= FP32_TOLERANCE
    # The adapter matters, so the match above is not the base matching itself.
    assert (merged_logits - base_logits).abs().max().item() > 100 * FP32_TOLERANCE


def test_merge_in_bfloat16_saves_16_bit_weights(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-bf16"
    merge_adapter(tiny_model_dir, adapter_dir, out, dtype="bfloat16")

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - not a dict
    assert dtypes == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    inputs = _inputs(out)
    reference = _reference_logits(tiny_model_dir, adapter_dir, "bfloat16", inputs)
    assert (_logits(merged, inputs) - reference).abs().max().item() <= BF16_TOLERANCE


def test_merge_replaces_a_stale_output_dir(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    """A retried job merges into the same workdir: leftovers of the last attempt must go."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    merge_adapter(tiny_model_dir, adapter_dir, out, dtype="float32")
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging dir left


def test_prequantized_base_is_refused_before_loading(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base-bnb-4bit"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))

    with pytest.raises(ConfigError, match=r"pre-quantized.*16-bit"):
        merge_adapter(base, adapter_dir, tmp_path / "merged", dtype="bfloat16")
    assert not (tmp_path / "merged").exists()


def test_bad_dtype_and_missing_inputs_fail_with_a_clear_error(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="bfloat16, float16, float32"):
        merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "m", dtype="int8")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        merge_adapter(tmp_path / "nowhere", adapter_dir, tmp_path / "m", dtype="float32")
    with pytest.raises(ModelLoadError, match="cannot load the adapter"):
        merge_adapter(tiny_model_dir, tmp_path / "no-adapter", tmp_path / "m", dtype="float32")
    assert not (tmp_path / "m").exists()
