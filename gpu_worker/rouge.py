"""ROUGE-1/2/L of an sft job's answers to its eval prompts, against the eval rows' completions.

Eval loss says how well the model predicts the reference answers token by token; ROUGE says how
close what it actually writes (greedy, `max_new_tokens`) comes to them, as the SFT recipe this
service grew from reports. Google's `rouge-score` (the reference implementation's rules, Porter
stemming) scores each answer; the metrics are the mean F-measures over at most
MAX_ROUGE_ROWS eval rows, logged as `eval_rouge1`, `eval_rouge2` and `eval_rougeL`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpu_worker.data import completion_token_ids, is_conversational
from gpu_worker.generations import generate_one
from gpu_worker.turns import Row
from service.contract import JobSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_ROUGE_ROWS = 64
"""Eval rows answered for ROUGE: one greedy generation each, so the evaluating phase stays
bounded whatever the eval set's size (the eval loss still covers every row)."""
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(
    model: Any, tokenizer: PreTrainedTokenizerBase, rows: list[Row], spec: JobSpec, device: str
) -> dict[str, float]:
    """Mean ROUGE F-measures of the model's answers to the first MAX_ROUGE_ROWS eval rows."""
    import torch
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    sample = rows[:MAX_ROUGE_ROWS]
    model.eval()
    for row in sample:
        ids = torch.tensor([_prompt_ids(row, tokenizer)], device=device)
        with torch.no_grad():
            answer = generate_one(model, tokenizer, ids, spec.max_new_tokens)
        scores = scorer.score(reference(row, tokenizer), answer)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {f"eval_{name}": total / len(sample) for name, total in totals.items()}


def _prompt_ids(row: Row, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The row's prompt as training rendered it (chat template if the rows are messages)."""
    if is_conversational(row):
        encoded: Any = tokenizer.apply_chat_template(
            row["prompt"],
            tools=row.get("tools"),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
    else:
        encoded = tokenizer(row["prompt"])
    return list(encoded["input_ids"])


def reference(row: Row, tokenizer: PreTrainedTokenizerBase) -> str:
    """What the model should write for the row: its completion as training rendered it,
    without special tokens, as the model's answer is decoded. A function call is then
    scored in the template's own form (e.g. Qwen's ``<tool_call>{...}</tool_call>``), which
    is what a model writes, not as the JSON it was uploaded as."""
    completion = row["completion"]
    if isinstance(completion, str):
        return completion
    [(_, ids)] = completion_token_ids([row], tokenizer)
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
