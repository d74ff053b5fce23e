"""The contract of datasets: what an upload returns and how jobs refer to one."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Format = Literal["standard", "conversational"]


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
        msgspec.Meta(description="The first few line numbers (1-based) where it happens."),
    ]


class DatasetStats(msgspec.Struct, kw_only=True):
    """Text lengths in characters, each as `min`, `mean`, `max` and `p95`."""

    prompt_chars: Annotated[
        dict[str, float], msgspec.Meta(description="Length of the prompts in characters.")
    ]
    chosen_chars: Annotated[
        dict[str, float], msgspec.Meta(description="Length of the chosen responses in characters.")
    ]
    rejected_chars: Annotated[
        dict[str, float],
        msgspec.Meta(description="Length of the rejected responses in characters."),
    ]


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
        Literal["standard", "conversational", "implicit_prompt", "openai", "mapped"],
        msgspec.Meta(
            description="The form the rows arrived in: `implicit_prompt` (chosen and rejected "
            "share the prompt as a prefix), `openai` (OpenAI's DPO format), `mapped` (read "
            "through the `*_field` column mapping of the upload)."
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

    def __post_init__(self) -> None:
        names = (self.prompt_field, self.chosen_field, self.rejected_field)
        if not all(names):
            raise ValueError("field names must not be empty")
        if len(set(names)) != 3:
            raise ValueError(f"prompt, chosen and rejected fields must differ, got {names}")
