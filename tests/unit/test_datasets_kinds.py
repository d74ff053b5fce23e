"""sft and unpaired rows: detected, normalized, refused with line and field, from any container."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest

from service.contract import FieldMapping
from service.datasets.validate import IngestResult, InvalidDataset, validate_file
from tests.fixtures.openai_sdk import OPENAI_WEATHER_TOOL


def validate(
    tmp_path: Path, rows: list[Any], name: str = "d.jsonl", **kwargs: Any
) -> tuple[IngestResult, list[dict[str, Any]]]:
    path = tmp_path / name
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    out = io.BytesIO()
    result = validate_file(path, out, **kwargs)
    return result, [json.loads(line) for line in out.getvalue().splitlines()]


def test_text_rows_among_chats_become_chats_in_either_order(tmp_path: Path) -> None:
    """As preference files do: a system column in some rows only (or chats after texts)
    makes the dataset conversational, each text row one user turn and one answer, said in a
    warning (it was refused: "give every row texts, or every row messages")."""
    rows = [
        {"prompt": "Hi", "completion": "Hello", "label": True},
        {"system": "Be brief.", "prompt": "Hi2", "completion": "Hello2", "label": False},
        {"prompt": "Hi3", "completion": "Hello3", "label": True},
    ]
    result, out = validate(tmp_path, rows)
    assert (result.kind, result.format, result.rows) == ("unpaired", "conversational", 3)
    assert out[0] == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
        "label": True,
    }
    assert out[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert out[2]["completion"] == [{"role": "assistant", "content": "Hello3"}]
    [warning] = result.warnings
    assert (warning.kind, warning.count, warning.lines) == ("made_conversational", 2, [1, 3])
    chats_first = [{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, rows[0]]
    result, out = validate(
        tmp_path, [{k: v for k, v in r.items() if k != "label"} for r in chats_first]
    )
    assert result.format == "conversational" and out[1]["prompt"] == [
        {"role": "user", "content": "Hi"}
    ]


def test_a_row_repeated_across_the_switch_to_chats_is_a_duplicate(tmp_path: Path) -> None:
    """A text row, a chat (the file becomes conversations), the text row again and as the
    chat it stands for: both repeats are duplicates (texts and chats were hashed apart). The
    same texts with the other label are not."""
    rows = [
        {"prompt": "Hi", "completion": "Hello", "label": True},
        {"system": "Be brief.", "prompt": "Hi2", "completion": "Hello2", "label": False},
        {"prompt": "Hi", "completion": "Hello", "label": True},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
            "label": True,
        },
        {"prompt": "Hi", "completion": "Hello", "label": False},
    ]
    result, _ = validate(tmp_path, rows)
    [warning] = [w for w in result.warnings if w.kind == "duplicate"]
    assert (warning.count, warning.lines) == (2, [3, 4])


def test_a_history_field_puts_the_earlier_turns_first(tmp_path: Path) -> None:
    """sft and kto rows take history_field as preference rows do (it was accepted and the
    earlier turns dropped, while a warning said to map the column that was mapped)."""
    row = {"q": "Hi", "a": "Hello", "l": False, "turns": [["Earlier q", "Earlier a"]]}
    mapping = FieldMapping(
        prompt_field="q", completion_field="a", label_field="l", history_field="turns"
    )
    result, out = validate(tmp_path, [row], mapping=mapping)
    assert result.kind == "unpaired"
    assert [w.kind for w in result.warnings] == ["one_label"]  # no column left out
    assert out[0] == {
        "prompt": [
            {"role": "user", "content": "Earlier q"},
            {"role": "assistant", "content": "Earlier a"},
            {"role": "user", "content": "Hi"},
        ],
        "completion": [{"role": "assistant", "content": "Hello"}],
        "label": False,
    }


def test_a_system_column_left_out_is_named(tmp_path: Path) -> None:
    """Every system column counted as used, so one left out went silently: the blank
    'system' was taken over the pirate's 'system_prompt', the second of two columns was
    dropped, and so was a column beside a chat that opens with its own system message."""
    chat = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    rows = [
        {"prompt": "Hi", "completion": "Hello", "system": "", "system_prompt": "A pirate."},
        {"prompt": "Hi2", "completion": "Hello2", "system_message": "Nice.", "system": "Mean."},
        {"messages": chat, "system": "S2"},
    ]
    result, out = validate(tmp_path, rows)
    assert out[0]["prompt"][0] == {"role": "system", "content": "A pirate."}
    assert out[1]["prompt"][0] == {"role": "system", "content": "Mean."}
    assert out[2]["prompt"][0] == {"role": "system", "content": "S1"}
    ignored = {w.msg.split(" ignored")[0]: w.lines for w in result.warnings}
    assert ignored == {"column 'system_message'": [2], "column 'system'": [3]}


def test_the_kind_is_told_from_the_first_rows_that_can_be_read(tmp_path: Path) -> None:
    """A first line cut short made an sft file a preference one (every row 'missing field
    chosen', even with skip); a kto file whose first row lacks its label was taken as sft,
    its labels ignored."""
    path = tmp_path / "cut.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(3)]
    path.write_text('{"prompt": "a", "completion": "b"\n' + "\n".join(good) + "\n")
    result = validate_file(path, io.BytesIO(), on_invalid="skip", max_invalid_fraction=0.5)
    assert (result.kind, result.rows) == ("sft", 3)
    rows = [
        {"prompt": "q0", "completion": "a0"},
        {"prompt": "q1", "completion": "a1", "label": True},
        {"prompt": "q2", "completion": "a2", "label": False},
    ]
    with pytest.raises(InvalidDataset) as refused:
        validate(tmp_path, rows)
    [error] = refused.value.errors
    assert (error.line, error.field) == (1, "label")


def test_llama_factory_sft_and_kto_layouts_as_shipped(tmp_path: Path) -> None:
    """LLaMA-Factory's data/README.md: alpaca SFT rows (instruction, input, output, system,
    history), ShareGPT SFT rows (conversations of from/value, system, tools) and its KTO rows
    (ShareGPT plus kto_tag). They were read as preference rows: "missing field 'chosen'"."""
    alpaca = {
        "instruction": "Traduis en anglais.",
        "input": "Où est la gare ?",
        "output": "Where is the station?",
        "system": "Réponds brièvement.",
        "history": [["Bonjour", "Hello"]],
    }
    result, out = validate(tmp_path, [alpaca, {"instruction": "2+2?", "output": "4"}])
    assert (result.kind, result.format, result.warnings[0].kind) == (
        "sft",
        "conversational",
        "made_conversational",
    )
    # The record names the layout found and where the parts came from (it said
    # "conversational" and {}).
    assert (result.source_format, result.mapping) == (
        "alpaca",
        {"prompt": "instruction", "completion": "output"},
    )
    assert out[0] == {
        "prompt": [
            {"role": "system", "content": "Réponds brièvement."},
            {"role": "user", "content": "Bonjour"},
            # trained too: LLaMA-Factory trains the history's answers (mask_history false)
            {"role": "assistant", "content": "Hello", "weight": 1},
            {"role": "user", "content": "Traduis en anglais.\nOù est la gare ?"},
        ],
        "completion": [{"role": "assistant", "content": "Where is the station?"}],
    }
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 °C."},
        ],
        "system": "You check the weather.",
        "tools": '[{"name": "weather"}]',
    }
    result, out = validate(tmp_path, [sharegpt])
    assert result.kind == "sft"
    assert (result.source_format, result.mapping) == ("sharegpt", {"messages": "conversations"})
    assert [m["role"] for m in out[0]["prompt"]] == ["system", "user", "assistant", "tool"]
    assert out[0]["completion"] == [{"role": "assistant", "content": "21 °C."}]
    assert [w.msg for w in result.warnings] == ["column 'tools' ignored in 1 row"]
    kto = [
        {**sharegpt, "tools": "", "kto_tag": True},
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "gpt", "value": "No idea."},
            ],
            "kto_tag": False,
        },
    ]
    result, out = validate(tmp_path, kto)
    assert (result.kind, [r["label"] for r in out]) == ("unpaired", [True, False])
    assert (result.source_format, result.mapping) == (
        "sharegpt",
        {"messages": "conversations", "label": "kto_tag"},
    )
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    result, _ = validate(tmp_path, [{"messages": chat}])
    assert (result.source_format, result.mapping) == ("openai", {"messages": "messages"})


def test_a_preference_mapping_is_not_taken_for_llama_factory_sft(tmp_path: Path) -> None:
    """Rows with instruction and a string output, mapped as preference columns, stay
    preference rows (the LLaMA-Factory guesses refused every row as missing completion)."""
    rows = [{"instruction": f"q{i}", "output": "x", "good": "a", "bad": "b"} for i in range(3)]
    mapping = FieldMapping(prompt_field="instruction", chosen_field="good", rejected_field="bad")
    result, out = validate(tmp_path, rows, mapping=mapping)
    assert (result.kind, out[0]["chosen"]) == ("preference", "a")


def test_csv_labels_and_a_system_column(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("prompt,completion,label,system,score\nq1,a1,true,Be brief.,3\nq2,a2,0,,1\n")
    out = io.BytesIO()
    result = validate_file(path, out, hint="csv")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert result.kind == "unpaired" and result.container == "csv"
    assert result.format == "conversational"  # a system column makes every row a chat
    assert rows == [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "q1"},
            ],
            "completion": [{"role": "assistant", "content": "a1"}],
            "label": True,
        },
        {
            "prompt": [{"role": "user", "content": "q2"}],
            "completion": [{"role": "assistant", "content": "a2"}],
            "label": False,
        },
    ]
    assert [(w.kind, w.count) for w in result.warnings] == [("ignored_column", 2)]


def test_gzip_chats_keep_tool_turns_and_name_unused_columns(tmp_path: Path) -> None:
    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "Sunny."},
    ]
    result, rows = validate(tmp_path, [{"messages": chat, "weight": 1}], "chats.jsonl.gz")
    assert result.kind == "sft" and result.compressed
    assert rows == [
        {"prompt": [chat[0], {**chat[1], "weight": 1}, chat[2]], "completion": chat[3:]}
    ]
    assert [w.kind for w in result.warnings] == ["ignored_column"]


def test_a_chat_trains_every_answer_not_of_weight_0_as_openai_does(tmp_path: Path) -> None:
    """OpenAI trains each assistant message of a chat (weight 1 unless set to 0): the earlier
    ones are marked in an sft row's prompt. A kto row's label is about its last answer alone,
    and a prompt given as a prompt (TRL's prompt-completion rows) is context only."""
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Of Spain?"},
        {"role": "assistant", "content": "Lisbon.", "weight": 0},
        {"role": "user", "content": "Of Spain, please."},
        {"role": "assistant", "content": "Madrid."},
    ]
    _, rows = validate(tmp_path, [{"messages": chat}])
    assert rows == [
        {
            "prompt": [
                chat[0],
                chat[1],
                {"role": "assistant", "content": "Paris.", "weight": 1},
                chat[3],
                {"role": "assistant", "content": "Lisbon."},
                chat[5],
            ],
            "completion": [chat[6]],
        }
    ]
    _, rows = validate(tmp_path, [{"messages": chat, "label": True}])
    assert all("weight" not in m for m in rows[0]["prompt"])
    explicit = {"prompt": chat[:4], "completion": [chat[6]]}
    _, rows = validate(tmp_path, [explicit])
    assert rows == [explicit]
    # The rows stored, downloaded and uploaded again keep their marks.
    _, again = validate(tmp_path, [{"messages": chat}])
    _, rows = validate(tmp_path, again)
    assert rows == again
    # An answer that opens a chat answers nothing: context, not marked.
    opening = [{"role": "assistant", "content": "Hi, I am a bot."}, *chat[1:3]]
    _, rows = validate(tmp_path, [{"messages": opening}])
    assert rows == [{"prompt": opening[:2], "completion": opening[2:]}]


