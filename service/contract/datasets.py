"""The contract of datasets: what an upload returns and how jobs refer to one."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

NAME_PATTERN = r"^[\w .,:()+-]+(?!\n)$"
SOURCE_PATTERN = (
    r"^(hf://datasets/[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
    r"(/(\S( *\S)*)?)?|s3://[a-z0-9][a-z0-9.-]{1,62}/\S( *\S)*)(?!\n)$"
)
_NAME_UNSAFE = re.compile(r"[^\w .,:()+-]+")


def dataset_name(text: str) -> str:
    """A valid dataset name made of a file's or a repo's name: other characters become `_`."""
    return (_NAME_UNSAFE.sub("_", text).strip() or "dataset")[:128]


Format = Literal["standard", "conversational"]

DatasetKind = Literal["preference", "sft", "unpaired"]
"""What a dataset's rows hold: chosen/rejected pairs, prompt/completion, or prompt/completion
with a good/bad label; it decides which methods can train on it."""

KIND_DESCRIPTION = (
    "`preference`: prompt, chosen and rejected (dpo, orpo, simpo, kto); `sft`: prompt and "
    "completion, from prompt/completion or chat `messages` rows (sft); `unpaired`: prompt, "
    "completion and a true/false `label` (kto)."
)

SourceFormat = Literal[
    "standard",
    "conversational",
    "implicit_prompt",
    "openai",
    "mapped",
    "hh",
    "ultrafeedback",
    "sharegpt",
    "chat_template",
    "alpaca",
    "intel",
    "argilla",
    "prompt_pairs",
    "icr",
    "medicalgpt",
]
"""The row layout an upload was detected in (README, "Dataset formats")."""

Container = Literal["jsonl", "json", "parquet", "csv"]
"""How the rows were packed in the file (gzip is told apart by ``compressed``)."""


def numbered_as(container: Container | None) -> Literal["line", "row"]:
    """What a dataset error's or warning's number counts: a JSONL file's lines (blank ones
    too), else the rows of the JSON array, Parquet or CSV file (its header not counted)."""
    return "row" if container in ("json", "parquet", "csv") else "line"


OnInvalid = Literal["reject", "skip"]
ColumnName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class DatasetRef(msgspec.Struct, kw_only=True):
    """The dataset a job or snapshot was made from, as it was then."""

    id: Annotated[str, msgspec.Meta(description="The dataset's id (`ds_...`).")]
    sha256: Annotated[
        str, msgspec.Meta(description="sha256 hex of the normalized JSONL: exactly which rows.")
    ]
    rows: Annotated[int, msgspec.Meta(description="Number of rows (preference pairs).")]
    format: Annotated[
        Format,
        msgspec.Meta(
            description="`standard`: texts are strings; `conversational`: lists of "
            "{role, content} messages."
        ),
    ]
    kind: Annotated[DatasetKind, msgspec.Meta(description=KIND_DESCRIPTION)] = "preference"
    functions: Annotated[
        bool, msgspec.Meta(description="Whether its rows list functions (tools) or call them.")
    ] = False


class DatasetWarning(msgspec.Struct, kw_only=True):
    """Rows that were accepted but are probably not what was meant."""

    kind: Annotated[
        str,
        msgspec.Meta(
            description="`duplicate` (repeats an earlier row), `long_row` (likely dropped or "
            "truncated at max_length) or `near_identical` (chosen and rejected differ only in "
            "whitespace or case)."
        ),
    ]
    msg: Annotated[str, msgspec.Meta(description="What was found, in words.")]
    count: Annotated[int, msgspec.Meta(description="How many rows it concerns.")]
    lines: Annotated[
        list[int],
        msgspec.Meta(
            description="The first few (1-based) where it happens: lines of a JSONL file, "
            "else rows of the JSON array, Parquet or CSV file (see `container`)."
        ),
    ]


class DatasetStats(msgspec.Struct, kw_only=True):
    """Text lengths in characters, each as `min`, `mean`, `max` and `p95`."""

    prompt_chars: Annotated[
        dict[str, float], msgspec.Meta(description="Length of the prompts in characters.")
    ]
    chosen_chars: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="Length of the chosen responses in characters (preference datasets)."
        ),
    ] = {}
    rejected_chars: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="Length of the rejected responses in characters (preference datasets)."
        ),
    ] = {}
    completion_chars: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="Length of the completions in characters (sft and unpaired datasets)."
        ),
    ] = {}
    desirable_rows: Annotated[
        int | None,
        msgspec.Meta(description="Rows labelled true (unpaired datasets); null otherwise."),
    ] = None


class Dataset(msgspec.Struct, kw_only=True):
    """An uploaded dataset: validated, normalized to one canonical row form and stored."""

    id: Annotated[str, msgspec.Meta(description="The dataset's id (`ds_...`): a job's dataset_id.")]
    tenant: Annotated[str, msgspec.Meta(description="The tenant that owns it.")]
    name: Annotated[str, msgspec.Meta(description="The name given at upload (`?name=`).")]
    rows: Annotated[int, msgspec.Meta(description="Number of rows (preference pairs) stored.")]
    bytes: Annotated[int, msgspec.Meta(description="Size of the normalized JSONL as stored.")]
    source_bytes: Annotated[int, msgspec.Meta(description="Size of the upload as received.")]
    sha256: Annotated[
        str,
        msgspec.Meta(
            description="sha256 hex of the normalized JSONL: the content address in the blob store."
        ),
    ]
    format: Annotated[
        Format,
        msgspec.Meta(
            description="`standard`: texts are strings; `conversational`: lists of "
            "{role, content} messages. One dataset holds one format."
        ),
    ]
    source_format: Annotated[
        SourceFormat,
        msgspec.Meta(
            description='The layout the rows arrived in (README, "Dataset formats"): e.g. '
            "`implicit_prompt` (chosen and rejected share the prompt as a prefix), `openai`, "
            "`hh`, `sharegpt`, or `mapped` (read through the upload's `*_field` columns)."
        ),
    ]
    stats: Annotated[
        DatasetStats, msgspec.Meta(description="Text lengths, for choosing max_length.")
    ]
    warnings: Annotated[
        list[DatasetWarning],
        msgspec.Meta(description="Rows accepted but probably not meant; empty when none."),
    ]
    created_at: Annotated[
        float, msgspec.Meta(description="When it was uploaded, in seconds since the epoch.")
    ]
    kind: Annotated[DatasetKind, msgspec.Meta(description=KIND_DESCRIPTION)] = "preference"
    container: Annotated[
        Container,
        msgspec.Meta(description="The file's packing: jsonl, json (an array), parquet or csv."),
    ] = "jsonl"
    compressed: Annotated[
        bool, msgspec.Meta(description="Whether the file came gzip-compressed.")
    ] = False
    mapping: Annotated[
        dict[str, str],
        msgspec.Meta(
            description="Where each part of the normalized rows was read from, e.g. "
            '{"prompt": "instruction + input", "system": "system", "chosen": "output[0]"} '
            "(for the first row; rows of other layouts say so in source_format only)."
        ),
    ] = {}
    functions: Annotated[
        bool,
        msgspec.Meta(
            description="Whether rows list functions (tools) or call them: each row is then "
            "rendered with its own tools, and a job needs a base model whose chat template "
            "renders calls."
        ),
    ] = False
    skipped_rows: Annotated[
        int,
        msgspec.Meta(ge=0, description="Invalid rows left out (on_invalid=skip); 0 otherwise."),
    ] = 0
    skipped: Annotated[
        list[RowProblem],
        msgspec.Meta(description="The first 100 rows left out, each with where and why."),
    ] = []

    def ref(self) -> DatasetRef:
        """What a job or snapshot made from it records of it."""
        return DatasetRef(
            id=self.id,
            sha256=self.sha256,
            rows=self.rows,
            format=self.format,
            kind=self.kind,
            functions=self.functions,
        )


_CALL_KEYS = frozenset(("tool_calls", "tool_call_id", "name"))


def uses_functions(row: dict[str, Any]) -> bool:
    """Whether a canonical row lists functions or holds a call or a call's result: what
    `Dataset.functions` says of its rows (the upload and the worker both ask)."""
    return "tools" in row or any(
        not _CALL_KEYS.isdisjoint(m)
        for part in ("prompt", "chosen", "rejected", "completion")
        if isinstance(row.get(part), list)
        for m in row[part]
    )


class DatasetList(msgspec.Struct, kw_only=True):
    """One page of datasets, newest first."""

    items: Annotated[list[Dataset], msgspec.Meta(description="The datasets of this page.")]
    next_cursor: Annotated[
        str | None,
        msgspec.Meta(description="Pass as `cursor` for the next page; null on the last page."),
    ] = None


class FieldMapping(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Column names of the uploaded rows, for datasets that do not say prompt/chosen/rejected."""

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    system_field: Annotated[
        str | None,
        msgspec.Meta(description="Column whose text becomes the system message of each prompt."),
    ] = None
    history_field: Annotated[
        str | None,
        msgspec.Meta(
            description="Column of earlier turns placed before the prompt: [prompt, answer] "
            "pairs or messages."
        ),
    ] = None
    completion_field: Annotated[
        str | None,
        msgspec.Meta(description="Column of the completion: the rows are sft or unpaired."),
    ] = None
    label_field: Annotated[
        str | None,
        msgspec.Meta(description="Column of the true/false label: the rows are unpaired."),
    ] = None
    messages_field: Annotated[
        str | None,
        msgspec.Meta(
            description="Column of a whole chat (OpenAI's `messages`): sft rows (kto with a "
            "label), the last assistant turn the completion; for sft the earlier answers are "
            "trained too (unless of weight 0)."
        ),
    ] = None

    def kind(self) -> DatasetKind:
        """The kind of rows the mapping reads."""
        if self.label_field is not None:
            return "unpaired"
        if self.completion_field is not None or self.messages_field is not None:
            return "sft"
        return "preference"

    def __post_init__(self) -> None:
        extra = (self.completion_field, self.label_field, self.messages_field)
        pairs = (self.chosen_field, self.rejected_field) if self.kind() == "preference" else ()
        names = tuple(
            n
            for n in (
                self.prompt_field,
                *pairs,
                self.system_field,
                self.history_field,
                *extra,
            )
            if n is not None
        )
        if not all(names):
            raise ValueError("field names must not be empty")
        if len(set(names)) != len(names):
            raise ValueError(f"the mapped fields must all differ, got {names}")


