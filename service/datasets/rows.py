"""Streaming validation and normalization of preference datasets (JSONL).

Pure functions: no Redis, no HTTP, no torch. The API spools an upload to a temp file and
calls :func:`validate_jsonl` in a thread; feedback events reuse :func:`normalize_row`.

Accepted rows (one JSON object a line; unknown keys are ignored): standard texts, TRL
conversations, TRL's implicit-prompt conversations (the longest shared prefix of chosen and
rejected is the prompt), OpenAI's DPO format (``input.messages``, ``preferred_output``,
``non_preferred_output``; ``tools`` and the like are ignored), and any of these under other
column names through a :class:`FieldMapping`. A message keeps only its ``role`` (system,
user, assistant or tool) and ``content``; OpenAI-style text parts are joined with newlines.

Every accepted row becomes one canonical row, written as compact JSON with the keys in the
order prompt, chosen, rejected, one row a line, ``\n`` line endings:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- conversational: ``{"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}``
  where a message is ``{"role": ..., "content": str}``; the answers start with an assistant
  message and hold only assistant and tool messages.

Memory stays flat in the file size: lines are read one at a time (an overlong line is
skipped in chunks, never loaded whole), rows are written as they are checked, the p95 of
the text lengths comes from a fixed-size random sample, and duplicates are found through
64-bit row hashes kept in a flat array (8 bytes a slot, at most 2/3 full, with a ceiling:
``Limits.max_tracked_rows``).
"""

from __future__ import annotations

from typing import Any, Literal

from service.contract import FieldMapping

Format = Literal["standard", "conversational"]
SourceFormat = Literal["standard", "conversational", "implicit_prompt", "openai", "mapped"]

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a row may use (the roles chat templates know)."""

LONG_ROW_CHARS = 32_768
"""A row whose prompt, chosen and rejected texts add up to more characters than this gets a
``long_row`` warning: at ~4 characters a token it is past 8k tokens, far over the default
``max_length`` of 1024, so training will drop or truncate it. A fixed threshold (rather
than one relative to the median) keeps the check a single streaming pass."""


_ROLE_SET = frozenset(ROLES)
COMPLETION_ROLES = frozenset(("assistant", "tool"))
_OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
_MISSING: Any = object()


DEFAULT_MAPPING = FieldMapping()


class RowInvalid(Exception):
    """One row cannot be accepted: ``field`` says where (None for the whole row)."""

    def __init__(self, field: str | None, msg: str) -> None:
        super().__init__(f"{field}: {msg}" if field else msg)
        self.field = field
        self.msg = msg


# --------------------------------------------------------------------------- rows


def _kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _text(value: object, field: str, prompt_field: str | None = None) -> str:
    if not isinstance(value, str):
        hint = f" (the {prompt_field} is a string)" if prompt_field else ""
        raise RowInvalid(field, f"expected a string{hint}, got {_kind(value)}")
    if not value or value.isspace():
        raise RowInvalid(field, "the text is empty" if not value else "the text is only whitespace")
    return value


def _content(value: object, field: str) -> str:
    """A message's content: a string, or OpenAI-style text parts joined with newlines."""
    if isinstance(value, str):
        return _text(value, field)
    if not isinstance(value, list):
        raise RowInvalid(field, f"expected a string or a list of text parts, got {_kind(value)}")
    if not value:
        raise RowInvalid(field, "the list of content parts is empty")
    texts = []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise RowInvalid(where, f"expected a content part object, got {_kind(part)}")
        kind = part.get("type")
        if kind != "text":
            raise RowInvalid(
                f"{where}.type", f"only text content parts are supported, got {_short(kind)}"
            )
        if "text" not in part:
            raise RowInvalid(f"{where}.text", "missing field 'text'")
        if not isinstance(part["text"], str):
            raise RowInvalid(f"{where}.text", f"expected a string, got {_kind(part['text'])}")
        texts.append(part["text"])
    return _text("\n".join(texts), field)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RowInvalid(
            where, f"expected a message object with role and content, got {_kind(value)}"
        )
    if "role" not in value:
        raise RowInvalid(f"{where}.role", "missing field 'role'")
    role = value["role"]
    if not isinstance(role, str):
        raise RowInvalid(f"{where}.role", f"expected a string, got {_kind(role)}")
    if role not in _ROLE_SET:
        raise RowInvalid(
            f"{where}.role", f"unknown role {_short(role)}; expected one of {', '.join(ROLES)}"
        )
    if "content" not in value:
        raise RowInvalid(f"{where}.content", "missing field 'content'")
    return {"role": role, "content": _content(value["content"], f"{where}.content")}


