"""What an sft job's ROUGE compares the model's answers with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_worker.model import load_tokenizer
from gpu_worker.rouge import reference


def test_a_call_is_scored_in_the_form_the_template_writes_it(tiny_model_dir: Path) -> None:
    """The model learns to write a call as its template renders it; ROUGE compared its
    answer with the JSON the call was uploaded as, which no model writes."""
    tokenizer = load_tokenizer(tiny_model_dir)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    calling: dict[str, Any] = {
        "prompt": ask,
        "completion": [{"role": "assistant", "content": "", "tool_calls": [call]}],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
    }
    assert reference(calling, tokenizer) == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    said = {"prompt": ask, "completion": [{"role": "assistant", "content": "Sunny, 21 C."}]}
    assert reference(said, tokenizer) == "Sunny, 21 C."
    assert reference({"prompt": "Weather?", "completion": "Sunny."}, tokenizer) == "Sunny."