class RowProblem(msgspec.Struct, kw_only=True):
    """One row that could not be accepted."""

    line: Annotated[
        int,
        msgspec.Meta(
            description="1-based line of a JSONL file, or row of a JSON array, Parquet or CSV "
            "file; 0 for the whole file."
        ),
    ]
    field: Annotated[
        str | None,
        msgspec.Meta(
            description="Where in the row, e.g. chosen, prompt[2].role; null for the row."
        ),
    ]
    msg: Annotated[str, msgspec.Meta(description="What is wrong with it and how to fix it.")]


class InvalidRows(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an upload or an import does with invalid rows."""

    on_invalid: Annotated[
        OnInvalid,
        msgspec.Meta(
            description="reject: any invalid row rejects the dataset; skip: invalid rows are "
            "left out and listed, up to max_invalid_fraction."
        ),
    ] = "reject"
    max_invalid_fraction: Annotated[
        float,
        msgspec.Meta(
            ge=0.0, le=1.0, description="With on_invalid=skip, the most rows that may be invalid."
        ),
    ] = 0.01


class DatasetImport(InvalidRows, kw_only=True, forbid_unknown_fields=True):
    """A dataset to fetch from where it is published, validated exactly like an upload."""

    source: Annotated[
        str,
        msgspec.Meta(
            max_length=1024,
            pattern=SOURCE_PATTERN,
            description="hf://datasets/ORG/NAME[/folder or file] on the Hub, or "
            "s3://bucket/key (one object: JSONL, JSON, Parquet or CSV, optionally gzip).",
        ),
    ]
    revision: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=256,
                description="Hub branch, tag or commit (default: main).",
            ),
        ]
        | None
    ) = None
    split: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=128,
                pattern=r"^[\w.-]+(?!\n)$",
                description="Hub split (default: train): its files as the `configs:` of the "
                "repo's README card list them, else the files named SPLIT.* or SPLIT-* or in a "
                "SPLIT/ folder.",
            ),
        ]
        | None
    ) = None
    config: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=128,
                pattern=r"^[\w.-]+(?!\n)$",
                description="Hub config (subset) among the `configs:` of the repo's README card "
                "(default: the one marked default, or named `default`, or the only one).",
            ),
        ]
        | None
    ) = None
    name: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                pattern=NAME_PATTERN,
                description="Dataset name (default: the repo's name and split, or the file name).",
            ),
        ]
        | None
    ) = None
    prompt_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding the prompt, for a layout not read without a "
                "mapping.",
            ),
        ]
        | None
    ) = None
    chosen_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding the chosen answer, for a layout not read without a "
                "mapping.",
            ),
        ]
        | None
    ) = None
    rejected_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding the rejected answer, for a layout not read "
                "without a mapping.",
            ),
        ]
        | None
    ) = None
    system_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding each prompt's system message, for a layout "
                "not read without a mapping.",
            ),
        ]
        | None
    ) = None
    history_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding earlier turns placed before each prompt, for a "
                "layout not read without a mapping.",
            ),
        ]
        | None
    ) = None
    completion_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding the completion: sft rows (unpaired with "
                "label_field).",
            ),
        ]
        | None
    ) = None
    label_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding the true/false label: unpaired rows.",
            ),
        ]
        | None
    ) = None
    messages_field: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="The column holding a whole chat: sft rows (kto with a label), the "
                "last assistant turn the completion; for sft the earlier answers are trained "
                "too (unless of weight 0).",
            ),
        ]
        | None
    ) = None


class FunctionCall(msgspec.Struct, kw_only=True):
    """What a tool call asks for."""

    name: Annotated[str, msgspec.Meta(description="The function's name.")]
    arguments: Annotated[
        dict[str, Any],
        msgspec.Meta(
            description="Its arguments as an object (OpenAI's JSON string, parsed: the form "
            "chat templates read)."
        ),
    ]


class ToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One function an answer calls."""

    type: Annotated[Literal["function"], msgspec.Meta(description="Always `function`.")]
    function: Annotated[
        FunctionCall, msgspec.Meta(description="The function called, with its arguments.")
    ]
    id: Annotated[
        str | None, msgspec.Meta(description="The call's id, which its result names.")
    ] = None


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One chat message of a conversational row."""

    role: Annotated[
        Literal["system", "user", "assistant", "tool"],
        msgspec.Meta(description="Who speaks (a `developer` message is read as `system`)."),
    ]
    content: Annotated[str, msgspec.Meta(description="The message's text.")]
    weight: Annotated[
        Literal[1] | None,
        msgspec.Meta(
            description="1 on an answer in an sft row's prompt that is trained on as well as "
            "the completion: a chat's earlier answers (those without OpenAI's `weight` 0) and "
            "a `history` column's answers, and answers so marked in an uploaded prompt. Left "
            "out: the message is context only."
        ),
    ] = None
    tool_calls: Annotated[
        list[ToolCall] | None,
        msgspec.Meta(description="The functions an assistant message calls."),
    ] = None
    tool_call_id: Annotated[
        str | None, msgspec.Meta(description="The call a `tool` message gives the result of.")
    ] = None
    name: Annotated[
        str | None, msgspec.Meta(description="The function a `tool` message's result is of.")
    ] = None


_Text = str | list[Message]


class DatasetRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A normalized row, as training will see it."""

    prompt: Annotated[
        _Text, msgspec.Meta(description="The prompt: a string, or the messages before the answer.")
    ]
    chosen: Annotated[
        _Text | None, msgspec.Meta(description="The preferred answer (preference rows).")
    ] = None
    rejected: Annotated[
        _Text | None, msgspec.Meta(description="The answer not preferred (preference rows).")
    ] = None
    completion: Annotated[
        _Text | None, msgspec.Meta(description="The answer (sft and unpaired rows).")
    ] = None
    label: Annotated[
        bool | None, msgspec.Meta(description="Whether the answer is good (unpaired rows).")
    ] = None
    tools: Annotated[
        list[dict[str, Any]] | None,
        msgspec.Meta(
            description="The functions the row's answers may call, each "
            '`{"type": "function", "function": {"name", "description", "parameters"}}` '
            "(OpenAI's `functions` are given this form)."
        ),
    ] = None


class DatasetRows(msgspec.Struct, kw_only=True):
    """A page of a dataset's normalized rows."""

    dataset_id: Annotated[str, msgspec.Meta(description="The dataset's id (`ds_...`).")]
    offset: Annotated[int, msgspec.Meta(description="Index of the first row of the page.")]
    rows: Annotated[list[DatasetRow], msgspec.Meta(description="The rows, in stored order.")]
    next_offset: Annotated[
        int | None, msgspec.Meta(description="Offset of the next page; null at the end.")
    ] = None