def test_a_mapping_names_the_kind(tmp_path: Path) -> None:
    rows = [{"q": "2+2?", "a": "4", "ok": True}, {"q": "3+3?", "a": "7", "ok": False}]
    mapping = FieldMapping(prompt_field="q", completion_field="a", label_field="ok")
    result, out = validate(tmp_path, rows, mapping=mapping)
    assert result.kind == "unpaired" and result.source_format == "mapped"
    assert out[1] == {"prompt": "3+3?", "completion": "7", "label": False}
    assert result.stats.desirable_rows == 1


def test_openai_chat_weights_pick_the_answer_trained(tmp_path: Path) -> None:
    """OpenAI's chat rows mark answers not to train on with weight 0: the last answer of
    weight 1 is the completion (what follows it is left out), not the weight-0 one."""
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 1},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Lisbon.", "weight": 0},
    ]
    result, rows = validate(tmp_path, [{"messages": chat}])
    assert result.kind == "sft"
    assert rows == [
        {"prompt": chat[:2], "completion": [{"role": "assistant", "content": "Paris."}]}
    ]
    none_trained = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in chat]
    with pytest.raises(InvalidDataset) as refused:
        validate(tmp_path, [{"messages": chat}, {"messages": none_trained}])
    assert [(e.line, e.field) for e in refused.value.errors] == [(2, "messages")]
    assert "every assistant message has weight 0" in refused.value.errors[0].msg


