"""Preparing the rows: fetch and verify, chat template, duplicates, eval split by prompt, length."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.data import (
    MIN_COMPLETION_TOKENS,
    apply_chat_template,
    completion_token_ids,
    fetch_rows,
    fit_max_length,
    kto_rows,
    pair_token_ids,
    prompt_ids,
    prompt_key,
    remove_duplicates,
    split_eval,
    to_dataset,
)
from gpu_worker.errors import ConfigError, DatasetError
from gpu_worker.model import load_tokenizer
from service.blobs import BlobStore, open_store
from service.contract import ChatTemplate, DatasetRef, DroppedRows


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


def _pair(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_pair_tokens_split_prompt_and_completions_like_the_rendered_chat(tokenizer: Any) -> None:
    row = _pair("How was the park?", "It was great.", "It was awful.")
    rendered = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=False
    )

    ((n_prompt, chosen, rejected),) = pair_token_ids([row], tokenizer)

    assert n_prompt == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(chosen) == "It was great.<|im_end|>\n"
    assert tokenizer.decode(rejected) == "It was awful.<|im_end|>\n"
    # Raw text (no chat template): TRL appends EOS to each completion.
    plain = {"prompt": "How was the park? ", "chosen": "Great.", "rejected": "Awful."}
    ((_, chosen, _),) = pair_token_ids([plain], tokenizer)
    assert chosen[-1] == tokenizer.eos_token_id


def _trained_text(tokenizer: Any, *rows: dict[str, Any]) -> list[str]:
    """The runs of tokens the first of some sft rows trains on, decoded."""
    tokenized = to_dataset(list(rows), tokenizer, print)[0]
    ids, mask = tokenized["input_ids"], tokenized["completion_mask"]
    runs: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ids, mask, strict=True)):
        if on:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def test_a_chats_earlier_answers_are_trained_with_its_last(tokenizer: Any) -> None:
    """An sft chat trains every answer marked weight 1 and the completion, each with its
    end-of-turn tokens; the system and user turns and an unmarked answer are context."""
    chat = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How was the park?"},
            {"role": "assistant", "content": "It was great.", "weight": 1},
            {"role": "user", "content": "And the museum?"},
            {"role": "assistant", "content": "Closed."},
            {"role": "user", "content": "And the beach?"},
        ],
        "completion": [{"role": "assistant", "content": "Lovely and sunny."}],
    }
    assert _trained_text(tokenizer, chat) == [
        "It was great.<|im_end|>\n",
        "Lovely and sunny.<|im_end|>\n",
    ]
    whole = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in chat["prompt"]] + chat["completion"],
        tokenize=False,
    )
    tokenized = to_dataset([chat], tokenizer, print)[0]
    assert tokenizer.decode(tokenized["input_ids"]) == whole  # the chat as the model reads it

    # Rows without earlier answers stay as they are: TRL tokenizes them the same way itself.
    single = {"prompt": chat["prompt"][:2], "completion": chat["completion"]}
    assert to_dataset([single], tokenizer, print).to_list() == [single]
    # ... unless another row of the set needs its own tokenizing: then its completion alone.
    assert _trained_text(tokenizer, single, chat) == ["Lovely and sunny.<|im_end|>\n"]


MARKED_TEMPLATE = (  # the tiny template with TRL's answer marks (as TRL's training templates)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
THINKING_TEMPLATE = (  # like Qwen3's: only the chat's last answer carries its (empty) thoughts
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if loop.last and m['role'] == 'assistant' %}{{ '<think></think>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think></think>' }}{% endif %}"
)


def _chat_of_three() -> dict[str, Any]:
    return {
        "prompt": [
            {"role": "user", "content": "How was the park?"},
            {"role": "assistant", "content": "It was great.", "weight": 1},
            {"role": "user", "content": "And the museum?"},
            {"role": "assistant", "content": "Closed."},  # weight 0 in the file: context
            {"role": "user", "content": "And the beach?"},
        ],
        "completion": [{"role": "assistant", "content": "Lovely."}],
    }


def test_a_template_that_marks_answers_says_where_they_are(tiny_model_dir: Path) -> None:
    """Templates with {% generation %} marks (a model's own, or TRL's training template for its
    family) locate the answers; an answer the file left out stays context."""
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = MARKED_TEMPLATE
    assert _trained_text(tokenizer, _chat_of_three()) == [
        "It was great.<|im_end|>",
        "Lovely.<|im_end|>",
    ]


def test_marks_that_leave_the_end_of_turn_out_are_not_trusted(tiny_model_dir: Path) -> None:
    """A template whose own marks end before its end-of-turn token (TRL warns of it) would
    train answers the model never learns to stop after: the prefixes place them instead."""
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = MARKED_TEMPLATE.replace(
        "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert _trained_text(tokenizer, _chat_of_three()) == [
        "It was great.<|im_end|>\n",
        "Lovely.<|im_end|>\n",
    ]


def test_the_row_a_template_refuses_is_the_one_named(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'museum' in m['content'] %}"
        "{{ raise_exception('no museums') }}{% endif %}{% endfor %}" + tokenizer.chat_template
    )
    fine = {
        **_chat_of_three(),
        "prompt": [*_chat_of_three()["prompt"][:2], {"role": "user", "content": "And the zoo?"}],
    }
    refused = {
        **_chat_of_three(),
        "prompt": [
            {"role": "user", "content": "How was the museum?"},
            *_chat_of_three()["prompt"][1:],
        ],
    }
    with pytest.raises(DatasetError, match="no museums") as failed:
        to_dataset([fine, refused], tokenizer, print)
    assert "'How was the museum?'" in str(failed.value)
    # A chat cut after an answer that the template refuses leaves that answer unplaced.
    tokenizer.chat_template = (
        "{% if messages[-1]['content'] == 'It was great.' %}"
        "{{ raise_exception('a chat ends with a question') }}{% endif %}"
        + load_tokenizer(tiny_model_dir).chat_template
    )
    said: list[str] = []
    row = to_dataset([fine], tokenizer, said.append)[0]
    trained = [t for t, on in zip(row["input_ids"], row["completion_mask"], strict=True) if on]
    assert tokenizer.decode(trained) == "Lovely.<|im_end|>\n"
    assert said[0].startswith("1 of 1 earlier answers are not trained")


def test_answers_a_template_renders_otherwise_once_cut_are_left_and_counted(
    tiny_model_dir: Path,
) -> None:
    """A template that renders the chat's last answer otherwise (Qwen3's thoughts) and that
    TRL has no training template for: an earlier answer cannot be located, so it is not
    trained (rather than training the wrong tokens) and the job's log says how many."""
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = THINKING_TEMPLATE
    said: list[str] = []
    row = to_dataset([_chat_of_three()], tokenizer, said.append)[0]
    trained = [t for t, on in zip(row["input_ids"], row["completion_mask"], strict=True) if on]
    assert tokenizer.decode(trained) == "Lovely.<|im_end|>\n"
    assert len(said) == 1 and said[0].startswith("1 of 1 earlier answers are not trained")


WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def _tool_chat() -> dict[str, Any]:
    """OpenAI's tool-calling chat, as the upload stores it (arguments an object)."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    return {
        "prompt": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call], "weight": 1},
            {"role": "tool", "content": "21 degrees", "tool_call_id": "c1"},
        ],
        "completion": [{"role": "assistant", "content": "It is 21 degrees."}],
        "tools": WEATHER,
    }


def test_function_calls_train_and_their_results_are_context(tokenizer: Any) -> None:
    """A chat that calls a function trains the call and the answer after its result; the
    result (the tool's words) and the tools listed are what the model reads, not writes."""
    row = _tool_chat()
    assert _trained_text(tokenizer, row) == [
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n',
        "It is 21 degrees.<|im_end|>\n",
    ]
    tokenized = to_dataset([row], tokenizer, print)[0]
    assert tokenizer.decode(tokenized["input_ids"]).startswith(
        '<|im_start|>system\nTools: [{"type": "function", "function": {"name": "weather"'
    )
    # A call as the answer itself, no earlier answer: tokenized here too (the tools).
    alone = {"prompt": row["prompt"][:1], "completion": row["prompt"][1:2], "tools": WEATHER}
    assert _trained_text(tokenizer, alone) == [
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
    ]


def test_function_calls_need_a_template_that_renders_them(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = THINKING_TEMPLATE  # renders content alone: calls would vanish
    with pytest.raises(ConfigError, match="does not render function calls"):
        apply_chat_template([_tool_chat()], tokenizer, ChatTemplate(), print)


def test_a_row_the_template_refuses_fails_saying_which(tiny_model_dir: Path) -> None:
    """Llama 3.1's template raises on a message of several calls: the job says so and which
    row, instead of a bare TemplateError from deep inside the preparation."""
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{% for call in",
        "{% if (message['tool_calls'] or []) | length > 1 %}"
        "{{ raise_exception('This model only supports single tool-calls at once!') }}"
        "{% endif %}{% for call in",
    )
    row = _tool_chat()
    row["prompt"][1] = {**row["prompt"][1], "tool_calls": row["prompt"][1]["tool_calls"] * 2}
    with pytest.raises(DatasetError, match="single tool-calls at once") as failed:
        fit_max_length([row], tokenizer, 512)
    assert "'Weather in Paris?'" in str(failed.value)


def test_fit_max_length_counts_a_chat_by_the_answers_it_still_trains(tokenizer: Any) -> None:
    chat = {
        "prompt": [
            {"role": "user", "content": "How was the park?"},
            {"role": "assistant", "content": "It was great, I loved every minute.", "weight": 1},
            {"role": "user", "content": "the weather " * 40},
        ],
        "completion": [{"role": "assistant", "content": "Lovely."}],
    }
    tokenized = to_dataset([chat], tokenizer, print)[0]
    ids, mask = tokenized["input_ids"], tokenized["completion_mask"]
    first = mask.index(1)
    # The last prompt fills max_length, but the first answer still trains whole: kept.
    kept, dropped = fit_max_length([chat], tokenizer, first + 20)
    assert kept == [chat] and dropped.total == 0
    # Cut inside the first answer, with the completion gone: too few tokens left to train.
    kept, dropped = fit_max_length([chat], tokenizer, first + 2)
    assert kept == [] and dropped == DroppedRows(completion_budget_too_small=1)
    kept, dropped = fit_max_length([chat], tokenizer, first)
    assert kept == [] and dropped == DroppedRows(prompt_too_long=1)
    assert len(ids) > first + 20


def test_fit_max_length_drops_and_counts_pairs_without_a_preference_left(tokenizer: Any) -> None:
    shared = "I think the weather was lovely and the park was " * 3
    short = _pair("How was it?", "Great.", "Awful.")
    long_prompt = _pair("the weather " * 40, "Great.", "Awful.")
    same_start = _pair("How was it?", shared + "great.", shared + "awful.")
    ((n_prompt, chosen, rejected),) = pair_token_ids([same_start], tokenizer)
    first_difference = next(
        i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b
    )

    # Cut before the first differing token: both sides become the same tokens.
    max_length = n_prompt + first_difference
    kept, dropped = fit_max_length([short, long_prompt, same_start], tokenizer, max_length)
    assert kept == [short]
    assert dropped == DroppedRows(prompt_too_long=1, identical_after_truncation=1)
    assert dropped.total == 2
    # One token later the pair differs again and is kept.
    kept, dropped = fit_max_length([same_start], tokenizer, max_length + 1)
    assert kept == [same_start] and dropped.total == 0


def test_fit_max_length_drops_completions_cut_to_a_handful_of_tokens(tokenizer: Any) -> None:
    row = _pair("How was it?", "Great, I loved every minute of it.", "Awful, I hated all of it.")
    ((n_prompt, chosen, _),) = pair_token_ids([row], tokenizer)
    assert len(chosen) > MIN_COMPLETION_TOKENS

    kept, dropped = fit_max_length([row], tokenizer, n_prompt + MIN_COMPLETION_TOKENS - 1)
    assert kept == [] and dropped == DroppedRows(completion_budget_too_small=1)
    assert fit_max_length([row], tokenizer, n_prompt + MIN_COMPLETION_TOKENS)[0] == [row]
    # A pair that fits whole is kept however small the room left: nothing was cut.
    tiny = _pair("How was it?", "Yes.", "No.")
    ((n_tiny, c, r),) = pair_token_ids([tiny], tokenizer)
    assert fit_max_length([tiny], tokenizer, n_tiny + max(len(c), len(r)))[0] == [tiny]
    # A prompt of exactly max_length tokens leaves no room for the completion.
    assert fit_max_length([tiny], tokenizer, n_tiny)[1] == DroppedRows(prompt_too_long=1)


def test_prompt_key_ignores_case_spacing_and_format() -> None:
    key = prompt_key("How was  the PARK?")
    assert key == prompt_key([{"role": "user", "content": " how was the park? "}])
    assert key == prompt_key("How was the park\uff1f")  # NFKC: the full-width question mark
    assert key != prompt_key("How was the museum?")
    assert key != prompt_key([{"role": "system", "content": "How was the park?"}])


def test_exact_duplicates_are_removed_and_counted() -> None:
    a = {"prompt": "p", "chosen": "c", "rejected": "r"}
    b = {"prompt": "p", "chosen": "c", "rejected": "s"}
    same_as_a = {"rejected": "r", "chosen": "c", "prompt": "p"}  # key order does not matter

    assert remove_duplicates([a, b, same_as_a, a]) == ([a, b], 2)


def _prompts_x_pairs(prompts: int, pairs: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Question {p}?", "chosen": f"Good answer {k}.", "rejected": f"Bad answer {k}."}
        for p in range(prompts)
        for k in range(pairs)
    ]


def test_eval_split_is_by_prompt_seeded_and_keeps_order() -> None:
    rows = _prompts_x_pairs(100, 3)

    train, evals = split_eval(rows, 0.1, seed=42)

    # 10% of 300 rows: 10 whole prompts, none of them also on the training side.
    assert len(evals) == 30 and len(train) == 270
    eval_prompts = {r["prompt"] for r in evals}
    assert len(eval_prompts) == 10
    assert not eval_prompts & {r["prompt"] for r in train}
    assert [rows.index(r) for r in train] == sorted(rows.index(r) for r in train)
    assert split_eval(rows, 0.1, seed=42) == (train, evals)
    assert {r["prompt"] for r in split_eval(rows, 0.1, seed=43)[1]} != eval_prompts


def test_eval_split_groups_prompts_that_differ_only_in_case_or_spacing() -> None:
    rows = [
        {"prompt": "How was the park?", "chosen": "a", "rejected": "b"},
        {"prompt": "how was  the park?", "chosen": "c", "rejected": "d"},
        {"prompt": "How was the museum?", "chosen": "e", "rejected": "f"},
    ]
    for seed in range(10):
        train, evals = split_eval(rows, 0.3, seed=seed)
        keys = {prompt_key(r["prompt"]) for r in evals}
        assert keys and not keys & {prompt_key(r["prompt"]) for r in train}


def test_eval_split_edge_cases() -> None:
    rows = _prompts_x_pairs(5, 1)
    assert split_eval(rows, 0.0, seed=1) == (rows, [])
    assert len(split_eval(rows, 0.01, seed=1)[1]) == 1  # a fraction > 0 gives at least one row
    one_prompt = _prompts_x_pairs(1, 4)
    assert split_eval(one_prompt, 0.5, seed=1) == (one_prompt, [])  # never every prompt


def test_eval_prompts_are_rendered_like_training_prompts(tokenizer: Any) -> None:
    ids = prompt_ids("How was the park?", tokenizer, ChatTemplate(system_prompt="Be kind."))
    text = tokenizer.decode(ids)

    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert text.endswith("How was the park?<|im_end|>\n<|im_start|>assistant\n")
    raw = prompt_ids("How was the park?", tokenizer, ChatTemplate(apply=False))
    assert tokenizer.decode(raw) == "How was the park?"


def test_kto_rows_unpair_each_pair_and_mix_the_labels_in_a_seeded_order() -> None:
    """TRL reads kto's rows in order: left to it, 40 pairs trained as 40 chosen then 40
    rejected, and every batch held one label."""
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    rows = kto_rows(pairs, seed=3)
    assert len(rows) == 80
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in rows) == sorted(
        [(p["prompt"], p["chosen"], True) for p in pairs]
        + [(p["prompt"], p["rejected"], False) for p in pairs]
    )
    labels = [r["label"] for r in rows]
    mixed = sum(len(set(labels[i : i + 4])) == 2 for i in range(0, 80, 4))
    assert mixed >= 10, labels  # most batches of 4 hold both labels
    assert kto_rows(pairs, seed=3) == rows and kto_rows(pairs, seed=4) != rows
    unpaired = [{"prompt": f"q{i}", "completion": "c", "label": i < 20} for i in range(40)]
    shuffled = kto_rows(unpaired, seed=3)
    assert sorted(shuffled, key=str) == sorted(unpaired, key=str) and shuffled != unpaired


def _calling_pair(arguments: dict[str, Any], tools: Any = WEATHER) -> dict[str, Any]:
    """A preference row as the upload stores OpenAI's DPO rows that list functions."""
    call = {"type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {
        "prompt": [{"role": "user", "content": "Weather?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
        "rejected": [{"role": "assistant", "content": "Sunny, I guess."}],
        **({"tools": tools} if tools else {}),
    }


def test_preference_rows_that_call_functions_reach_trl_as_they_are(tokenizer: Any) -> None:
    """Rows whose calls take other arguments, and rows without tools: each reaches TRL as it
    was stored. Arrow's inferred structs gave every call every other row's arguments as null
    (which the template renders) and every message a null tool_calls."""
    rows = [
        _calling_pair({"city": "Paris"}),
        _calling_pair({"lat": 48.8, "lon": 2.3}, [*WEATHER, *WEATHER]),
        _calling_pair({"city": "Rome"}, None),
    ]
    dataset = to_dataset(rows, tokenizer)
    assert [dataset[i] for i in range(3)] == [{**r, "tools": r.get("tools")} for r in rows]


def test_preference_rows_are_fitted_to_length_with_their_tools(tokenizer: Any) -> None:
    """The tools' schema is part of every prompt: a prompt it makes too long is counted."""
    many = [
        {"type": "function", "function": {"name": f"tool_{i}", "parameters": {}}} for i in range(20)
    ]
    rows = [_calling_pair({"city": "Paris"}), _calling_pair({"city": "Paris"}, many)]
    [(n_short, *_), (n_long, *_)] = pair_token_ids(rows, tokenizer)
    assert n_long > n_short + 100
    kept, dropped = fit_max_length(rows, tokenizer, n_short + 40)
    assert (kept, dropped.prompt_too_long) == ([rows[0]], 1)


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_rows_are_rendered_with_their_tools(method: str, tokenizer: Any) -> None:
    """TRL's ORPO and CPO trainers render a conversational row without its tools: rows that
    call functions reach them rendered, each with its own tools (and the others without)."""
    plain = {**_calling_pair({}, None), "chosen": [{"role": "assistant", "content": "Rain."}]}
    dataset = to_dataset([_calling_pair({"city": "Paris"}), plain], tokenizer, method=method)
    calling, rendered_plain = dataset[0], dataset[1]
    assert calling["prompt"].startswith('<|im_start|>system\nTools: [{"type": "function"')
    assert calling["chosen"] == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
    )
    assert (
        rendered_plain["prompt"] == "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered_plain["chosen"] == "Rain.<|im_end|>\n"


def test_kto_unpairs_rows_with_their_tools_and_hands_them_to_trl_as_they_are(
    tokenizer: Any,
) -> None:
    """TRL's KTOTrainer renders each row with its own tools, as its DPOTrainer does."""
    pairs = [_calling_pair({"city": "Paris"}), _calling_pair({"lat": 1.5}, None)]
    unpaired = kto_rows(pairs, seed=3)
    assert sorted((r["label"], "tools" in r) for r in unpaired) == [
        (False, False), (False, True), (True, False), (True, True)
    ]  # fmt: skip
    dataset = to_dataset(unpaired, tokenizer)
    assert [dataset[i] for i in range(4)] == [{**r, "tools": r.get("tools")} for r in unpaired]
    prompt_tokens = {
        ("tools" in r, r["label"]): n
        for r, (n, _) in zip(unpaired, completion_token_ids(unpaired, tokenizer), strict=True)
    }
    assert prompt_tokens[True, True] > prompt_tokens[False, True]  # the tools' schema
