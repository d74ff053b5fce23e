"""Preparing the rows: fetch and verify, chat template, length filter, eval split."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.data import (
    apply_chat_template,
    drop_long_prompts,
    fetch_rows,
    prompt_ids,
    prompt_lengths,
    split_eval,
)
from gpu_worker.errors import ConfigError, DatasetError
from gpu_worker.model import load_tokenizer
from service.blobs import BlobStore, open_store
from service.contract import ChatTemplate, DatasetRef


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


def _ref(data: bytes, sha256: str | None = None) -> DatasetRef:
    digest = sha256 or hashlib.sha256(data).hexdigest()
    return DatasetRef(id="ds_a", sha256=digest, rows=data.count(b"\n"), format="standard")


def test_fetch_rows_reads_the_content_addressed_blob(store: BlobStore, tmp_path: Path) -> None:
    data = (
        b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n'
        b'{"prompt": "q", "chosen": "d", "rejected": "s"}\n'
    )
    ref = _ref(data)
    store.put_bytes(f"datasets/{ref.sha256}.jsonl", data)

    rows = fetch_rows(store, ref, tmp_path / "data")

    assert rows == [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "q", "chosen": "d", "rejected": "s"},
    ]


def test_missing_or_corrupted_dataset_is_a_dataset_error(store: BlobStore, tmp_path: Path) -> None:
    data = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
    ref = _ref(data)
    with pytest.raises(DatasetError, match=r"dataset ds_a is missing from the blob store"):
        fetch_rows(store, ref, tmp_path / "data")

    store.put_bytes(f"datasets/{ref.sha256}.jsonl", data.replace(b"p", b"x"))
    with pytest.raises(DatasetError, match="corrupted"):
        fetch_rows(store, ref, tmp_path / "data")


def test_standard_rows_become_chat_messages_with_the_system_prompt(tokenizer: Any) -> None:
    rows = [{"prompt": "How was it?", "chosen": "Great.", "rejected": "Awful."}]
    logs: list[str] = []

    out = apply_chat_template(rows, tokenizer, ChatTemplate(system_prompt="Be kind."), logs.append)

    assert out == [
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "How was it?"},
            ],
            "chosen": [{"role": "assistant", "content": "Great."}],
            "rejected": [{"role": "assistant", "content": "Awful."}],
        }
    ]
    assert logs == []


def test_conversational_rows_keep_their_own_system_turn(
    tokenizer: Any, tiny_conversational_rows: list[dict[str, Any]]
) -> None:
    out = apply_chat_template(
        tiny_conversational_rows[:2], tokenizer, ChatTemplate(system_prompt="Be brief."), print
    )

    assert out[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert out[1]["prompt"] == tiny_conversational_rows[1]["prompt"]  # had one already
    assert tiny_conversational_rows[0]["prompt"][0]["role"] == "user"  # input not mutated


def test_without_the_template_standard_rows_stay_text_and_conversational_ones_fail(
    tokenizer: Any, tiny_conversational_rows: list[dict[str, Any]]
) -> None:
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    assert apply_chat_template(rows, tokenizer, ChatTemplate(apply=False), print) == rows
    with pytest.raises(ConfigError, match=r"chat_template\.apply is false"):
        apply_chat_template(tiny_conversational_rows, tokenizer, ChatTemplate(apply=False), print)


def test_a_tokenizer_without_a_chat_template_trains_on_raw_text(
    tiny_model_dir: Path, tiny_conversational_rows: list[dict[str, Any]]
) -> None:
    plain = load_tokenizer(tiny_model_dir)
    plain.chat_template = None
    logs: list[str] = []
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]

    assert apply_chat_template(rows, plain, ChatTemplate(), logs.append) == rows
    assert logs == ["the base model's tokenizer has no chat template: training on the raw text"]
    with pytest.raises(ConfigError, match="has no chat template"):
        apply_chat_template(tiny_conversational_rows, plain, ChatTemplate(), logs.append)


def test_prompt_lengths_count_the_rendered_prompt(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "How was the park?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    (length,) = prompt_lengths([{"prompt": messages, "chosen": [], "rejected": []}], tokenizer)

    assert length == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert prompt_lengths([{"prompt": "How was the park?"}], tokenizer) == [
        len(tokenizer("How was the park?")["input_ids"])
    ]


def test_rows_whose_prompt_fills_max_length_are_dropped_and_counted(tokenizer: Any) -> None:
    short = {"prompt": "How was it?", "chosen": "Great.", "rejected": "Awful."}
    long = {"prompt": "the weather " * 40, "chosen": "Great.", "rejected": "Awful."}
    n_short = prompt_lengths([short], tokenizer)[0]

    kept, dropped = drop_long_prompts([short, long, short, long, long], tokenizer, 32)
    assert kept == [short, short] and dropped == 3
    # A prompt of exactly max_length tokens leaves no room for the completion.
    assert drop_long_prompts([short], tokenizer, n_short) == ([], 1)
    assert drop_long_prompts([short], tokenizer, n_short + 1) == ([short], 0)


def test_eval_split_is_seeded_disjoint_and_keeps_order() -> None:
    rows = [{"prompt": str(i)} for i in range(100)]

    train, evals = split_eval(rows, 0.1, seed=42)

    assert len(train) == 90 and len(evals) == 10
    assert sorted(r["prompt"] for r in train + evals) == sorted(r["prompt"] for r in rows)
    assert [int(r["prompt"]) for r in train] == sorted(int(r["prompt"]) for r in train)
    assert split_eval(rows, 0.1, seed=42) == (train, evals)
    assert split_eval(rows, 0.1, seed=43)[1] != evals


def test_eval_split_edge_cases() -> None:
    rows = [{"prompt": str(i)} for i in range(5)]
    assert split_eval(rows, 0.0, seed=1) == (rows, [])
    assert len(split_eval(rows, 0.01, seed=1)[1]) == 1  # a fraction > 0 gives at least one row
    assert split_eval(rows[:1], 0.5, seed=1) == (rows[:1], [])  # never the only training row


def test_eval_prompts_are_rendered_like_training_prompts(tokenizer: Any) -> None:
    ids = prompt_ids("How was the park?", tokenizer, ChatTemplate(system_prompt="Be kind."))
    text = tokenizer.decode(ids)

    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert text.endswith("How was the park?<|im_end|>\n<|im_start|>assistant\n")
    raw = prompt_ids("How was the park?", tokenizer, ChatTemplate(apply=False))
    assert tokenizer.decode(raw) == "How was the park?"