def test_sharegpt_sets_with_a_float_or_null_weight_on_every_turn_upload(tmp_path: Path) -> None:
    """SlimOrca writes ``weight`` as 0.0 / 1.0 on each turn and null on the system one;
    OpenHermes-2.5 writes null on every turn (its schema types it float64). Both were refused
    ("expected 0 or 1, got number 1.0")."""
    slim_orca = {
        "conversations": [
            {"from": "system", "value": "You are an AI assistant.", "weight": None},
            {"from": "human", "value": "Translate 'hi' to French.", "weight": 0.0},
            {"from": "gpt", "value": "Salut.", "weight": 1.0},
        ]
    }
    open_hermes = {
        "conversations": [
            {"from": "human", "value": "2+2?", "weight": None},
            {"from": "gpt", "value": "4", "weight": None},
            {"from": "human", "value": "And 3+3?", "weight": None},
            {"from": "gpt", "value": "6", "weight": None},
        ],
        "source": "glaive-code-assist",
    }
    result, rows = validate(tmp_path, [slim_orca, open_hermes])
    assert result.kind == "sft"
    assert rows[0] == {
        "prompt": [
            {"role": "system", "content": "You are an AI assistant."},
            {"role": "user", "content": "Translate 'hi' to French."},
        ],
        "completion": [{"role": "assistant", "content": "Salut."}],
    }
    assert rows[1] == {
        "prompt": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "weight": 1},
            {"role": "user", "content": "And 3+3?"},
        ],
        "completion": [{"role": "assistant", "content": "6"}],
    }
    with pytest.raises(InvalidDataset) as refused:
        bad = {**slim_orca["conversations"][2], "weight": 0.5}
        validate(tmp_path, [{"conversations": [*slim_orca["conversations"][:2], bad]}])
    assert "expected 0 or 1, got number 0.5" in refused.value.errors[0].msg