def _messages(value: object, field: str, prompt_field: str | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list):
        hint = f" (the {prompt_field} is a list of messages)" if prompt_field else ""
        raise RowInvalid(field, f"expected a list of messages{hint}, got {_kind(value)}")
    if not value:
        raise RowInvalid(field, "the list of messages is empty")
    out = []
    for i, m in enumerate(value):
        # Fast path for a well-formed message; _message explains what is wrong otherwise.
        if (
            m.__class__ is dict
            and (role := m.get("role")).__class__ is str
            and role in _ROLE_SET
            and (content := m.get("content")).__class__ is str
            and content
            and not content.isspace()
        ):
            out.append({"role": role, "content": content})
        else:
            out.append(_message(m, f"{field}[{i}]"))
    return out


def _check_prompt(msgs: list[dict[str, str]], field: str) -> None:
    if msgs[-1]["role"] == "assistant":
        raise RowInvalid(
            f"{field}[{len(msgs) - 1}].role",
            "the prompt ends with an assistant message; its last message must be the one "
            "that chosen and rejected answer (user, system or tool)",
        )


def _check_completion(msgs: list[dict[str, str]], field: str, start: int = 0) -> None:
    """An answer starts with an assistant message and holds only assistant/tool messages."""
    if msgs[start]["role"] != "assistant":
        raise RowInvalid(
            f"{field}[{start}].role",
            f"an answer must start with an assistant message, got {msgs[start]['role']!r}",
        )
    for i in range(start + 1, len(msgs)):
        if msgs[i]["role"] not in COMPLETION_ROLES:
            raise RowInvalid(
                f"{field}[{i}].role",
                f"an answer holds only assistant and tool messages, got {msgs[i]['role']!r}",
            )


def _missing(field: str, obj: dict[str, Any], hint: str) -> RowInvalid:
    keys = ", ".join(_short(k, 30) for k in list(obj)[:10]) or "none"
    return RowInvalid(field, f"missing field {field!r} (the row has: {keys}){hint}")


def _identical(chosen_field: str, rejected_field: str) -> RowInvalid:
    return RowInvalid(rejected_field, f"{chosen_field} and {rejected_field} are identical")


