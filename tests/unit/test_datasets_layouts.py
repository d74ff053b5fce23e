# ruff: noqa: RUF001 - the fixtures hold Chinese text with its own punctuation
"""Published preference layouts, as their publishers ship them, read without a mapping.

Each file in tests/fixtures/datasets/ follows one publisher's documented layout (see its
README); every test checks the normalized rows field by field: the system message where the
row has one, earlier turns kept and in order, implicit prompts split where TRL splits them,
non-ASCII text byte for byte.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.contract import FieldMapping
from service.datasets.validate import IngestResult, InvalidDataset, validate_file

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def tool(text: str) -> dict[str, str]:
    return {"role": "tool", "content": text}


def ingest(path: Path, **kwargs: Any) -> tuple[IngestResult, list[dict[str, Any]], bytes]:
    out = io.BytesIO()
    result = validate_file(path, out, **kwargs)
    data = out.getvalue()
    return result, [msgspec.json.decode(line) for line in data.splitlines()], data


def ignored(result: IngestResult) -> dict[str, int]:
    return {w.msg.split("'")[1]: w.count for w in result.warnings if w.kind == "ignored_column"}


def test_trl_implicit_prompt_texts_split_where_trl_splits() -> None:
    """The longest common prefix, its final space handed to the answers (trl.extract_prompt
    gives these three splits, the mid-word one included)."""
    result, rows, _ = ingest(FIXTURES / "trl_implicit.jsonl")
    assert rows == [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {
            "prompt": "Quelle est la capitale de la France ?",
            "chosen": " Paris, évidemment.",
            "rejected": " Lyon, je crois.",
        },
        {
            "prompt": "Translate to German: good morning -> Gute",
            "chosen": "n Morgen",
            "rejected": " Nacht",
        },
    ]
    assert (result.format, result.source_format) == ("standard", "implicit_prompt")


def test_hh_transcripts_as_shipped_gzipped(tmp_path: Path) -> None:
    """train.jsonl.gz: multi-turn history in order, the final answers apart; a row whose final
    answer is empty (real in the harmless split) is named, and left out on request."""
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress((FIXTURES / "hh.jsonl").read_bytes()))
    with pytest.raises(InvalidDataset) as info:
        ingest(path)
    assert [(e.line, e.field, e.msg) for e in info.value.errors] == [
        (2, "rejected", "the transcript's final Assistant answer is empty")
    ]

    result, rows, _ = ingest(path, on_invalid="skip", max_invalid_fraction=0.5)
    assert rows == [
        {
            "prompt": [
                user("How do I keep basil alive on a windowsill?"),
                bot("Give it six hours of sun and water it when the top of the soil is dry."),
                user("And if the leaves turn yellow?"),
            ],
            "chosen": [
                bot("That usually means too much water: let the pot drain and water less often.")
            ],
            "rejected": [bot("Buy a new plant.")],
        },
        {
            "prompt": [user("What is the boiling point of water at sea level?")],
            "chosen": [bot("100 °C, which is 212 °F.")],
            "rejected": [bot("It depends on the pot.\n\nPlease ask a chef.")],
        },
    ]
    assert (result.container, result.compressed, result.source_format) == ("jsonl", True, "hh")
    assert (result.skipped_rows, [(s.line, s.field) for s in result.skipped]) == (
        1,
        [(2, "rejected")],
    )
    assert result.source_bytes == path.stat().st_size


ULTRA_ROWS = [
    {
        "prompt": [user("Write a haiku about autumn rain.")],
        "chosen": [
            bot("Cold rain on red leaves\nthe gutter hums a low song\nnight comes early now")
        ],
        "rejected": [bot("Rain falls. It is autumn.")],
    },
    {
        "prompt": [user("Explique la photosynthèse en une phrase.")],
        "chosen": [
            bot("Les plantes transforment la lumière, l'eau et le CO₂ en sucre et en oxygène.")
        ],
        "rejected": [bot("C'est compliqué.")],
    },
]


def test_ultrafeedback_binarized_jsonl_and_parquet(tmp_path: Path) -> None:
    """A prompt column plus whole conversations starting with it (today's complaint:
    "chosen: expected a string"); the score and id columns are named, not dropped silently."""
    result, rows, data = ingest(FIXTURES / "ultrafeedback.jsonl")
    assert rows == ULTRA_ROWS
    assert result.source_format == "ultrafeedback"
    assert ignored(result) == {
        "prompt_id": 2,
        "messages": 2,
        "score_chosen": 2,
        "score_rejected": 2,
    }
    assert "CO₂".encode() in data and "photosynthèse".encode() in data

    # The Hub ships it as Parquet: row groups of one row, the same rows out.
    source = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").open()]
    parquet = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(source), parquet, row_group_size=1)
    from_parquet, rows, parquet_data = ingest(parquet)
    assert rows == ULTRA_ROWS and parquet_data == data
    assert (from_parquet.container, from_parquet.sha256) == ("parquet", result.sha256)


def test_argilla_conversations_share_the_prompt_and_take_the_system_column() -> None:
    result, rows, _ = ingest(FIXTURES / "argilla_dpo_mix.jsonl")
    assert rows == [
        {
            "prompt": [user("Name a prime number above 10.")],
            "chosen": [bot("11.")],
            "rejected": [bot("12.")],
        },
        {
            "prompt": [
                system("You name pets."),
                user("Hi!"),
                bot("Hello! How can I help?"),
                user("Suggest a name for a grey cat."),
            ],
            "chosen": [bot("Smokey.")],
            "rejected": [bot("Cat.")],
        },
    ]
    assert result.source_format == "implicit_prompt"
    assert set(ignored(result)) == {
        "dataset",
        "chosen_rating",
        "rejected_rating",
        "chosen_model",
        "rejected_model",
    }


def test_llama_factory_sharegpt_json_array() -> None:
    """from/value messages, a system column or a system turn, function calls and their
    results; Traditional Chinese byte for byte; the tools column named as ignored."""
    result, rows, data = ingest(FIXTURES / "sharegpt.json")
    assert rows == [
        {
            "prompt": [
                system("Answer in one sentence."),
                user("What is the capital of Japan?"),
                bot("Tokyo."),
                user("And its population?"),
            ],
            "chosen": [bot("About 14 million in the city proper.")],
            "rejected": [bot("Tokyo.")],
        },
        {
            "prompt": [system("你是一個樂於助人的助理。"), user("台北有什麼好吃的？")],
            "chosen": [bot("可以試試牛肉麵、滷肉飯和珍珠奶茶。")],
            "rejected": [bot("不知道。")],
        },
        {
            "prompt": [
                user("What's the weather in Paris?"),
                bot('{"name": "get_weather", "arguments": {"city": "Paris"}}'),
                tool('{"temp_c": 18, "sky": "cloudy"}'),
            ],
            "chosen": [bot("It is 18 °C and cloudy in Paris.")],
            "rejected": [bot("It is sunny.")],
        },
    ]
    assert (result.container, result.source_format) == ("json", "sharegpt")
    assert result.mapping == {
        "prompt": "conversations",
        "chosen": "chosen",
        "rejected": "rejected",
        "system": "system",
    }
    assert ignored(result) == {"tools": 1}
    assert "台北有什麼好吃的？".encode() in data


def test_llama_factory_alpaca_pairwise_with_history_and_system() -> None:
    result, rows, _ = ingest(FIXTURES / "alpaca_pairwise.json")
    assert rows == [
        {
            "prompt": [
                system("You write short summaries."),
                user("Hi, can you help me with summaries?"),
                bot("Of course. Send me the text."),
                user("Summarize the text.\nBees pollinate flowers and make honey from nectar."),
            ],
            "chosen": [bot("Bees pollinate flowers and turn nectar into honey.")],
            "rejected": [bot("Bees are insects.")],
        },
        {
            "prompt": [user("把这句话翻译成英文：我喜欢喝茶。")],
            "chosen": [bot("I like drinking tea.")],
            "rejected": [bot("I like coffee.")],
        },
    ]
    assert result.source_format == "alpaca"
    assert result.mapping["chosen"] == "output[0]" and result.mapping["history"] == "history"
    assert result.warnings == []


def test_llama_factory_alpaca_preference_joins_instruction_and_input() -> None:
    result, rows, _ = ingest(FIXTURES / "alpaca_preference.json")
    assert rows == [
        {"prompt": "Give a synonym for\nhappy", "chosen": "Joyful.", "rejected": "Sad."},
        {
            "prompt": "Name the largest ocean.",
            "chosen": "The Pacific Ocean.",
            "rejected": "The Atlantic.",
        },
    ]
    assert (result.format, result.source_format) == ("standard", "alpaca")


def test_axolotl_chat_template_default() -> None:
    result, rows, _ = ingest(FIXTURES / "axolotl_chat_template.jsonl")
    assert rows == [
        {
            "prompt": [
                system("You are a math tutor."),
                user("What is 7 x 8?"),
                bot("56."),
                user("And 7 x 9?"),
            ],
            "chosen": [bot("63.")],
            "rejected": [bot("64.")],
        }
    ]
    assert result.source_format == "chat_template"


def test_axolotl_chatml_intel_keeps_the_system_prompt() -> None:
    """The complaint: 201, no warning, and the system text gone. An empty system stays out."""
    result, rows, _ = ingest(FIXTURES / "axolotl_intel.jsonl")
    assert rows == [
        {
            "prompt": [
                system("You are an AI assistant. Think step by step."),
                user("Is 91 a prime number?"),
            ],
            "chosen": [bot("No: 91 = 7 × 13.")],
            "rejected": [bot("Yes, 91 is prime.")],
        },
        {
            "prompt": [user("What colour do you get mixing blue and yellow?")],
            "chosen": [bot("Green.")],
            "rejected": [bot("Purple.")],
        },
    ]
    assert (result.source_format, result.warnings) == ("intel", [])


def test_a_blank_system_column_gives_way_to_one_that_holds_text(tmp_path: Path) -> None:
    """Exports that carry both `system` (empty) and `system_prompt` keep the one with text,
    for preference rows as for sft rows, and warn about nothing."""
    path = tmp_path / "two_systems.jsonl"
    path.write_text(
        json.dumps(
            {
                "system": "",
                "system_prompt": "Réponds en français.",
                "question": "Capital of France?",
                "chosen": "Paris.",
                "rejected": "Lyon.",
            },
            ensure_ascii=False,
        )
        + "\n"
    )
    result, rows, _ = ingest(path)
    assert rows[0]["prompt"] == [system("Réponds en français."), user("Capital of France?")]
    assert result.warnings == []


def test_axolotl_chatml_argilla() -> None:
    result, rows, _ = ingest(FIXTURES / "axolotl_argilla.jsonl")
    assert rows == [
        {
            "prompt": "Write a title for an article about sleep.",
            "chosen": "Why Eight Hours Still Matter",
            "rejected": "Sleep",
        },
        {"prompt": "¿Cuántas patas tiene una araña?", "chosen": "Ocho.", "rejected": "Seis."},
    ]
    assert result.source_format == "argilla"
    assert result.mapping == {
        "prompt": "instruction",
        "chosen": "chosen_response",
        "rejected": "rejected_response",
    }


def test_axolotl_prompt_pairs_with_a_system_in_some_rows_only() -> None:
    result, rows, _ = ingest(FIXTURES / "axolotl_prompt_pairs.jsonl")
    assert rows == [
        {
            "prompt": [user("Define entropy briefly.")],
            "chosen": [bot("A measure of disorder, or of missing information.")],
            "rejected": [bot("Energy.")],
        },
        {
            "prompt": [system("Answer like a pirate."), user("Where is the treasure?")],
            "chosen": [bot("Arr, buried under the old palm, matey!")],
            "rejected": [bot("I do not know.")],
        },
    ]
    assert (result.format, result.source_format) == ("conversational", "prompt_pairs")
    assert [(w.kind, w.lines) for w in result.warnings] == [("made_conversational", [1])]


def test_axolotl_chatml_icr_names_the_distilabel_columns() -> None:
    result, rows, _ = ingest(FIXTURES / "axolotl_icr.jsonl")
    assert rows == [
        {
            "prompt": [
                system("You are a helpful assistant."),
                user("Sort these numbers: 3, 1, 2."),
            ],
            "chosen": [bot("1, 2, 3.")],
            "rejected": [bot("3, 2, 1.")],
        }
    ]
    assert result.source_format == "icr"
    assert set(ignored(result)) == {
        "generations",
        "order",
        "labelling_model",
        "rating",
        "status",
        "in_gsm8k_train",
    }


def test_medicalgpt_history_and_system_in_chinese() -> None:
    result, rows, data = ingest(FIXTURES / "medicalgpt.jsonl")
    assert rows == [
        {
            "prompt": [
                system("你是一名专业的医生，回答要准确。"),
                user("我最近总是头疼。"),
                bot("头疼持续多久了？有没有发烧？"),
                user("大概一周了，没有发烧，该怎么办？"),
            ],
            "chosen": [bot("建议先保证睡眠、少看屏幕；如果一周后仍不缓解，请到神经内科就诊。")],
            "rejected": [bot("多喝热水就好了。")],
        },
        {
            "prompt": [user("感冒可以吃抗生素吗？")],
            "chosen": [bot("普通感冒多由病毒引起，抗生素无效，不建议自行服用。")],
            "rejected": [bot("可以，吃了好得快。")],
        },
    ]
    assert result.source_format == "medicalgpt"
    assert "神经内科".encode() in data


def test_openai_dpo_with_developer_role_and_text_parts() -> None:
    result, rows, _ = ingest(FIXTURES / "openai_dpo.jsonl")
    assert rows == [
        {
            "prompt": [system("Reply in French."), user("Say hello.\nBe warm.")],
            "chosen": [bot("Bonjour, ravi de vous voir !")],
            "rejected": [bot("Hello.")],
        }
    ]
    assert result.source_format == "openai"
    assert ignored(result) == {}  # parallel_tool_calls says nothing training needs


def test_csv_with_a_header_row() -> None:
    result, rows, _ = ingest(FIXTURES / "prompts.csv", hint="csv")
    assert rows == [
        {
            "prompt": [user("Capital of Italy, please?")],
            "chosen": [bot("Rome.")],
            "rejected": [bot("Milan.")],
        },
        {
            "prompt": [system("Answer in two words at most."), user("What is H2O?")],
            "chosen": [bot("Water.")],
            "rejected": [bot("Fire.")],
        },
    ]
    assert (result.container, result.source_format) == ("csv", "prompt_pairs")
    # The header is enough to tell CSV from JSONL without the hint.
    assert ingest(FIXTURES / "prompts.csv")[1] == rows


# --------------------------------------------------------------------------- mappings


def test_a_mapping_takes_system_and_history_columns(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    path.write_text(
        json.dumps(
            {
                "persona": "Be concise.",
                "turns": [["Hi", "Hello."]],
                "ask": "Name a colour.",
                "good": "Blue.",
                "bad": "Colours are hard.",
                "context": "a chat app",
            }
        )
        + "\n"
    )
    mapping = FieldMapping(
        prompt_field="ask",
        chosen_field="good",
        rejected_field="bad",
        system_field="persona",
        history_field="turns",
    )
    result, rows, _ = ingest(path, mapping=mapping)
    assert rows == [
        {
            "prompt": [system("Be concise."), user("Hi"), bot("Hello."), user("Name a colour.")],
            "chosen": [bot("Blue.")],
            "rejected": [bot("Colours are hard.")],
        }
    ]
    assert result.source_format == "mapped"
    assert result.mapping == {
        "prompt": "ask",
        "chosen": "good",
        "rejected": "bad",
        "system": "persona",
        "history": "turns",
    }
    # A prompt-like column the mapping leaves unused is a warning, never silence.
    [warning] = result.warnings
    assert (warning.kind, warning.count) == ("unused_prompt_column", 1)
    assert warning.msg.startswith("column 'context' holds text in 1 row but the mapping")


def test_a_mapping_names_a_missing_prompt_column_and_history_without_a_prompt(
    tmp_path: Path,
) -> None:
    """A prompt_field the rows lack is that field missing (it read as an implicit prompt and
    blamed chosen); a history_field with the prompt inside chosen and rejected is refused,
    not dropped while the record claimed it."""
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "good": "4", "bad": "5", "turns": []}) + "\n")
    cases = [
        (
            FieldMapping(prompt_field="q", chosen_field="good", rejected_field="bad"),
            "q",
            "missing field 'q' (the row has: 'question', 'good', 'bad', 'turns')",
        ),
        (
            FieldMapping(chosen_field="good", rejected_field="bad", history_field="turns"),
            "turns",
            "history_field needs a prompt column",
        ),
    ]
    for mapping, field, words in cases:
        with pytest.raises(InvalidDataset) as refused:
            ingest(path, mapping=mapping)
        [error] = refused.value.errors
        assert error.field == field and error.msg.startswith(words), error


def test_a_mapping_of_the_answers_only_never_splits_them_for_a_prompt(tmp_path: Path) -> None:
    """Argilla rows mapped by their answer columns only: 'An apple.' and 'A car.' were split
    into the prompt 'A' (their common start) while 'instruction' held the real prompt."""
    path = tmp_path / "argilla.jsonl"
    row = {
        "instruction": "Name a fruit.",
        "chosen_response": "An apple.",
        "rejected_response": "A car.",
    }
    path.write_text(json.dumps(row) + "\n")
    mapping = FieldMapping(chosen_field="chosen_response", rejected_field="rejected_response")
    with pytest.raises(InvalidDataset) as refused:
        ingest(path, mapping=mapping)
    [error] = refused.value.errors
    assert error.field == "instruction" and "prompt_field=instruction" in error.msg
    _, rows, _ = ingest(path)  # the same file with no mapping is read as argilla's
    assert rows[0]["prompt"] == "Name a fruit." and rows[0]["chosen"] == "An apple."


def test_a_mapping_without_system_field_warns_about_the_system_column() -> None:
    mapping = FieldMapping(prompt_field="question")
    result, rows, _ = ingest(FIXTURES / "axolotl_intel.jsonl", mapping=mapping)
    assert rows[0]["prompt"] == "Is 91 a prime number?"
    [warning] = result.warnings
    assert (warning.kind, warning.count, warning.lines) == ("unused_prompt_column", 1, [1])
    assert "'system'" in warning.msg and "system_field" in warning.msg