def test_a_message_field_left_out_is_named_not_dropped_silently(tmp_path: Path) -> None:
    """A reasoning trace (`reasoning_content`, which Qwen3-style templates render) or a
    speaker's `name` was dropped with no warning, on the fast path and the slow one alike;
    the empty fields the openai SDK's model_dump() writes on every message are nothing."""
    user = {"role": "user", "content": "2+2?"}
    pair = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "4", "reasoning_content": "2 plus 2"}],
        "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "a guess"}],
    }
    result, rows = validate(tmp_path, [pair, pair | {"prompt": [{**user, "content": "3+3?"}]}])
    assert rows[0] == {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    named = {w.msg: (w.kind, w.count) for w in result.warnings}
    for field in ("chosen", "rejected"):
        assert named[
            f"message field '{field}[].reasoning_content' ignored in 2 rows: a message keeps "
            "its role, content and function calls"
        ] == ("ignored_message_field", 2)

    dumped = {"refusal": None, "audio": None, "annotations": [], "function_call": None}
    chat = [{**user, "name": "alice"}, {"role": "assistant", "content": "4", **dumped}]
    result, rows = validate(tmp_path, [{"messages": chat}])
    assert rows == [{"prompt": [user], "completion": [{"role": "assistant", "content": "4"}]}]
    assert [w.msg for w in result.warnings] == [
        "message field 'messages[].name' ignored in 1 row: a message keeps its role, content "
        "and function calls"
    ]


def test_an_empty_system_message_is_left_out_as_a_blank_system_column_is(tmp_path: Path) -> None:
    """Exports write an empty system turn on rows with no system prompt: the row was refused
    ("the text is empty") where a blank system column is simply left out."""
    sharegpt = {
        "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
    }
    _, rows = validate(tmp_path, [sharegpt])
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
        }
    ]
    pair = {
        "prompt": [{"role": "system", "content": " "}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    _, rows = validate(tmp_path, [pair])
    assert rows == [{**pair, "prompt": pair["prompt"][1:]}]
    with pytest.raises(InvalidDataset) as refused:
        validate(tmp_path, [{**pair, "prompt": pair["prompt"][:1]}])
    assert "only an empty system message" in refused.value.errors[0].msg


def test_an_sft_row_names_the_prompt_or_chat_column_it_does_not_read(tmp_path: Path) -> None:
    """A row with both a chat and a prompt/completion pair is read one way; the other column
    (a system prompt written as `prompt`, a chat holding one) is named, not dropped silently."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr."}]
    result, rows = validate(tmp_path, [{"prompt": "You are a pirate.", "messages": chat}])
    assert rows == [{"prompt": chat[:1], "completion": chat[1:]}]
    assert [w.msg for w in result.warnings if "'prompt'" in w.msg] == [
        "column 'prompt' ignored in 1 row"
    ]
    system = {"role": "system", "content": "You are a pirate."}
    result, rows = validate(
        tmp_path, [{"prompt": "Hi", "completion": "Arr.", "messages": [system, *chat]}]
    )
    assert rows == [{"prompt": "Hi", "completion": "Arr."}]
    assert [w.msg for w in result.warnings if "'messages'" in w.msg] == [
        "column 'messages' ignored in 1 row"
    ]


ARGUMENTS = '{"location": "San Francisco, USA", "format": "celsius"}'


def test_openai_tool_calling_rows_keep_their_calls_results_and_tools(tmp_path: Path) -> None:
    """OpenAI's function-calling chats as its guide shows them (a call as the answer, with
    no content; a call, its result, then the answer; the older functions/function_call
    form) are sft rows that keep the calls (arguments as an object, as chat templates read
    them), the results and the row's tools. They were refused."""
    question = {"role": "user", "content": "What is the weather in San Francisco?"}
    call = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_id",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": ARGUMENTS},
            }
        ],
    }
    result_ = {"role": "tool", "tool_call_id": "call_id", "content": "21 degrees, sunny"}
    answer = {"role": "assistant", "content": "It is 21 °C and sunny."}
    rows = [
        {
            "messages": [question, call],
            "parallel_tool_calls": False,
            "tools": [OPENAI_WEATHER_TOOL],
        },
        {"messages": [question, call, result_, answer], "tools": [OPENAI_WEATHER_TOOL]},
        {
            "messages": [
                question,
                {
                    "role": "assistant",
                    "function_call": {"name": "get_current_weather", "arguments": ARGUMENTS},
                },
            ],
            "functions": [OPENAI_WEATHER_TOOL["function"]],
        },
    ]
    result, out = validate(tmp_path, rows)
    assert (result.kind, result.warnings) == ("sft", [])
    called = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "arguments": {"location": "San Francisco, USA", "format": "celsius"},
                },
                "id": "call_id",
            }
        ],
    }
    assert out[0] == {"prompt": [question], "completion": [called], "tools": [OPENAI_WEATHER_TOOL]}
    assert out[1] == {
        "prompt": [question, {**called, "weight": 1}, result_],
        "completion": [answer],
        "tools": [OPENAI_WEATHER_TOOL],
    }
    older = {
        **called,
        "tool_calls": [{k: v for k, v in called["tool_calls"][0].items() if k != "id"}],
    }
    assert out[2] == {"prompt": [question], "completion": [older], "tools": [OPENAI_WEATHER_TOOL]}