def _openai(obj: dict[str, Any]) -> dict[str, Any]:
    for key in _OPENAI_KEYS:
        if key not in obj:
            raise RowInvalid(key, f"missing field {key!r} (OpenAI DPO format)")
    inp = obj["input"]
    if not isinstance(inp, dict):
        raise RowInvalid("input", f"expected an object with 'messages', got {_kind(inp)}")
    if "messages" not in inp:
        raise RowInvalid("input.messages", "missing field 'messages'")
    prompt = _messages(inp["messages"], "input.messages")
    _check_prompt(prompt, "input.messages")
    chosen = _messages(obj["preferred_output"], "preferred_output")
    _check_completion(chosen, "preferred_output")
    rejected = _messages(obj["non_preferred_output"], "non_preferred_output")
    _check_completion(rejected, "non_preferred_output")
    if chosen == rejected:
        raise _identical("preferred_output", "non_preferred_output")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _implicit(chosen_in: object, rejected_in: object, cf: str, rf: str) -> dict[str, Any]:
    """Whole conversations sharing a prefix: the longest shared prefix is the prompt."""
    chosen = _messages(chosen_in, cf)
    rejected = _messages(rejected_in, rf)
    n = 0
    shortest = min(len(chosen), len(rejected))
    while n < shortest and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise _identical(cf, rf)
    if n == 0:
        raise RowInvalid(
            cf,
            f"without a prompt field, {cf} and {rf} must be whole conversations that share "
            "their first message(s), the prompt; these differ from the first message",
        )
    for msgs, field in ((chosen, cf), (rejected, rf)):
        if n == len(msgs):
            raise RowInvalid(
                field,
                f"{field} ends where the prompt it shares with the other answer ends "
                f"({n} message{'s' if n > 1 else ''}): nothing is left as its answer",
            )
    if chosen[n - 1]["role"] == "assistant":
        raise RowInvalid(
            f"{cf}[{n - 1}].role",
            f"the prompt shared by {cf} and {rf} (their first {n} messages) ends with an "
            "assistant message: they must part at an assistant message",
        )
    _check_completion(chosen, cf, n)
    _check_completion(rejected, rf, n)
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def normalize_row(
    obj: object, *, mapping: FieldMapping | None = None
) -> tuple[dict[str, Any], SourceFormat]:
    """Check one decoded row and return ``(canonical row, source_format)``.

    Raises :class:`RowInvalid` naming the field at fault. Unknown keys are ignored and
    dropped; so are message keys other than role and content.
    """
    if not isinstance(obj, dict):
        raise RowInvalid(None, f"expected a JSON object, got {_kind(obj)}")
    if mapping is None or mapping is DEFAULT_MAPPING:
        m, mapped = DEFAULT_MAPPING, False
    else:
        m, mapped = mapping, mapping != DEFAULT_MAPPING
    pf, cf, rf = m.prompt_field, m.chosen_field, m.rejected_field
    prompt = obj.get(pf, _MISSING)
    chosen = obj.get(cf, _MISSING)
    rejected = obj.get(rf, _MISSING)
    # The common case in one expression (no calls but isspace, which stops at the first
    # non-blank character); anything else takes the checks below that name the fault.
    if (
        prompt.__class__ is str
        and chosen.__class__ is str
        and rejected.__class__ is str
        and prompt
        and chosen
        and rejected
        and chosen != rejected
        and not prompt.isspace()
        and not chosen.isspace()
        and not rejected.isspace()
    ):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, (
            "mapped" if mapped else "standard"
        )
    if chosen is _MISSING and rejected is _MISSING and any(k in obj for k in _OPENAI_KEYS):
        return _openai(obj), "openai"
    if chosen is _MISSING or rejected is _MISSING:
        hint = (
            "; a row needs prompt, chosen and rejected (or OpenAI's input, preferred_output "
            "and non_preferred_output); other column names need a field mapping"
            if not mapped
            else ""
        )
        raise _missing(cf if chosen is _MISSING else rf, obj, hint)
    if prompt is _MISSING:
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _implicit(chosen, rejected, cf, rf), "mapped" if mapped else "implicit_prompt"
        raise _missing(
            pf,
            obj,
            f"; the prompt may be left out only when {cf} and {rf} are whole "
            "conversations (lists of messages) that start with it",
        )
    if isinstance(prompt, str):
        row: dict[str, Any] = {
            "prompt": _text(prompt, pf),
            "chosen": _text(chosen, cf, pf),
            "rejected": _text(rejected, rf, pf),
        }
        if chosen == rejected:
            raise _identical(cf, rf)
        return row, "mapped" if mapped else "standard"
    if isinstance(prompt, list):
        p = _messages(prompt, pf)
        _check_prompt(p, pf)
        c = _messages(chosen, cf, pf)
        _check_completion(c, cf)
        r = _messages(rejected, rf, pf)
        _check_completion(r, rf)
        if c == r:
            raise _identical(cf, rf)
        return {"prompt": p, "chosen": c, "rejected": r}, "mapped" if mapped else "conversational"
    raise RowInvalid(pf, f"expected a string or a list of messages, got {_kind(prompt)}")


def row_format(row: dict[str, Any]) -> Format:
    """Whether a canonical row is standard (texts) or conversational (messages)."""
    return "standard" if isinstance(row["prompt"], str) else "conversational"
