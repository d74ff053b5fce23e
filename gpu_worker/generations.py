"""Before/after completions of a job's `eval_prompts`, from the model the user gets.

When a merged model is published, "after" comes from that model, loaded from the folder that
is uploaded, and "before" from the base in the same 16-bit dtype: the 4-bit model the adapter
trained on gives different greedy completions (issue 19: 3 of 4 prompts on SmolLM2-135M). With
only an adapter published, both come from the training model (the quantized base with the
adapter on and off), and each Generation says so in `generated_by`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpu_worker.data import prompt_ids
from service.contract import GeneratedBy, Generation, JobSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_ADAPTER_ON: dict[int | None, GeneratedBy] = {
    4: "adapter_on_4bit_base",
    8: "adapter_on_8bit_base",
    None: "adapter_on_base",
}


def generate_side_by_side(
    model: object, tokenizer: PreTrainedTokenizerBase, spec: JobSpec, device: str
) -> list[Generation]:
    """Greedy completions by the training model with the adapter disabled and enabled."""
    import torch

    generations = []
    model.eval()  # type: ignore[attr-defined]
    for prompt in spec.eval_prompts:
        ids = torch.tensor([prompt_ids(prompt, tokenizer, spec.chat_template)], device=device)
        with torch.no_grad():
            with model.disable_adapter():  # type: ignore[attr-defined]
                base = generate_one(model, tokenizer, ids, spec.max_new_tokens)
            tuned = generate_one(model, tokenizer, ids, spec.max_new_tokens)
        generations.append(
            Generation(
                prompt=prompt,
                base=base,
                tuned=tuned,
                generated_by=_ADAPTER_ON[spec.quantization.bits],
            )
        )
    return generations


def generate_with_merged(
    base_dir: Path,
    merged_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    device: str,
    *,
    dtype: str,
) -> list[Generation]:
    """Greedy completions by the base and by the merged model as published, both in `dtype`.

    One model in memory at a time; on a GPU each is spread over the visible GPUs (and the CPU if
    it must) by `device_map="auto"`, since a 16-bit model can be far larger than the 4-bit one
    that trained.
    """
    base = _complete_all(base_dir, tokenizer, spec, device, dtype)
    tuned = _complete_all(merged_dir, tokenizer, spec, device, dtype)
    return [
        Generation(prompt=p, base=b, tuned=t, generated_by="merged")
        for p, b, t in zip(spec.eval_prompts, base, tuned, strict=True)
    ]


def _complete_all(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase, spec: JobSpec, device: str, dtype: str
) -> list[str]:
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=getattr(torch, dtype),
        device_map="auto" if device == "cuda" else None,
    ).eval()
    try:
        texts = []
        for prompt in spec.eval_prompts:
            ids = torch.tensor(
                [prompt_ids(prompt, tokenizer, spec.chat_template)], device=model.device
            )
            with torch.no_grad():
                texts.append(generate_one(model, tokenizer, ids, spec.max_new_tokens))
        return texts
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate_one(
    model: object, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, n: int
) -> str:
    """The greedy continuation of `ids` (one prompt), at most `n` new tokens, as text."""
    import torch

    out = model.generate(  # type: ignore[attr-defined]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