def test_messages_as_the_openai_sdk_dumps_them_call_nothing(tmp_path: Path) -> None:
    """The SDK's model_dump() writes tool_calls, function_call, refusal, audio ... as null on
    every message: no call, in every kind of row (refused in each by the first version)."""
    from openai.types.chat import ChatCompletionMessage

    said = ChatCompletionMessage(role="assistant", content="Paris.").model_dump()
    assert said["tool_calls"] is None and said["function_call"] is None
    empty = {**said, "content": "Lyon.", "tool_calls": []}
    question = {"role": "user", "content": "Capital of France?"}
    _, rows = validate(tmp_path, [{"messages": [question, said]}])
    assert rows == [
        {"prompt": [question], "completion": [{"role": "assistant", "content": "Paris."}]}
    ]
    _, rows = validate(tmp_path, [{"prompt": [question], "chosen": [said], "rejected": [empty]}])
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "Lyon."}]
    _, rows = validate(tmp_path, [{"messages": [question, said], "label": True}])
    assert rows[0]["label"] is True
    # The older function_call as the SDK dumps it (tool_calls null beside it), and tools
    # null beside the older functions: the call and the functions are read.
    old_call = ChatCompletionMessage.model_validate(
        {"role": "assistant", "function_call": {"name": "w", "arguments": '{"city": "Paris"}'}}
    ).model_dump()
    assert old_call["tool_calls"] is None
    row = {"messages": [question, old_call], "tools": None, "functions": [{"name": "w"}]}
    result, rows = validate(tmp_path, [row])
    assert rows[0]["completion"][0]["tool_calls"] == [
        {"type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}
    ]
    assert rows[0]["tools"] == [{"type": "function", "function": {"name": "w"}}]
    assert result.warnings == []
    broken = {**old_call, "function_call": {"name": "w", "arguments": "{"}}
    with pytest.raises(InvalidDataset) as refused:
        validate(tmp_path, [{"messages": [question, broken]}])
    assert refused.value.errors[0].field == "messages[1].function_call.arguments"


def test_function_calling_rows_at_their_edges(tmp_path: Path) -> None:
    """A chat ending in a call and its result trains the call (the result trains nothing);
    text of only whitespace beside a call and a function returning nothing are OpenAI's too;
    rows as stored read back as they are; the same chat with other tools is no duplicate."""
    question = {"role": "user", "content": "Weather?"}
    call = {"type": "function", "function": {"name": "w", "arguments": "{}"}}
    calling = {"role": "assistant", "content": "\n", "tool_calls": [call]}
    empty_result = {"role": "tool", "content": "", "tool_call_id": "c1"}
    tool = {"type": "function", "function": {"name": "w"}}
    rows = [
        {"messages": [question, calling, empty_result], "tools": [tool]},
        {
            "messages": [question, calling, empty_result],
            "tools": [{"type": "function", "function": {"name": "w", "description": "x"}}],
        },
    ]
    result, out = validate(tmp_path, rows)
    stored_call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}],
    }
    assert out[0] == {"prompt": [question], "completion": [stored_call], "tools": [tool]}
    assert result.warnings == [] and len(out) == 2  # other tools: not a repeat
    assert result.stats.completion_chars["min"] > 0  # a call counts its JSON
    _, again = validate(tmp_path, out)
    assert again == out
    answered = [question, calling, empty_result, {"role": "assistant", "content": "Sunny."}]
    _, out = validate(tmp_path, [{"messages": answered}])
    assert out[0]["prompt"][2] == empty_result


