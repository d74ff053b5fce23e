"""The GPU memory estimate as an operator meets it: which models it knows, what a job needs,
and which jobs `check_fits` refuses (and with what message)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service import vram
from service.contract import JobSpec


def spec(base_model: str = "meta-llama/Llama-2-7b-hf", **fields: Any) -> JobSpec:
    return msgspec.convert({"base_model": base_model, "dataset_id": "ds_x", **fields}, JobSpec)


def gb(job: JobSpec, models_dir: Path | None = None) -> float:
    found = vram.estimate(job, models_dir)
    assert found is not None
    return found.total_gb


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("llama-2-7b", 6.74e9),
        ("llama-2-70b", 68.98e9),
        ("qwen2.5-0.5b", 0.494e9),
        ("qwen2.5-14b", 14.77e9),
        ("qwen2.5-32b", 32.76e9),
        ("smollm2-135m", 134.5e6),
        ("meta-llama-3-8b", 8.03e9),
    ],
)
def test_built_in_shapes_add_up_to_the_published_parameter_counts(
    name: str, published: float
) -> None:
    assert vram.KNOWN[name].total_params == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize(
    ("ref", "known"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
        ("hf://Qwen/Qwen2.5-14B-Instruct", "qwen2.5-14b"),
        ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),  # not mistaken for the 7B
        ("meta-llama/Llama-2-70b-hf", "llama-2-70b"),
        ("s3://models/base/llama-2-13b/", "llama-2-13b"),
    ],
)
def test_well_known_models_are_recognised_by_name(ref: str, known: str) -> None:
    assert vram.architecture_for(ref) == vram.KNOWN[known]


@pytest.mark.parametrize(
    ("ref", "params"),
    [("my-org/support-bot-3B", 3e9), ("org/tiny-135M-chat", 135e6), ("org/x-0.5b", 0.5e9)],
)
def test_other_models_get_a_generic_shape_from_the_size_in_their_name(
    ref: str, params: float
) -> None:
    arch = vram.architecture_for(ref)
    assert arch is not None
    assert arch.total_params == pytest.approx(params, rel=0.15)


@pytest.mark.parametrize(
    "ref", ["org/mystery-model", "mistralai/Mixtral-8x7B-v0.1", "openai-community/gpt2-large"]
)
def test_unknown_shapes_have_no_estimate(ref: str) -> None:
    assert vram.architecture_for(ref) is None
    assert vram.estimate(spec(ref)) is None


def test_phi_2_has_its_real_size() -> None:
    # phi-2's GELU MLP is entered as a SwiGLU of the same weights: 2.78B parameters in all
    phi = vram.architecture_for("microsoft/phi-2")
    assert phi is not None and phi.total_params == pytest.approx(2.78e9, rel=0.01)


def test_sft_keeps_one_sequence_a_row_the_preference_methods_two() -> None:
    base = {"hyperparameters": {"max_length": 2048, "batch_size": 4}}
    sft = vram.estimate(spec("Qwen/Qwen2.5-7B-Instruct", method="sft", **base))
    dpo = vram.estimate(spec("Qwen/Qwen2.5-7B-Instruct", method="dpo", **base))
    assert sft is not None and dpo is not None
    assert sft.weights == dpo.weights
    assert 1.8 < dpo.activations / sft.activations <= 2.0


def write_config(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_7B_CONFIG = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}


def test_a_local_model_is_read_from_its_config_json(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "models" / "my-base", **LLAMA_7B_CONFIG)
    arch = vram.architecture_for(folder.as_uri(), tmp_path / "models")
    assert arch is not None and arch.total_params == vram.KNOWN["llama-2-7b"].total_params
    # The same shape as the table's: the same estimate.
    local = gb(spec(folder.as_uri()), tmp_path / "models")
    assert local == pytest.approx(gb(spec()))


def test_local_models_without_a_readable_dense_config_are_not_estimated(tmp_path: Path) -> None:
    models = tmp_path / "models"
    no_config = models / "empty"
    no_config.mkdir(parents=True)
    moe = write_config(models / "moe", **LLAMA_7B_CONFIG, num_local_experts=8)
    partial = write_config(models / "partial", hidden_size=64)
    outside = write_config(tmp_path / "elsewhere", **LLAMA_7B_CONFIG)
    for folder in (no_config, moe, partial, outside):
        assert vram.architecture_for(folder.as_uri(), models) is None, folder
    assert vram.architecture_for(moe.as_uri(), None) is None


def test_a_multimodal_config_uses_its_text_model(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "m" / "vlm", text_config=LLAMA_7B_CONFIG, vision_config={})
    arch = vram.architecture_for(folder.as_uri(), tmp_path / "m")
    assert arch is not None and arch.hidden_size == 4096


def test_qlora_estimates_land_near_the_published_rules_of_thumb() -> None:
    # LLaMA-Factory: QLoRA 4-bit needs about 6 GB for 7B, 12 GB for 14B, 48 GB for 70B.
    assert 5.0 <= gb(spec("meta-llama/Llama-2-7b-hf")) <= 7.5
    assert 10.0 <= gb(spec("Qwen/Qwen2.5-14B-Instruct")) <= 15.0
    assert 36.0 <= gb(spec("meta-llama/Llama-2-70b-hf")) <= 58.0


def test_four_bit_weights_cost_about_half_a_byte_per_parameter() -> None:
    arch = vram.KNOWN["llama-2-70b"]
    found = vram.estimate_for(arch, spec("meta-llama/Llama-2-70b-hf"))
    per_linear_param = (
        found.weights - arch.embedding_params * 2 - arch.norm_params * 2
    ) / arch.linear_params
    assert per_linear_param == pytest.approx(0.5 + (1 + 4 / 256) / 64)  # NF4 + double quant


def test_each_memory_saver_lowers_the_estimate() -> None:
    base = gb(spec())
    assert gb(spec(hyperparameters={"gradient_checkpointing": False})) > 2 * base
    assert gb(spec(hyperparameters={"max_length": 4096})) > base
    assert gb(spec(hyperparameters={"batch_size": 4})) > base
    assert gb(spec(quantization={"double_quant": False})) > base
    assert gb(spec(quantization={"bits": 8})) > base
    assert gb(spec(quantization={"bits": None})) > gb(spec(quantization={"bits": 8}))
    assert gb(spec(lora={"r": 64})) > base
    assert gb(spec(lora={"target_modules": ["q_proj", "v_proj"]})) < base
    assert gb(spec(hyperparameters={"optimizer": "paged_adamw_8bit"})) < base
    assert gb(spec(lora={"dropout": 0.0})) < base


def test_the_description_adds_up_to_the_total() -> None:
    found = vram.estimate(spec("Qwen/Qwen2.5-14B-Instruct"))
    assert found is not None
    text = found.describe()
    total = float(text.split()[1])
    parts = [float(p.rsplit(" ", 1)[1]) for p in text[text.index("(") + 1 : -1].split(", ")]
    assert total == pytest.approx(sum(parts), abs=0.3)


def test_check_fits_refuses_a_job_too_big_for_the_workers_and_says_what_it_needs() -> None:
    with pytest.raises(ValueError, match=r"needs about 4\d\.\d GB .* 24 GB") as info:
        vram.check_fits(spec("meta-llama/Llama-2-70b-hf"), 24.0, None)
    message = str(info.value)
    assert "llama-2-70b" in message and "max_length" in message


def test_check_fits_accepts_what_fits_and_skips_what_it_cannot_judge(tmp_path: Path) -> None:
    vram.check_fits(spec("meta-llama/Llama-2-7b-hf"), 24.0, None)
    vram.check_fits(spec("meta-llama/Llama-2-70b-hf"), None, None)  # no limit configured
    vram.check_fits(spec("org/mystery-model"), 1.0, None)  # unknown shape: no check
    vram.check_fits(spec((tmp_path / "absent").as_uri()), 1.0, tmp_path)


def test_check_fits_uses_a_local_models_own_config(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "big", **{**LLAMA_7B_CONFIG, "num_hidden_layers": 320})
    with pytest.raises(ValueError, match="GB"):
        vram.check_fits(spec(folder.as_uri()), 24.0, tmp_path)


# -- several GPUs per worker ---------------------------------------------------------------------


def test_under_ddp_each_gpu_holds_everything_plus_the_gradient_buckets() -> None:
    job = spec("meta-llama/Llama-2-7b-hf")
    one, four = vram.estimate(job), vram.estimate(job, gpus=4)
    assert one is not None and four is not None
    assert four.weights == one.weights and four.activations == one.activations
    # DDP's buckets: one more copy of the adapter's bf16 gradients (2 of its 8 bytes a weight).
    assert four.adapter == one.adapter * 10 // 8


def test_under_fsdp_the_weights_and_the_optimizer_state_shard_across_the_gpus() -> None:
    job = spec("meta-llama/Llama-2-70b-hf", parallelism={"strategy": "fsdp"})
    one, four = vram.estimate(job), vram.estimate(job, gpus=4)
    assert one is not None and four is not None
    assert four.activations == one.activations  # each GPU runs its own batch_size rows
    assert four.adapter == one.adapter // 4
    # A quarter of the weights, plus two decoder layers gathered whole (80 layers).
    assert one.weights / 4 < four.weights < one.weights / 4 + one.weights * 2 / 80
    assert vram.estimate(job, gpus=1) == one  # one GPU: nothing to shard


def test_check_fits_divides_by_the_gpus_only_where_fsdp_shards() -> None:
    big = "meta-llama/Llama-2-70b-hf"
    with pytest.raises(ValueError, match=r"per GPU \(4 GPUs\).*strategy 'fsdp'"):
        vram.check_fits(spec(big), 24.0, None, gpus=4)
    vram.check_fits(spec(big, parallelism={"strategy": "fsdp"}), 24.0, None, gpus=4)


def test_orpo_and_simpo_hold_the_embeddings_and_head_in_float32_on_a_quantized_base() -> None:
    """TRL's experimental trainers prepare a 4-bit base with peft, which upcasts them (the
    dpo path keeps them in the compute dtype); bf16 training casts them back."""
    arch = vram.architecture_for("Qwen/Qwen2.5-7B-Instruct", None)
    assert arch is not None
    outside = arch.embedding_params + arch.norm_params

    def weights(method: str, **hp: Any) -> int:
        job = spec("Qwen/Qwen2.5-7B-Instruct", method=method, hyperparameters=hp)
        return vram.estimate_for(arch, job).weights

    assert weights("orpo") - weights("dpo") == weights("simpo") - weights("dpo") == 2 * outside
    assert 2.0 < 2 * outside / 2**30 < 2.3  # GiB, for a 152k vocabulary and an untied head
    assert weights("orpo", bf16=True) == weights("dpo")
