"""The job's preference rows: fetched from the blob store, templated, filtered by length, split.

Rows arrive canonical (the API normalized them): standard `{"prompt", "chosen", "rejected"}`
strings, or conversational lists of `{role, content}` messages. Everything here is a plain
function over lists of dicts, so it can be tested without a trainer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gpu_worker.errors import ConfigError, DatasetError
from service.blobs import BlobNotFound, BlobStore, dataset_blob_key
from service.contract import ChatTemplate, DatasetRef

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]
Message = dict[str, str]

_TOKENIZE_BATCH = 512


def fetch_rows(store: BlobStore, ref: DatasetRef, dest_dir: Path) -> list[Row]:
    """Download a dataset's JSONL into `dest_dir`, check its sha256 and parse it."""
    key = dataset_blob_key(ref.sha256)
    path = dest_dir / f"{ref.id}.jsonl"
    try:
        store.get_file(key, path)
    except BlobNotFound:
        raise DatasetError(
            f"dataset {ref.id} is missing from the blob store ({store.uri(key)}): upload it "
            "again and resubmit the job"
        ) from None
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != ref.sha256:
        raise DatasetError(
            f"dataset {ref.id} in the blob store is corrupted (sha256 {digest}, expected "
            f"{ref.sha256}): upload it again"
        )
    decoder = msgspec.json.Decoder(dict[str, Any])
    with path.open("rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]


def is_conversational(row: Row) -> bool:
    return isinstance(row.get("prompt"), list)


def apply_chat_template(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: ChatTemplate,
    log: Callable[[str], None],
) -> list[Row]:
    """Put rows in the form the trainer should see, following `spec.chat_template`.

    With `apply` and a tokenizer that has a template, every row becomes conversational (TRL
    then renders prompt and completions with the model's own template) and the system prompt,
    if given, is prepended where a row has none. Otherwise standard rows are trained on as raw
    text, and conversational rows, which cannot be rendered, are refused.
    """
    if not rows:
        return rows
    conversational = is_conversational(rows[0])
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not chat_template.apply or not has_template:
        if conversational:
            why = (
                "chat_template.apply is false"
                if not chat_template.apply
                else "the base model's tokenizer has no chat template"
            )
            raise ConfigError(
                f"{why}, so the conversational dataset cannot be rendered into text: use a chat "
                "model with a chat template (and chat_template.apply true) or standard rows"
            )
        if chat_template.apply:
            log("the base model's tokenizer has no chat template: training on the raw text")
        if chat_template.system_prompt is not None:
            log("chat_template.system_prompt is ignored: the rows are used as raw text")
        return rows
    system = chat_template.system_prompt
    out = []
    for row in rows:
        if conversational:
            prompt: list[Message] = list(row["prompt"])
            chosen, rejected = row["chosen"], row["rejected"]
        else:
            prompt = [{"role": "user", "content": row["prompt"]}]
            chosen = [{"role": "assistant", "content": row["chosen"]}]
            rejected = [{"role": "assistant", "content": row["rejected"]}]
        if system is not None and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def prompt_ids(
    prompt: str, tokenizer: PreTrainedTokenizerBase, chat_template: ChatTemplate
) -> list[int]:
    """Token ids of one eval prompt as the tuned model sees it at inference.

    Rendered with the chat template (and system prompt) when training used it, else raw text,
    the same way TRL tokenized the training prompts.
    """
    if not chat_template.apply or getattr(tokenizer, "chat_template", None) is None:
        plain: Any = tokenizer(prompt)
        return list(plain["input_ids"])
    messages = [{"role": "user", "content": prompt}]
    if chat_template.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": chat_template.system_prompt})
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def prompt_lengths(rows: list[Row], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens in each row's prompt, counted the way TRL tokenizes it."""
    lengths: list[int] = []
    for start in range(0, len(rows), _TOKENIZE_BATCH):
        batch = [row["prompt"] for row in rows[start : start + _TOKENIZE_BATCH]]
        encoded: Any
        if batch and isinstance(batch[0], list):
            encoded = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        else:
            encoded = tokenizer(batch)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def drop_long_prompts(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[Row], int]:
    """Rows whose prompt leaves room for a completion within max_length, and how many were not.

    A prompt of max_length tokens or more would be truncated to nothing but prompt: no
    completion token is left to learn from.
    """
    lengths = prompt_lengths(rows, tokenizer)
    kept = [row for row, n in zip(rows, lengths, strict=True) if n < max_length]
    return kept, len(rows) - len(kept)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded, deterministic (train, eval) split; eval gets at least one row if fraction > 0.

    The training rows keep their order; a dataset with a single row is not split.
    """
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    picked = set(random.Random(seed).sample(range(len(rows)), n_eval))
    train = [row for i, row in enumerate(rows) if i not in picked]
    evals = [row for i, row in enumerate(rows) if i in picked]
    return train, evals


def to_dataset(rows: list[Row]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list(rows)
