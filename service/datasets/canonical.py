"""The canonical row as the fast path decodes it, and the checks that run a block at a time.

A line decoded straight into :class:`Row` by msgspec has its types and roles checked in C;
:func:`texts_pass` and :func:`conversations_pass` finish the checks of
:func:`service.datasets.layouts.normalize` for a whole block, with C builtins where they can.
Whatever does not pass goes to ``normalize``, which says what is wrong.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from itertools import repeat
from typing import Any, Literal

import msgspec

from service.datasets.messages import COMPLETION_ROLES


class RowCall(msgspec.Struct, gc=False, omit_defaults=True):
    """A function call as stored: `function` is ``{name, arguments}``, arguments an object."""

    type: Literal["function"]
    function: dict[str, Any]
    id: str | None = None


class RowMessage(msgspec.Struct, gc=False, forbid_unknown_fields=True, omit_defaults=True):
    """A message; what a function call adds is left out of the JSON when it is not there. Any
    other field sends its row to the slow path, which names what it leaves out."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[RowCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Row(msgspec.Struct, gc=False, forbid_unknown_fields=True, omit_defaults=True):
    """A canonical row, and the type the fast path decodes lines into.

    Decoding straight into it checks types and roles in C and refuses any other key (a row
    with more columns may be another layout, or a column to warn about); encoding it gives
    the canonical JSON (fields and keys in this order).
    """

    prompt: str | list[RowMessage]
    chosen: str | list[RowMessage]
    rejected: str | list[RowMessage]
    tools: list[dict[str, Any]] | None = None
    """The functions the row's answers may call, for the chat template."""


_role_of = operator.attrgetter("role")


def _calls(m: RowMessage) -> bool:
    """Whether a message takes part in a function call (a call, or a result naming one)."""
    return m.tool_calls is not None or m.tool_call_id is not None or m.name is not None


_tools_of = operator.attrgetter("tools")
prompt_of = operator.attrgetter("prompt")
chosen_of = operator.attrgetter("chosen")
rejected_of = operator.attrgetter("rejected")


def passes(row: Row) -> bool:
    """Whether a row decoded straight into :class:`Row` passes every check of
    :func:`normalize` (if not, the slow path says what is wrong)."""
    p, c, r = row.prompt, row.chosen, row.rejected
    if isinstance(p, str):
        return (
            row.tools is None
            and isinstance(c, str)
            and isinstance(r, str)
            and bool(p and c and r)
            and c != r
            and not (p.isspace() or c.isspace() or r.isspace())
        )
    if not (isinstance(c, list) and isinstance(r, list) and p and c and r):
        return False
    if row.tools is not None or any(map(_calls, p)) or any(map(_calls, c)) or any(map(_calls, r)):
        return False  # what a function call may hold is checked by normalize
    if p[-1].role == "assistant" or c[0].role != "assistant" or r[0].role != "assistant":
        return False
    for msgs in (p, c, r):
        for m in msgs:
            if not m.content or m.content.isspace():
                return False
    for msgs in (c, r):
        if len(msgs) > 1 and not COMPLETION_ROLES.issuperset(map(_role_of, msgs)):
            return False
    return c != r


def parts(rows: list[Row]) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        list(map(prompt_of, rows)),
        list(map(chosen_of, rows)),
        list(map(rejected_of, rows)),
    )


def texts_pass(*columns: list[Any]) -> bool:
    """Whether decoded standard rows pass every check of :func:`normalize`, a column at a
    time in C: all texts, none empty or blank, chosen never equal to rejected."""
    for texts in columns:
        if set(map(type, texts)) != {str} or not all(texts) or any(map(str.isspace, texts)):
            return False
    return not any(map(operator.eq, columns[1], columns[2]))


def list_no_tools(rows: list[Row]) -> bool:
    """Whether no row of a block lists functions (`"tools": []` too goes to normalize, which
    drops it), in C."""
    return not any(map(operator.is_not, map(_tools_of, rows), repeat(None)))


def conversations_pass(rows: list[Row], prompts: list[Any]) -> bool:
    return set(map(type, prompts)) == {list} and all(map(passes, rows))


_first = operator.itemgetter(slice(0, 1))


def first_letters(texts: list[str]) -> Iterable[str]:
    """Each text's first non-blank character, case-folded (C calls only)."""
    return map(str.casefold, map(_first, map(str.lstrip, texts)))


def decode_error(raw: bytes, line: int, exc: Exception) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {line} is not valid UTF-8: {e.reason} 0x{raw[e.start]:02x} at byte {e.start}"
    found = _AT_BYTE.search(str(exc))
    if found and raw[int(found.group(1)) :].startswith((b"NaN", b"Infinity")):
        return (
            f"line {line} is not valid JSON: {exc}: NaN and Infinity are not JSON (Python's "
            "json.dumps writes them for such floats); write null, or dump with allow_nan=False"
        )
    return f"line {line} is not valid JSON: {exc}"


_AT_BYTE = re.compile(r"\(byte (\d+)\)")


def as_conversation(row: Row) -> Row:
    """A standard row as the conversation it stands for (what training would make of it)."""
    return Row(
        [RowMessage("user", row.prompt)],  # type: ignore[arg-type]
        [RowMessage("assistant", row.chosen)],  # type: ignore[arg-type]
        [RowMessage("assistant", row.rejected)],  # type: ignore[arg-type]
    )


CANONICAL_MAPPING = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
