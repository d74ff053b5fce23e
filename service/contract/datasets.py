"""The contract of datasets: what an upload returns and how jobs refer to one."""

from __future__ import annotations

from typing import Literal

import msgspec


class DatasetRef(msgspec.Struct, kw_only=True):
    id: str
    sha256: str
    rows: int
    format: Literal["standard", "conversational"]


class DatasetWarning(msgspec.Struct, kw_only=True):
    kind: str
    msg: str
    count: int
    lines: list[int]
    """The first few line numbers where it happens."""


class DatasetStats(msgspec.Struct, kw_only=True):
    prompt_chars: dict[str, float]
    chosen_chars: dict[str, float]
    rejected_chars: dict[str, float]
    """min, mean, max and p95 of each text's length in characters."""


class Dataset(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    name: str
    rows: int
    bytes: int
    """Size of the normalized JSONL as stored."""
    source_bytes: int
    sha256: str
    """sha256 of the normalized JSONL: the content address in the blob store."""
    format: Literal["standard", "conversational"]
    source_format: Literal["standard", "conversational", "implicit_prompt", "openai", "mapped"]
    stats: DatasetStats
    warnings: list[DatasetWarning]
    created_at: float


class DatasetList(msgspec.Struct, kw_only=True):
    items: list[Dataset]
    next_cursor: str | None = None


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
