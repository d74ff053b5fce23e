"""`python -m bench.vram_measure ARCH_JSON WORKDIR BOTH`: the bytes a 4-bit load really takes.

Builds a randomly initialized Llama-style model of the given shape (no download), saves it,
loads it back through transformers + bitsandbytes in 4-bit NF4 on the CPU, with double
quantization (and without, if BOTH is "True"), and counts the bytes of every tensor the loaded
model holds: packed 4-bit weights, their quantization constants (absmax, nested absmax, code
tables, offsets), and the parameters and buffers left unquantized. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _bytes(model: Any) -> int:
    import torch
    from bitsandbytes.nn.modules import Linear4bit

    seen: set[int] = set()
    total = 0

    def count(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state  # type: ignore[attr-defined]
            for t in (state.absmax, state.code, state.offset):
                count(t)
            if state.state2 is not None:
                count(state.state2.absmax)
                count(state.state2.code)
    for t in [*model.parameters(), *model.buffers()]:
        count(t)
    return total


def main() -> None:
    arch, workdir, both = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "True"
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        tie_word_embeddings=arch["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(workdir)
    params = sum(p.numel() for p in model.parameters())
    del model
    out: dict[str, Any] = {"params": params}
    for double_quant in (True, False) if both else (True,):
        loaded = AutoModelForCausalLM.from_pretrained(
            workdir,
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        )
        out["double_quant" if double_quant else "single_quant"] = _bytes(loaded)
        del loaded
    print(json.dumps(out))


if __name__ == "__main__":
    main()
