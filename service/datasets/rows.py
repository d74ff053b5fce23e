"""One preference row: checked, its layout told, normalized to the canonical form.

Pure functions: no Redis, no HTTP, no torch. :mod:`service.datasets.validate` streams whole
files through them; feedback events reuse :func:`normalize_row`.

Every accepted row becomes one canonical row, written as compact JSON with the keys in the
order prompt, chosen, rejected, one row a line, ``\\n`` line endings:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- conversational: ``{"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}``
  where a message is ``{"role": ..., "content": str}`` (system, user, assistant or tool); the
  answers start with an assistant message and hold only assistant and tool messages.

The layouts read without a mapping are in :mod:`service.datasets.layouts`; the pieces
(texts, messages in either spelling) in :mod:`service.datasets.messages`.
"""

from __future__ import annotations

from typing import Any

from service.contract import FieldMapping, Format, SourceFormat
from service.datasets.layouts import DEFAULT_MAPPING, Normalized, normalize
from service.datasets.messages import COMPLETION_ROLES, ROLES, RowInvalid

__all__ = [
    "COMPLETION_ROLES",
    "DEFAULT_MAPPING",
    "LONG_ROW_CHARS",
    "ROLES",
    "Format",
    "Normalized",
    "RowInvalid",
    "SourceFormat",
    "normalize",
    "normalize_row",
    "row_format",
]

LONG_ROW_CHARS = 32_768
"""A row whose prompt, chosen and rejected texts add up to more characters than this gets a
``long_row`` warning: at ~4 characters a token it is past 8k tokens, far over the default
``max_length`` of 1024, so training will drop or truncate it. A fixed threshold (rather
than one relative to the median) keeps the check a single streaming pass."""


def normalize_row(
    obj: object, *, mapping: FieldMapping | None = None
) -> tuple[dict[str, Any], SourceFormat]:
    """Check one decoded row and return ``(canonical row, source_format)``.

    Raises :class:`RowInvalid` naming the field at fault. Columns the layout does not use
    are dropped (:func:`normalize` names them); so are message keys other than role and
    content.
    """
    found = normalize(obj, mapping)
    return found.row, found.layout


def row_format(row: dict[str, Any]) -> Format:
    """Whether a canonical row is standard (texts) or conversational (messages)."""
    return "standard" if isinstance(row["prompt"], str) else "conversational"
