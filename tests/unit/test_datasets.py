"""Dataset validation as an uploader sees it: what is accepted, what it becomes, and what
each rejected line is told (line number, field, message)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import msgspec
import pytest

from service.contract import FieldMapping
from service.datasets.rows import RowInvalid, normalize_row, row_format
from service.datasets.validate import IngestResult, InvalidDataset, Limits, RowError, validate_jsonl


def line(row: Any) -> bytes:
    """One JSONL line: bytes are taken as they are, anything else is JSON-encoded."""
    return row if isinstance(row, bytes) else msgspec.json.encode(row) + b"\n"


def jsonl(*rows: Any) -> bytes:
    return b"".join(line(r) for r in rows)


def ingest(data: bytes, **kwargs: Any) -> tuple[IngestResult, bytes]:
    dst = io.BytesIO()
    result = validate_jsonl(io.BytesIO(data), dst, **kwargs)
    return result, dst.getvalue()


def rejected(data: bytes, **kwargs: Any) -> InvalidDataset:
    with pytest.raises(InvalidDataset) as info:
        validate_jsonl(io.BytesIO(data), io.BytesIO(), **kwargs)
    return info.value


def errors(data: bytes, **kwargs: Any) -> list[tuple[int, str | None, str]]:
    return [(e.line, e.field, e.msg) for e in rejected(data, **kwargs).errors]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


STD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
CONV = {"prompt": [user("What is 2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}


# --------------------------------------------------------------------------- accepted forms


def test_standard_rows_are_written_canonically() -> None:
    source = (
        b'{"rejected": "Non.", "id": 7, '
        b'"chosen": "Oui, bien s\xc3\xbbr.",  "prompt": "\\u00c7a va?"}\n'
    )
    result, out = ingest(source)
    assert out == '{"prompt":"Ça va?","chosen":"Oui, bien sûr.","rejected":"Non."}\n'.encode()
    assert (result.rows, result.format, result.source_format) == (1, "standard", "standard")
    assert result.bytes == len(out)
    assert result.source_bytes == len(source)
    assert [(w.kind, w.msg, w.lines) for w in result.warnings] == [
        ("ignored_column", "column 'id' ignored in 1 row", [1])
    ]


def test_conversational_rows_keep_role_content_and_what_a_function_call_needs() -> None:
    row = {
        "prompt": [
            {"content": "Be brief.", "role": "system"},
            {"role": "user", "content": "Capital of France?", "name": "ann"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris.", "weight": 1}],
        "rejected": [bot("Lyon."), {"role": "tool", "content": "{}", "tool_call_id": "x"}],
        "score": 0.7,
    }
    result, out = ingest(jsonl(row))
    assert msgspec.json.decode(out) == {
        "prompt": [system("Be brief."), user("Capital of France?")],
        "chosen": [bot("Paris.")],
        "rejected": [bot("Lyon."), {"role": "tool", "content": "{}", "tool_call_id": "x"}],
    }
    assert out.startswith(b'{"prompt":[{"role":"system","content":"Be brief."}')
    assert (result.format, result.source_format) == ("conversational", "conversational")


def test_openai_text_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]
    row = {
        "prompt": [{"role": "user", "content": parts}],
        "chosen": [bot("a")],
        "rejected": [bot("b")],
    }
    _, out = ingest(jsonl(row))
    assert msgspec.json.decode(out)["prompt"] == [user("Line one.\nLine two.")]


def test_implicit_prompt_is_the_longest_shared_prefix() -> None:
    shared = [system("Be kind."), user("Hi"), bot("Hello!"), user("Tell me a joke")]
    row = {"chosen": [*shared, bot("A pun.")], "rejected": [*shared, bot("No.")]}
    result, out = ingest(jsonl(row))
    assert msgspec.json.decode(out) == {
        "prompt": shared,
        "chosen": [bot("A pun.")],
        "rejected": [bot("No.")],
    }
    assert (result.format, result.source_format) == ("conversational", "implicit_prompt")


def test_openai_dpo_rows_are_accepted_with_their_functions() -> None:
    row = {
        "input": {
            "messages": [system("You are terse."), user("2+2?")],
            "tools": [{"type": "function", "function": {"name": "calc"}}],
            "parallel_tool_calls": True,
        },
        "preferred_output": [bot("4")],
        "non_preferred_output": [bot("It is four, I believe.")],
    }
    result, out = ingest(jsonl(row))
    assert msgspec.json.decode(out) == {
        "prompt": [system("You are terse."), user("2+2?")],
        "chosen": [bot("4")],
        "rejected": [bot("It is four, I believe.")],
        "tools": [{"type": "function", "function": {"name": "calc"}}],
    }
    assert (result.format, result.source_format) == ("conversational", "openai")
    assert result.warnings == []  # parallel_tool_calls says nothing training needs


MAPPING = FieldMapping(prompt_field="question", chosen_field="support", rejected_field="oppose")


def test_mapped_columns_become_canonical() -> None:
    rows = [
        {"question": "Tea?", "support": "Yes.", "oppose": "No.", "prompt": "ignored"},
        {"question": "Milk?", "support": "Sure.", "oppose": "Never."},
    ]
    result, out = ingest(jsonl(*rows), mapping=MAPPING)
    assert [msgspec.json.decode(x) for x in out.splitlines()] == [
        {"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Milk?", "chosen": "Sure.", "rejected": "Never."},
    ]
    assert (result.format, result.source_format) == ("standard", "mapped")


def test_mapped_columns_may_hold_conversations() -> None:
    row = {"question": [user("Tea?")], "support": [bot("Yes.")], "oppose": [bot("No.")]}
    result, out = ingest(jsonl(row), mapping=MAPPING)
    assert msgspec.json.decode(out) == {
        "prompt": [user("Tea?")],
        "chosen": [bot("Yes.")],
        "rejected": [bot("No.")],
    }
    assert (result.format, result.source_format) == ("conversational", "mapped")


def test_mapping_expects_its_columns() -> None:
    [(line_no, field, msg)] = errors(jsonl(STD), mapping=MAPPING)
    assert (line_no, field) == (1, "support")
    assert "missing field 'support'" in msg and "'prompt', 'chosen', 'rejected'" in msg


def test_default_mapping_counts_as_unmapped() -> None:
    result, _ = ingest(jsonl(STD), mapping=FieldMapping())
    assert result.source_format == "standard"


def test_field_mapping_rejects_unusable_names() -> None:
    with pytest.raises(ValueError, match="must all differ"):
        FieldMapping(prompt_field="text", chosen_field="text")
    with pytest.raises(ValueError, match="must all differ"):
        FieldMapping(prompt_field="q", system_field="q")
    with pytest.raises(ValueError, match="must not be empty"):
        FieldMapping(rejected_field="")
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"prompt_field": "q", "chosen": "x"}, FieldMapping)


@pytest.mark.parametrize(
    ("row", "expected_format"),
    [
        (STD, "standard"),
        (CONV, "conversational"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, "implicit_prompt"),
        (
            {
                "input": {"messages": [user("q")]},
                "preferred_output": [bot("a")],
                "non_preferred_output": [bot("b")],
            },
            "openai",
        ),
    ],
)
def test_normalize_row_reports_the_source_form(row: dict[str, Any], expected_format: str) -> None:
    normal, source = normalize_row(row)
    assert source == expected_format
    assert list(normal) == ["prompt", "chosen", "rejected"]
    assert row_format(normal) == ("standard" if expected_format == "standard" else "conversational")


@pytest.mark.parametrize(
    "rows",
    [
        [STD, {"prompt": "p", "chosen": "c", "rejected": "r", "x": [1]}],
        [CONV],
        [{"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}],
        [
            {
                "input": {"messages": [user("q")]},
                "preferred_output": [bot("a")],
                "non_preferred_output": [bot("b")],
            }
        ],
    ],
)
def test_canonical_output_is_a_fixed_point(rows: list[dict[str, Any]]) -> None:
    """Re-uploading a normalized dataset gives the same bytes, hence the same content address."""
    first, out = ingest(jsonl(*rows))
    again, out_again = ingest(out)
    assert out_again == out
    assert again.sha256 == first.sha256
    assert again.source_format in ("standard", "conversational")


def test_sha256_and_size_describe_exactly_what_was_written() -> None:
    rows = [{"prompt": f"q{i}", "chosen": "yes " * i + "!", "rejected": "no"} for i in range(3000)]
    result, out = ingest(jsonl(*rows))
    assert result.sha256 == hashlib.sha256(out).hexdigest()
    assert result.bytes == len(out) > 1 << 20  # spans more than one internal flush
    assert result.rows == 3000 == out.count(b"\n")


def test_same_rows_in_any_spelling_get_the_same_address() -> None:
    a, _ = ingest(jsonl(STD))
    b, _ = ingest(b'{ "chosen":"4", "prompt" : "What is 2+2?","rejected":"5","meta":{} }\r\n\n')
    assert a.sha256 == b.sha256


def test_crlf_blank_lines_and_a_bom_are_tolerated() -> None:
    data = (
        b"\xef\xbb\xbf"
        + line(STD).replace(b"\n", b"\r\n")
        + b"\r\n  \n\t\n"
        + line({"prompt": "p", "chosen": "c", "rejected": "r"}).rstrip(b"\n")
    )
    result, out = ingest(data)
    assert result.rows == 2
    assert result.source_bytes == len(data)
    assert b"\r" not in out and out.count(b"\n") == 2


def test_a_raw_unbuffered_file_is_read_too(tmp_path: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(STD, STD | {"chosen": 4}, STD) + b"x" * 130 + b"\n")
    with open(path, "rb", buffering=0) as src, pytest.raises(InvalidDataset) as info:
        validate_jsonl(src, io.BytesIO(), limits=Limits(max_line_bytes=120))
    assert [(e.line, e.field) for e in info.value.errors] == [(2, "chosen"), (4, None)]


# --------------------------------------------------------------------------- rejected lines

BAD_LINES: list[tuple[str, Any, str | None, str]] = [
    # (case, line, field, a fragment of the message)
    ("not json", b'{"prompt": "x",\n', None, "line 2 is not valid JSON: "),
    ("trailing garbage", b'{"prompt": "x"} y\n', None, "line 2 is not valid JSON: "),
    (
        "NaN (Python's json.dumps)",
        b'{"prompt": "2+2?", "chosen": "4", "rejected": "5", "score": NaN}\n',
        None,
        "NaN and Infinity are not JSON (Python's json.dumps writes them for such floats); "
        "write null, or dump with allow_nan=False",
    ),
    (
        "-Infinity",
        b'{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": -Infinity}\n',
        None,
        "NaN and Infinity are not JSON",
    ),
    (
        "not utf-8",
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
        None,
        "line 2 is not valid UTF-8: invalid continuation byte 0xe9 at byte 15",
    ),
    (
        "bad surrogate",
        b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n',
        None,
        "line 2 is not valid JSON: ",
    ),
    ("array", [STD], None, "expected a JSON object, got array"),
    ("string", "hello", None, "expected a JSON object, got string"),
    ("number", 3, None, "expected a JSON object, got number"),
    ("null", None, None, "expected a JSON object, got null"),
    ("no chosen", {"prompt": "p", "rejected": "r"}, "chosen", "missing field 'chosen'"),
    ("no rejected", {"prompt": "p", "chosen": "c"}, "rejected", "missing field 'rejected'"),
    (
        "no columns",
        {"text": "p", "label": 1},
        "chosen",
        "missing field 'chosen' (the row has: 'text', 'label'); a row needs a chosen and a "
        "rejected answer in one of the layouts",
    ),
    (
        "an sft layout (Dolly)",
        {"instruction": "Name a colour.", "context": "", "response": "Blue."},
        "chosen",
        "with no rejected answer at all, these are not preference rows: an sft upload takes "
        "prompt and completion, or a chat in messages (name other columns with "
        "completion_field or messages_field)",
    ),
    (
        "no prompt",
        {"chosen": "c", "rejected": "r"},
        "chosen",
        "without a prompt field, chosen and rejected must start with the same prompt; these "
        "differ from the first character",
    ),
    (
        "no prompt, text and messages",
        {"chosen": "c", "rejected": [bot("r")]},
        "chosen",
        "must both be texts or both be whole conversations",
    ),
    (
        "prompt type",
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        "prompt",
        "expected a string or a list of messages, got number",
    ),
    (
        "chosen type",
        {"prompt": "p", "chosen": {"text": "c"}, "rejected": "r"},
        "chosen",
        "expected a string (the prompt is a string), got object",
    ),
    (
        "chosen list",
        {"prompt": "p", "chosen": [bot("c")], "rejected": "r"},
        "chosen",
        "expected a string (the prompt is a string), got array",
    ),
    (
        "rejected null",
        {"prompt": "p", "chosen": "c", "rejected": None},
        "rejected",
        "expected a string (the prompt is a string), got null",
    ),
    ("empty prompt", {"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "the text is empty"),
    (
        "blank chosen",
        {"prompt": "p", "chosen": " \n\t", "rejected": "r"},
        "chosen",
        "the text is only whitespace",
    ),
    (
        "identical",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "rejected",
        "chosen and rejected are identical",
    ),
    (
        "conv identical",
        CONV | {"rejected": [bot("4")]},
        "rejected",
        "chosen and rejected are identical",
    ),
    (
        "prompt ends with assistant",
        CONV | {"prompt": [user("q"), bot("a")]},
        "prompt[1].role",
        "the prompt ends with an assistant message",
    ),
    (
        "unknown role",
        CONV | {"prompt": [{"role": "human", "content": "q"}]},
        "prompt[0].role",
        "unknown role 'human'; expected one of system, developer, user, assistant, tool",
    ),
    (
        "role type",
        CONV | {"prompt": [{"role": 1, "content": "q"}]},
        "prompt[0].role",
        "expected a string, got number",
    ),
    ("no role", CONV | {"prompt": [{"content": "q"}]}, "prompt[0].role", "missing field 'role'"),
    (
        "null role",
        CONV | {"prompt": [{"role": None, "content": "q"}]},
        "prompt[0].role",
        "expected a string, got null",
    ),
    (
        "no parts",
        CONV | {"prompt": [{"role": "user", "content": []}]},
        "prompt[0].content",
        "the list of content parts is empty",
    ),
    (
        "part without text",
        CONV | {"prompt": [{"role": "user", "content": [{"type": "text"}]}]},
        "prompt[0].content[0].text",
        "missing field 'text'",
    ),
    (
        "blank parts",
        CONV | {"prompt": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
        "prompt[0].content",
        "the text is only whitespace",
    ),
    (
        "no content",
        CONV | {"prompt": [system("s"), {"role": "user"}]},
        "prompt[1].content",
        "missing field 'content'",
    ),
    ("empty content", CONV | {"chosen": [bot("")]}, "chosen[0].content", "the text is empty"),
    (
        "blank content",
        CONV | {"rejected": [bot("  ")]},
        "rejected[0].content",
        "the text is only whitespace",
    ),
    (
        "content type",
        CONV | {"chosen": [{"role": "assistant", "content": None}]},
        "chosen[0].content",
        "expected a string or a list of text parts, got null",
    ),
    (
        "image part",
        CONV
        | {
            "prompt": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "x"}},
                    ],
                }
            ]
        },
        "prompt[0].content[1].type",
        "only text content parts are supported, got 'image_url'",
    ),
    (
        "message type",
        CONV | {"prompt": ["q"]},
        "prompt[0]",
        "expected a message object with role and content (or ShareGPT's from and value), got "
        "string",
    ),
    ("empty prompt list", CONV | {"prompt": []}, "prompt", "the list of messages is empty"),
    ("empty chosen list", CONV | {"chosen": []}, "chosen", "the list of messages is empty"),
    (
        "chosen text",
        CONV | {"chosen": "4"},
        "chosen",
        "expected a list of messages (the prompt is a list of messages), got string",
    ),
    (
        "answer starts with user",
        CONV | {"chosen": [user("4")]},
        "chosen[0].role",
        "an answer must start with an assistant message, got 'user'",
    ),
    (
        "answer holds a user turn",
        CONV | {"rejected": [bot("5"), user("ok?")]},
        "rejected[1].role",
        "an answer holds only assistant and tool messages, got 'user'",
    ),
    (
        "openai no messages",
        {"input": {"msgs": []}, "preferred_output": [bot("a")], "non_preferred_output": [bot("b")]},
        "input.messages",
        "missing field 'messages'",
    ),
    (
        "openai input type",
        {"input": "q", "preferred_output": [bot("a")], "non_preferred_output": [bot("b")]},
        "input",
        "expected an object with 'messages', got string",
    ),
    (
        "openai no rejected",
        {"input": {"messages": [user("q")]}, "preferred_output": [bot("a")]},
        "non_preferred_output",
        "missing field 'non_preferred_output'",
    ),
    (
        "openai bad role",
        {
            "input": {"messages": [{"role": "wizard", "content": "x"}]},
            "preferred_output": [bot("a")],
            "non_preferred_output": [bot("b")],
        },
        "input.messages[0].role",
        "unknown role 'wizard'",
    ),
    (
        "openai ends with assistant",
        {
            "input": {"messages": [user("q"), bot("a")]},
            "preferred_output": [bot("a")],
            "non_preferred_output": [bot("b")],
        },
        "input.messages[1].role",
        "the prompt ends with an assistant message",
    ),
    (
        "openai identical",
        {
            "input": {"messages": [user("q")]},
            "preferred_output": [bot("a")],
            "non_preferred_output": [bot("a")],
        },
        "non_preferred_output",
        "preferred_output and non_preferred_output are identical",
    ),
    (
        "implicit no shared prompt",
        {"chosen": [user("q"), bot("a")], "rejected": [user("r"), bot("b")]},
        "chosen",
        "these differ from the first message",
    ),
    (
        "implicit parts at a user turn",
        {"chosen": [user("q"), bot("a"), user("x")], "rejected": [user("q"), bot("a"), user("y")]},
        "chosen[1].role",
        "the prompt shared by chosen and rejected (their first 2 messages) ends "
        "with an assistant message",
    ),
    (
        "implicit nothing left",
        {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a"), bot("more")]},
        "chosen",
        "nothing is left as its answer",
    ),
    (
        "implicit identical",
        {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]},
        "rejected",
        "chosen and rejected are identical",
    ),
    (
        "implicit answer with user",
        {"chosen": [user("q"), bot("a"), user("x")], "rejected": [user("q"), bot("b")]},
        "chosen[2].role",
        "an answer holds only assistant and tool messages",
    ),
]


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_a_bad_line_is_named_with_its_field(raw: Any, field: str | None, fragment: str) -> None:
    # Line 1 is blank: line numbers count physical lines, blank ones included.
    [(line_no, got_field, msg)] = errors(b"\n" + line(raw))
    assert (line_no, got_field) == (2, field)
    assert fragment in msg


def test_row_invalid_from_normalize_row_matches_the_dataset_error() -> None:
    with pytest.raises(RowInvalid) as info:
        normalize_row(CONV | {"prompt": [{"role": "bot", "content": "q"}]})
    assert info.value.field == "prompt[0].role"
    assert "unknown role 'bot'" in info.value.msg


def test_errors_are_collected_over_the_whole_file() -> None:
    rows: list[Any] = [{"prompt": "p"}, *[STD] * 498, [1]]
    found = rejected(jsonl(*rows))
    assert found.total == 2
    assert [(e.line, e.field) for e in found.errors] == [(1, "chosen"), (500, None)]


def test_errors_are_capped_but_all_counted() -> None:
    data = b"nope\n" * 250
    found = rejected(data)
    assert found.total == 250
    assert [e.line for e in found.errors] == list(range(1, 101))
    assert all(isinstance(e, RowError) for e in found.errors)
    few = rejected(data, limits=Limits(max_errors=5))
    assert (len(few.errors), few.total) == (5, 250)
    assert "250 errors in the dataset: line 1: line 1 is not valid JSON" in str(few)
    assert "(and 247 more)" in str(few)


def test_text_rows_become_conversations_when_the_dataset_is_one() -> None:
    """Texts and conversations in one file (a system column in some rows only): the text rows
    become the conversation they stand for, written before or after, and a warning says so."""
    conv_row = {
        "prompt": [system("Be brief."), user("Hi")],
        "chosen": [bot("Hey")],
        "rejected": [bot("Go")],
    }
    as_conv = {"prompt": [user("What is 2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}
    source = jsonl(STD, b"\n", STD | {"prompt": "Q2"}, conv_row, STD | {"prompt": "Q3"})
    result, out = ingest(source)
    assert [msgspec.json.decode(x) for x in out.splitlines()] == [
        as_conv,
        as_conv | {"prompt": [user("Q2")]},
        conv_row,
        as_conv | {"prompt": [user("Q3")]},
    ]
    assert (result.rows, result.format, result.source_format) == (
        4,
        "conversational",
        "conversational",
    )
    assert result.sha256 == hashlib.sha256(out).hexdigest() and result.bytes == len(out)
    [warning] = result.warnings
    assert (warning.kind, warning.count, warning.lines) == ("made_conversational", 3, [1, 3, 5])
    # Rows taken a block at a time turn too.
    many = [STD | {"prompt": f"q{i}"} for i in range(3000)]
    result, out = ingest(jsonl(*many, conv_row))
    assert result.rows == 3001 and out.count(b'"role":"user"') == 3001


def test_openai_and_trl_conversations_mix_freely() -> None:
    openai = {
        "input": {"messages": [user("q")]},
        "preferred_output": [bot("a")],
        "non_preferred_output": [bot("b")],
    }
    result, _ = ingest(jsonl(openai, CONV))
    assert (result.rows, result.format, result.source_format) == (2, "conversational", "openai")


def test_long_lines_are_rejected_and_skipped() -> None:
    limits = Limits(max_line_bytes=100)
    frame = len(line({"prompt": "", "chosen": "c", "rejected": "r"})) - 1
    at_limit = {"prompt": "p" * (100 - frame), "chosen": "c", "rejected": "r"}
    assert len(line(at_limit)) == 101
    too_long = {"prompt": "p" * 5000, "chosen": "c", "rejected": "r"}
    data = jsonl(
        at_limit,
        too_long,
        line(at_limit).replace(b"\n", b"\r\n"),  # the line ending is not counted
        {"prompt": "p" * 101, "chosen": "c", "rejected": "r"},  # 1 byte over, no skipping needed
        b"not json\n",
        b"x" * 300,  # over the limit with no final newline
    )
    found = errors(data, limits=limits)
    assert [(n, field) for n, field, _ in found] == [(2, None), (4, None), (5, None), (6, None)]
    assert [msg for _, _, msg in found if "longer" in msg] == [
        f"line {n} is longer than the limit of 100 bytes" for n in (2, 4, 6)
    ]
    assert found[2][2].startswith("line 5 is not valid JSON: JSON is malformed")


def test_row_limit_stops_the_scan() -> None:
    data = jsonl(STD, b"\n", STD, STD, b"garbage\n")
    assert errors(data, limits=Limits(max_rows=2)) == [
        (4, None, "the dataset has more than 2 rows (the limit)")
    ]
    result, _ = ingest(jsonl(STD, b"\n", STD), limits=Limits(max_rows=2))
    assert result.rows == 2


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n   \n\t\n", b"\xef\xbb\xbf\n"])
def test_an_empty_dataset_is_rejected(data: bytes) -> None:
    assert errors(data) == [(0, None, "the dataset has no rows")]


def test_a_bom_is_tolerated_only_at_the_start() -> None:
    [(line_no, field, msg)] = errors(jsonl(STD, b"\xef\xbb\xbf" + line(STD)))
    assert (line_no, field) == (2, None)
    assert msg.startswith("line 2 is not valid JSON")


# --------------------------------------------------------------------------- warnings and stats


def test_duplicates_are_counted_after_normalization() -> None:
    other = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [STD, STD, other, STD | {"id": 3}, b'{"rejected":"r","chosen":"c","prompt":"p"}\n']
    result, _ = ingest(jsonl(*rows))
    assert result.rows == 5  # duplicates are kept: it is a warning
    [warning] = [w for w in result.warnings if w.kind == "duplicate"]
    assert (warning.kind, warning.count, warning.lines) == ("duplicate", 3, [2, 4, 5])
    assert warning.msg.startswith("3 rows exactly repeating an earlier row")


def test_duplicates_are_counted_across_a_switch_to_conversations() -> None:
    """Text rows, then one with a system column (the file becomes conversations), then the
    first row again: still a duplicate (text rows and conversations hashed apart missed it)."""
    rows = [
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
        {"system": "S", "prompt": "Q2", "chosen": "A2", "rejected": "B2"},
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        },
    ]
    result, _ = ingest(jsonl(*rows))
    [warning] = [w for w in result.warnings if w.kind == "duplicate"]
    assert (warning.count, warning.lines) == (2, [3, 4])


def test_duplicates_are_counted_when_conversations_come_before_text_rows() -> None:
    """A one-turn conversation first, a text row repeating it in a later block (over 1 MiB
    on): a duplicate too (conversations counted before the first text row were hashed as
    their encodings, those after as their texts)."""
    one_turn = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    filler = [
        {
            "prompt": [{"role": "user", "content": f"{i} " + "x" * 100_000}],
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        }
        for i in range(12)
    ]
    rows = [one_turn, *filler, {"prompt": "Q", "chosen": "A", "rejected": "B"}, one_turn]
    result, _ = ingest(jsonl(*rows))
    [warning] = [w for w in result.warnings if w.kind == "duplicate"]
    assert (warning.count, warning.lines) == (2, [14, 15])


def test_warning_lines_are_the_first_ten() -> None:
    result, _ = ingest(jsonl(*[CONV] * 30))
    [warning] = result.warnings
    assert (warning.kind, warning.count) == ("duplicate", 29)
    assert warning.lines == list(range(2, 12))


def test_duplicate_tracking_has_a_memory_ceiling() -> None:
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    result, _ = ingest(jsonl(*rows, rows[4], rows[15]), limits=Limits(max_tracked_rows=10))
    [warning] = result.warnings
    assert (warning.count, warning.lines) == (1, [21])  # row 16 was past the ceiling
    assert "earlier row among the first 10 distinct rows" in warning.msg


def test_long_rows_are_flagged() -> None:
    rows = [
        {"prompt": "p" * 20, "chosen": "c" * 20, "rejected": "r" * 10},  # 50: not over
        {"prompt": "p" * 20, "chosen": "c" * 20, "rejected": "r" * 11},
        {"prompt": [user("p" * 50)], "chosen": [bot("c")], "rejected": [bot("r")]},
    ]
    result, _ = ingest(jsonl(*rows[:2]), limits=Limits(long_row_chars=50))
    [warning] = result.warnings
    assert (warning.kind, warning.count, warning.lines) == ("long_row", 1, [2])
    assert "more than 50 characters" in warning.msg
    conv, _ = ingest(jsonl(rows[2]), limits=Limits(long_row_chars=50))
    assert [w.kind for w in conv.warnings] == ["long_row"]
    default, _ = ingest(jsonl(STD, {"prompt": "p" * 40_000, "chosen": "c", "rejected": "r"}))
    assert [(w.kind, w.lines) for w in default.warnings] == [("long_row", [2])]


@pytest.mark.parametrize(
    ("chosen", "rejected", "near"),
    [
        ("Paris is the capital.", "paris is the capital.", True),
        ("Paris is the capital.", "Paris  is the\ncapital. ", True),
        ("  Straße", "STRASSE", True),
        ("Paris is the capital.", "Paris is a capital.", False),
        ("Paris", "Pari s!", False),
        ("A" * 100 + "b", "a" * 100 + "c", False),
    ],
)
def test_near_identical_pairs_are_flagged(chosen: str, rejected: str, near: bool) -> None:
    result, _ = ingest(jsonl({"prompt": "q", "chosen": chosen, "rejected": rejected}))
    assert [w.kind for w in result.warnings] == (["near_identical"] if near else [])
    conv = CONV | {"chosen": [bot(chosen)], "rejected": [bot(rejected)]}
    result, _ = ingest(jsonl(conv))
    assert [w.kind for w in result.warnings] == (["near_identical"] if near else [])


def test_near_identical_multi_message_answers() -> None:
    row = CONV | {
        "chosen": [bot("Calling."), {"role": "tool", "content": "42"}, bot("It is 42.")],
        "rejected": [bot("calling."), {"role": "tool", "content": "42"}, bot("It is 42. ")],
    }
    result, _ = ingest(jsonl(row))
    assert [(w.kind, w.lines) for w in result.warnings] == [("near_identical", [1])]


def test_stats_summarize_text_lengths() -> None:
    rows = [{"prompt": "p" * n, "chosen": "c" * (2 * n), "rejected": "r" * 3} for n in range(1, 21)]
    result, _ = ingest(jsonl(*rows))
    stats = result.stats
    assert stats.prompt_chars == {"min": 1.0, "mean": 10.5, "max": 20.0, "p95": 19.0}
    assert stats.chosen_chars == {"min": 2.0, "mean": 21.0, "max": 40.0, "p95": 38.0}
    assert stats.rejected_chars == {"min": 3.0, "mean": 3.0, "max": 3.0, "p95": 3.0}


def test_conversational_stats_add_up_message_contents() -> None:
    row = {
        "prompt": [system("abc"), user("defgh")],
        "chosen": [bot("1234"), {"role": "tool", "content": "56"}],
        "rejected": [bot("x")],
    }
    result, _ = ingest(jsonl(row))
    assert result.stats.prompt_chars["max"] == 8
    assert result.stats.chosen_chars["max"] == 6
    assert result.stats.rejected_chars["max"] == 1


# -- preference rows that list functions and call them (OpenAI's and Azure's DPO files) -------

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "arguments": '{"location": "Paris, France", "format": "celsius"}',
    },
}
STORED_CALL = {  # as chat templates read it: the arguments an object
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "arguments": {"location": "Paris, France", "format": "celsius"},
    },
    "id": "call_1",
}


def test_openai_dpo_rows_keep_functions_calls_and_results() -> None:
    from tests.fixtures.openai_sdk import OPENAI_WEATHER_TOOL

    ask = user("Weather in Paris?")
    calling = {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}
    result_ = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
    rows = [
        {  # the call preferred over a guess
            "input": {
                "messages": [ask],
                "tools": [OPENAI_WEATHER_TOOL],
                "parallel_tool_calls": False,
            },
            "preferred_output": [calling],
            "non_preferred_output": [bot("It is always sunny in Paris.")],
        },
        {  # the result in the prompt; answers that use it or not (Azure: the older functions)
            "input": {
                "messages": [ask, calling, result_],
                "functions": [OPENAI_WEATHER_TOOL["function"]],
            },
            "preferred_output": [bot("21 °C in Paris.")],
            "non_preferred_output": [bot("I cannot know that.")],
        },
    ]
    result, out = ingest(jsonl(*rows))
    stored = [msgspec.json.decode(x) for x in out.splitlines()]
    stored_calling = {"role": "assistant", "content": "", "tool_calls": [STORED_CALL]}
    assert stored == [
        {
            "prompt": [ask],
            "chosen": [stored_calling],
            "rejected": [bot("It is always sunny in Paris.")],
            "tools": [OPENAI_WEATHER_TOOL],
        },
        {
            "prompt": [ask, stored_calling, result_],
            "chosen": [bot("21 °C in Paris.")],
            "rejected": [bot("I cannot know that.")],
            "tools": [OPENAI_WEATHER_TOOL],
        },
    ]
    assert (result.format, result.source_format, result.warnings) == (
        "conversational",
        "openai",
        [],
    )
    assert result.stats.chosen_chars["min"] > 0  # a call counts its JSON
    again, same = ingest(out)  # stored rows read back as they are
    assert (same, again.rows) == (out, 2)


def test_trl_preference_rows_with_a_tools_column() -> None:
    """TRL's own form: prompt, chosen and rejected messages beside a ``tools`` column; a text
    row that lists functions becomes a conversation, the form a template renders them in."""
    tool = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
    call = {"role": "assistant", "content": "", "tool_calls": [STORED_CALL]}
    rows = [
        {
            "prompt": [user("Weather?")],
            "chosen": [call],
            "rejected": [bot("Nice.")],
            "tools": [tool],
        },
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "tools": [tool]},
        {"prompt": "3+3?", "chosen": "6", "rejected": "7", "tools": []},
    ]
    result, out = ingest(jsonl(*rows))
    assert [msgspec.json.decode(x) for x in out.splitlines()] == [
        {
            "prompt": [user("Weather?")],
            "chosen": [call],
            "rejected": [bot("Nice.")],
            "tools": [tool],
        },
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")], "tools": [tool]},
        {"prompt": [user("3+3?")], "chosen": [bot("6")], "rejected": [bot("7")]},
    ]
    assert [(w.kind, w.lines) for w in result.warnings] == [("made_conversational", [3])]
    assert "functions" in result.warnings[0].msg


def test_rows_that_differ_only_in_their_calls_or_functions_are_not_repeats() -> None:
    """A call's answer has no text: two rows whose calls differ are different rows, and a
    call preferred over another call is no near-identical pair."""
    tool = {"type": "function", "function": {"name": "get_current_weather"}}
    london = {
        **STORED_CALL,
        "function": {"name": "get_current_weather", "arguments": {"location": "London"}},
    }

    def calls(*made: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": "", "tool_calls": list(made)}]

    rows = [
        {
            "prompt": [user("Weather?")],
            "chosen": calls(STORED_CALL),
            "rejected": calls(london),
            "tools": [tool],
        },
        {
            "prompt": [user("Weather?")],
            "chosen": calls(london),
            "rejected": calls(STORED_CALL),
            "tools": [tool],
        },
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]},
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")], "tools": [tool]},
    ]
    result, _ = ingest(jsonl(*rows))
    assert result.rows == 4
    assert result.warnings == []  # neither duplicate nor near-identical
    result, _ = ingest(jsonl(rows[0], rows[0]))
    assert [(w.kind, w.lines) for w in result.warnings] == [("duplicate", [2])]


def test_what_a_preference_row_cannot_call_says_where() -> None:
    bad_call = {"role": "user", "content": "", "tool_calls": [WEATHER_CALL]}
    rows = [
        {
            "input": {"messages": [user("Hi")], "tools": "[]"},
            "preferred_output": [bot("a")],
            "non_preferred_output": [bot("b")],
        },
        {
            "input": {"messages": [user("Hi")], "tools": [{"type": "web_search"}]},
            "preferred_output": [bot("a")],
            "non_preferred_output": [bot("b")],
        },
        {"prompt": [user("Hi"), bad_call], "chosen": [bot("a")], "rejected": [bot("b")]},
    ]
    found = errors(jsonl(*rows))
    assert [(n, field) for n, field, _ in found] == [
        (2, "input.tools[0].type"),
        (3, "prompt[1].role"),
    ]


def test_text_rows_with_no_tools_stay_text_rows_in_every_block() -> None:
    """`"tools": []` lists nothing: every row is stored without it, those read a block at a
    time as well as the first, read one by one."""
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "tools": []} for i in range(60_000)]
    result, out = ingest(jsonl(*rows))
    assert (result.rows, result.format, result.functions) == (60_000, "standard", False)
    assert b"tools" not in out


def test_tools_as_trl_and_others_write_them() -> None:
    """TRL's tools as a JSON string, and bare functions in a `tools` column, are the row's
    tools; LLaMA-Factory's string of bare functions (its calls are plain text) is named."""
    weather = {"type": "function", "function": {"name": "weather"}}
    rows = [
        {
            "prompt": [user("a?")],
            "chosen": [bot("1")],
            "rejected": [bot("2")],
            "tools": msgspec.json.encode([weather]).decode(),
        },
        {
            "prompt": [user("b?")],
            "chosen": [bot("1")],
            "rejected": [bot("2")],
            "tools": [weather["function"]],
        },
        {
            "prompt": [user("c?")],
            "chosen": [bot("1")],
            "rejected": [bot("2")],
            "tools": '[{"name": "weather"}]',
        },
    ]
    result, out = ingest(jsonl(*rows))
    stored = [msgspec.json.decode(x) for x in out.splitlines()]
    assert [r.get("tools") for r in stored] == [[weather], [weather], None]
    assert [(w.kind, w.msg) for w in result.warnings] == [
        ("ignored_column", "column 'tools' ignored in 1 row")
    ]
    assert result.functions


def test_what_marks_a_dataset_as_calling_functions() -> None:
    """A row that lists functions, calls one, or holds a call's result; not a plain row."""
    plain = {"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    result_ = {"role": "tool", "tool_call_id": "call_1", "content": "21"}
    assert not ingest(jsonl(plain))[0].functions
    assert ingest(jsonl(plain, {**plain, "chosen": [bot("a"), result_]}))[0].functions


def test_a_call_in_a_history_column_is_refused_saying_where_calls_train() -> None:
    calling = {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}
    row = {"prompt": "Hi", "chosen": "a", "rejected": "b", "history": [user("Weather?"), calling]}
    [(_, field, msg)] = errors(jsonl(row))
    assert field == "history[1].tool_calls" and "history column holds earlier turns" in msg