def test_tool_calls_that_cannot_be_read_say_where(tmp_path: Path) -> None:
    question = {"role": "user", "content": "Weather?"}

    def calling(arguments: object) -> dict[str, Any]:
        call = {"type": "function", "function": {"name": "w", "arguments": arguments}}
        return {"messages": [question, {"role": "assistant", "tool_calls": [call]}]}

    rows = [
        calling('{"city": "Paris"'),
        calling("[1, 2]"),
        {"messages": [question, {**calling("{}")["messages"][1], "role": "user"}]},
        {**calling("{}"), "tools": [{"type": "function", "function": {"description": "x"}}]},
        calling("[" * 100_000 + "]" * 100_000),  # past Python's recursion limit
    ]
    with pytest.raises(InvalidDataset) as refused:
        validate(tmp_path, rows)
    assert [(e.line, e.field) for e in refused.value.errors] == [
        (1, "messages[1].tool_calls[0].function.arguments"),
        (2, "messages[1].tool_calls[0].function.arguments"),
        (3, "messages[1].role"),
        (4, "tools[0].function.name"),
        (5, "messages[1].tool_calls[0].function.arguments"),
    ]
    assert "invalid JSON" in refused.value.errors[0].msg
    # With text beside the call, the call was dropped without a word: preference and kto rows
    # keep both, as sft rows do.
    said = {**calling("{}")["messages"][1], "content": "Let me check."}
    no = {"role": "assistant", "content": "No."}
    _, out = validate(tmp_path, [{"prompt": [question], "chosen": [said], "rejected": [no]}])
    call = {"type": "function", "function": {"name": "w", "arguments": {}}}
    assert out[0]["chosen"] == [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]}
    ]
    tool = {"type": "function", "function": {"name": "w"}}
    labelled = {"prompt": [question], "completion": [said], "label": True, "tools": [tool]}
    result, out = validate(tmp_path, [labelled, {**labelled, "label": False}])
    assert result.kind == "unpaired" and result.functions
    kept = {"role": "assistant", "content": "Let me check.", "tool_calls": [call]}
    assert out[0] == {"prompt": [question], "completion": [kept], "tools": [tool], "label": True}


def test_text_rows_that_list_functions_become_chats(tmp_path: Path) -> None:
    """sft and kto text rows keep the functions they list: only a chat can hold them (they
    were named as an ignored column)."""
    tool = {"type": "function", "function": {"name": "w"}}
    user = {"role": "user", "content": "Weather?"}
    said = {"role": "assistant", "content": "Let me look."}
    result, out = validate(
        tmp_path, [{"prompt": "Weather?", "completion": "Let me look.", "tools": [tool]}]
    )
    assert out == [{"prompt": [user], "completion": [said], "tools": [tool]}]
    assert (result.format, result.functions, result.warnings) == ("conversational", True, [])
    rated = {"prompt": "Weather?", "completion": "Let me look.", "label": True, "tools": [tool]}
    _, out = validate(tmp_path, [rated, {**rated, "label": False, "system": "Be brief."}])
    assert [r["tools"] for r in out] == [[tool], [tool]]
    assert out[1]["prompt"] == [{"role": "system", "content": "Be brief."}, user]
