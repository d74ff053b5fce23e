"""Fold a trained LoRA adapter into its base model, giving a plain transformers checkpoint.

The adapter was trained on top of 4-bit NF4 weights, but it is merged into the base reloaded in
16-bit: merging into 4-bit weights would requantize ``W + BA`` and lose most of the update (and
peft then saves a dequantized approximation of that). So the base is read again from disk in
``bfloat16``/``float16`` and the LoRA delta is added at that precision.

The merge runs on the CPU: it is a one-off elementwise add per layer, and keeping it off the GPU
means it cannot run out of GPU memory next to whatever the training left behind.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from gpu_worker.errors import ConfigError, ModelLoadError

MergeDtype = Literal["bfloat16", "float16", "float32"]
_DTYPES: tuple[MergeDtype, ...] = ("bfloat16", "float16", "float32")


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str) -> None:
    """Write ``base + adapter`` merged to ``out_dir`` (safetensors, config, tokenizer).

    ``dtype`` is the precision the base is reloaded, merged and saved in: ``bfloat16`` or
    ``float16`` in production (the base's own 16-bit width). ``float32`` is allowed for tests on
    the CPU: comparing the merged model with base+adapter needs a precision where the only
    difference is float rounding of the merge itself (~1e-6); in 16-bit, rounding ``W + BA``
    to bf16's 8-bit mantissa moves logits by ~1e-2 and would hide a wrong merge.

    The tokenizer (with its chat template) comes from ``adapter_dir`` if the trainer saved one
    there, else from ``base_dir``. ``out_dir`` is replaced as a whole: it holds either the
    complete merged model or, if anything fails, whatever it held before.

    Raises ConfigError for a pre-quantized base (its 16-bit weights do not exist to merge into)
    and ModelLoadError if the base or the adapter cannot be loaded.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"merge dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    _check_not_prequantized(base_dir)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the base model from {base_dir} to merge: {exc}") from exc
    if getattr(base, "hf_quantizer", None) is not None:  # belt and braces after the config check
        raise ConfigError(_PREQUANTIZED_MESSAGE.format(base_dir=base_dir))
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the adapter from {adapter_dir}: {exc}") from exc

    # safe_merge checks every merged weight for NaN/inf, so a diverged adapter fails here
    # instead of being published as a broken model.
    merged = model.merge_and_unload(safe_merge=True)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-merging-", dir=out_dir.parent))
    try:
        # transformers 5 always writes safetensors (its `safe_serialization` flag is gone).
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        del merged, model, base
        gc.collect()


_PREQUANTIZED_MESSAGE = (
    "the base model in {base_dir} is stored pre-quantized (its config.json has a "
    "quantization_config), so there are no 16-bit weights to merge the adapter into; "
    "use the original 16-bit checkpoint as base_model, or set output.artifacts to 'adapter'"
)


def _check_not_prequantized(base_dir: Path) -> None:
    """Refuse before loading anything: a quantized checkpoint cannot give an exact merge."""
    config = base_dir / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"no config.json in {base_dir}: not a transformers model folder")
    try:
        data = json.loads(config.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("quantization_config"):
        raise ConfigError(_PREQUANTIZED_MESSAGE.format(base_dir=base_dir))
