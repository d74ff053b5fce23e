"""The pieces of a canonical row: texts and chat messages, checked and named when wrong.

A message is kept as ``{"role", "content"}`` with one of the four roles chat templates know
(and ``"weight": 1`` on an answer an sft row trains on in its prompt, :func:`mark_trained`).
Publishers spell messages two ways, and both are read: ``{role, content}`` (OpenAI, TRL;
``developer`` is OpenAI's newer name for ``system``, ``function`` its older one for a tool
result) and ShareGPT's ``{from, value}`` (LLaMA-Factory: ``human``, ``gpt``, ``system``,
``function_call`` for the assistant's call, ``observation`` for the tool's answer). Content is a
string or OpenAI's list of text parts, joined with newlines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a normalized row holds (the roles chat templates know)."""

COMPLETION_ROLES = frozenset(("assistant", "tool"))

_ROLE_SET = frozenset(ROLES)
ROLE_ALIASES = {"developer": "system", "function": "tool"}
"""``{role, content}`` spellings read as one of ROLES."""
_ROLE_NAMES = {**{r: r for r in ROLES}, **ROLE_ALIASES}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "function": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT ``from`` values (LLaMA-Factory's tags) and the role each becomes."""

Msg = dict[str, Any]
"""``{"role", "content"}``; in an sft chat also ``tool_calls``, ``tool_call_id``, ``name``."""


def mark_trained(msgs: list[Msg], answers: Iterable[int]) -> list[Msg]:
    """`msgs` with the assistant messages at `answers` marked ``"weight": 1``: answers before
    the completion that an sft row trains on too (a prompt's messages are context otherwise,
    as in TRL). The chat's first message answers nothing, so it is never marked."""
    picked = set(answers)
    return [
        {**m, "weight": 1} if i in picked and i > 0 and m["role"] == "assistant" else m
        for i, m in enumerate(msgs)
    ]


class RowInvalid(Exception):
    """One row cannot be accepted: ``field`` says where (None for the whole row)."""

    def __init__(self, field: str | None, msg: str) -> None:
        super().__init__(f"{field}: {msg}" if field else msg)
        self.field = field
        self.msg = msg


def kind(value: object) -> str:
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


def short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DROPPED: ContextVar[set[str] | None] = ContextVar("ftune_dropped_message_fields", default=None)
"""The message fields a row's reading left out, while :func:`noting_dropped` collects them."""
_KEPT = frozenset(("role", "content", "weight", "tool_calls", "function_call"))
"""What a message keeps (``weight`` is read where a chat is trained); a tool's result also
keeps ``tool_call_id`` and ``name``."""
_TOOL_KEPT = _KEPT | {"tool_call_id", "name"}
_SHAREGPT_KEPT = frozenset(("from", "value", "weight"))
_AT_INDEX = re.compile(r"\[\d+\]")


@contextmanager
def noting_dropped() -> Iterator[set[str]]:
    """Collect, as ``field[].key``, the non-empty message fields left out while reading a row
    (a reasoning trace, a speaker's name): the caller names them in a warning."""
    found: set[str] = set()
    token = _DROPPED.set(found)
    try:
        yield found
    finally:
        _DROPPED.reset(token)


def _note_dropped(value: dict[str, Any], where: str, kept: frozenset[str]) -> None:
    seen = _DROPPED.get()
    if seen is not None:
        field = _AT_INDEX.sub("[]", where)
        seen.update(f"{field}.{k}" for k, v in value.items() if k not in kept and not blank(v))


def blank(value: object) -> bool:
    """Whether an optional column holds nothing (null, empty or whitespace, an empty list)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value or value.isspace()
    if isinstance(value, list | tuple | dict):
        return not value
    return False


def text(value: object, field: str, prompt_field: str | None = None) -> str:
    if not isinstance(value, str):
        hint = f" (the {prompt_field} is a string)" if prompt_field else ""
        raise RowInvalid(field, f"expected a string{hint}, got {kind(value)}")
    if not value or value.isspace():
        raise RowInvalid(field, "the text is empty" if not value else "the text is only whitespace")
    return value


def content(value: object, field: str) -> str:
    """A message's content: a string, or OpenAI-style text parts joined with newlines."""
    if isinstance(value, str):
        return text(value, field)
    if not isinstance(value, list):
        raise RowInvalid(field, f"expected a string or a list of text parts, got {kind(value)}")
    if not value:
        raise RowInvalid(field, "the list of content parts is empty")
    texts = []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise RowInvalid(where, f"expected a content part object, got {kind(part)}")
        part_type = part.get("type")
        if part_type != "text":
            raise RowInvalid(
                f"{where}.type", f"only text content parts are supported, got {short(part_type)}"
            )
        if "text" not in part:
            raise RowInvalid(f"{where}.text", "missing field 'text'")
        if not isinstance(part["text"], str):
            raise RowInvalid(f"{where}.text", f"expected a string, got {kind(part['text'])}")
        texts.append(part["text"])
    return text("\n".join(texts), field)


def _sharegpt(value: dict[str, Any], where: str) -> Msg:
    who = value["from"]
    role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
    if role is None:
        raise RowInvalid(
            f"{where}.from",
            f"ShareGPT messages (from/value) name their speaker human, gpt, system, "
            f"function_call or observation; got {short(who)}",
        )
    if "value" not in value:
        raise RowInvalid(
            f"{where}.value", "missing field 'value' (ShareGPT messages (from/value) hold the text)"
        )
    _note_dropped(value, where, _SHAREGPT_KEPT)
    return {"role": role, "content": content(value["value"], f"{where}.value")}


def message(value: object, where: str, *, calls: bool = True) -> Msg:
    """One message checked and normalized, function calls and their results kept; without
    `calls` (a history column) a message that calls a function is refused, saying so."""
    if not isinstance(value, dict):
        raise RowInvalid(
            where,
            f"expected a message object with role and content (or ShareGPT's from and value), "
            f"got {kind(value)}",
        )
    if "role" not in value:
        if "from" in value:
            return _sharegpt(value, where)
        raise RowInvalid(
            f"{where}.role",
            "missing field 'role' (a message is {role, content}, or ShareGPT's {from, value})",
        )
    role = value["role"]
    if not isinstance(role, str):
        raise RowInvalid(f"{where}.role", f"expected a string, got {kind(role)}")
    name = _ROLE_NAMES.get(role)
    if name is None:
        raise RowInvalid(
            f"{where}.role",
            f"unknown role {short(role)}; expected one of system, developer, user, assistant, tool",
        )
    if not blank(value.get("tool_calls")) or not blank(value.get("function_call")):
        # null or [] is no call: the openai SDK's model_dump() writes both on every message
        if not calls:
            raise RowInvalid(
                f"{where}.tool_calls",
                "a history column holds earlier turns as text: function calls are read from "
                "the row's own messages (put the turns there, or upload with "
                "on_invalid=skip)",
            )
        if name != "assistant":
            raise RowInvalid(f"{where}.role", f"only assistant messages call tools, got {role!r}")
        said = value.get("content")
        text_ = "" if blank(said) else content(said, f"{where}.content")
        _note_dropped(value, where, _KEPT)
        return {"role": name, "content": text_, "tool_calls": tool_calls(value, where)}
    if "content" not in value:
        raise RowInvalid(f"{where}.content", "missing field 'content'")
    if calls and name == "tool" and value["content"] == "":  # a function may return nothing
        out: Msg = {"role": name, "content": ""}
    else:
        out = {"role": name, "content": content(value["content"], f"{where}.content")}
    if calls and name == "tool":  # which call it answers: templates name it so
        for key in ("tool_call_id", "name"):
            if isinstance(value.get(key), str):
                out[key] = value[key]
        _note_dropped(value, where, _TOOL_KEPT)
    else:
        _note_dropped(value, where, _KEPT)
    return out


def messages(
    value: object, field: str, prompt_field: str | None = None, *, calls: bool = True
) -> list[Msg]:
    if not isinstance(value, list):
        hint = f" (the {prompt_field} is a list of messages)" if prompt_field else ""
        raise RowInvalid(field, f"expected a list of messages{hint}, got {kind(value)}")
    if not value:
        raise RowInvalid(field, "the list of messages is empty")
    out = []
    for i, m in enumerate(value):
        # Fast path for a well-formed message; message() explains what is wrong otherwise.
        if (
            m.__class__ is dict
            and len(m) == 2  # nothing else to keep or refuse (tool_calls, weight, name, ...)
            and (role := m.get("role")).__class__ is str
            and role in _ROLE_SET
            and (body := m.get("content")).__class__ is str
            and body
            and not body.isspace()
        ):
            out.append({"role": role, "content": body})
        elif not _blank_system(m):
            out.append(message(m, f"{field}[{i}]", calls=calls))
    if not out:
        raise RowInvalid(field, "the list of messages holds only an empty system message")
    return out


def _blank_system(m: object) -> bool:
    """A system message with no text (SlimOrca-style exports write one on rows that have no
    system prompt): left out, as a blank system column is."""
    if not isinstance(m, dict):
        return False
    if "role" in m:
        return m["role"] in ("system", "developer") and len(m) == 2 and blank(m.get("content"))
    return m.get("from") == "system" and blank(m.get("value"))


def check_prompt(msgs: list[Msg], field: str) -> None:
    if msgs[-1]["role"] == "assistant":
        raise RowInvalid(
            f"{field}[{len(msgs) - 1}].role",
            "the prompt ends with an assistant message; its last message must be the one "
            "that chosen and rejected answer (user, system or tool)",
        )


def check_completion(msgs: list[Msg], field: str, start: int = 0) -> None:
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


def identical(chosen_field: str, rejected_field: str) -> RowInvalid:
    return RowInvalid(rejected_field, f"{chosen_field} and {rejected_field} are identical")


def split_conversations(
    chosen: list[Msg], rejected: list[Msg], cf: str, rf: str
) -> tuple[list[Msg], list[Msg], list[Msg]]:
    """Whole conversations sharing a prefix: the longest shared prefix is the prompt."""
    n = 0
    shortest = min(len(chosen), len(rejected))
    while n < shortest and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise identical(cf, rf)
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
    check_completion(chosen, cf, n)
    check_completion(rejected, rf, n)
    return chosen[:n], chosen[n:], rejected[n:]


def answer(value: object, field: str) -> list[Msg]:
    """An answer column: a text, one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": text(value, field)}]
    msgs = [message(value, field)] if isinstance(value, dict) else messages(value, field)
    check_completion(msgs, field)
    return msgs


def history(value: object, field: str) -> list[Msg]:
    """Earlier turns: ``[[prompt, answer], ...]`` pairs (LLaMA-Factory, MedicalGPT) or messages."""
    if not isinstance(value, list):
        raise RowInvalid(
            field, f"expected a list of [prompt, answer] pairs or of messages, got {kind(value)}"
        )
    if value and isinstance(value[0], dict):
        return messages(value, field, calls=False)
    out: list[Msg] = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise RowInvalid(
                f"{field}[{i}]",
                f"expected a [prompt, answer] pair, got {kind(pair)}"
                + (f" of {len(pair)}" if isinstance(pair, list | tuple) else ""),
            )
        out.append({"role": "user", "content": text(pair[0], f"{field}[{i}][0]")})
        out.append({"role": "assistant", "content": text(pair[1], f"{field}[{i}][1]")})
    return out


# -- function calling -------------------------------------------------------------------------
# OpenAI's chat rows give a row's ``tools`` (or the older ``functions``), assistant messages that
# call them (``tool_calls``, or the older ``function_call``) with ``arguments`` as a JSON string,
# and ``tool`` (older: ``function``) messages with the results. Chat templates (Qwen, Llama 3.1,
# Mistral, ...) and TRL read the Hugging Face form: ``arguments`` as an object, each tool as
# ``{"type": "function", "function": {...}}``; that is what is stored.

TOOL_COLUMNS = ("tools", "functions")
"""Where a row lists the functions its answers may call: OpenAI's names, newer first."""


def tool_calls(value: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's calls, from ``tool_calls`` or the older ``function_call``."""
    if blank(value.get("tool_calls")):  # null beside a function_call: the SDK's model_dump()
        call = _call(value["function_call"], f"{where}.function_call")
        return [{"type": "function", "function": call}]
    calls = value["tool_calls"]
    field = f"{where}.tool_calls"
    if not isinstance(calls, list) or not calls:
        raise RowInvalid(field, f"expected a non-empty list of tool calls, got {kind(calls)}")
    out = []
    for i, call in enumerate(calls):
        at = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise RowInvalid(at, f"expected a tool call object, got {kind(call)}")
        if call.get("type", "function") != "function":
            raise RowInvalid(
                f"{at}.type", f"only function calls are supported, got {short(call['type'])}"
            )
        if "function" not in call:
            raise RowInvalid(f"{at}.function", "missing field 'function' (its name and arguments)")
        made: dict[str, Any] = {
            "type": "function",
            "function": _call(call["function"], f"{at}.function"),
        }
        if "id" in call:
            if not isinstance(call["id"], str):
                raise RowInvalid(f"{at}.id", f"expected a string, got {kind(call['id'])}")
            made["id"] = call["id"]
        out.append(made)
    return out


def _call(value: object, field: str) -> dict[str, Any]:
    """``{name, arguments}`` with the arguments as an object (OpenAI sends a JSON string)."""
    if not isinstance(value, dict):
        raise RowInvalid(field, f"expected an object with name and arguments, got {kind(value)}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowInvalid(f"{field}.name", f"expected the function's name, got {short(name)}")
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's stack
            why = exc if isinstance(exc, ValueError) else "nested too deeply"
            raise RowInvalid(
                f"{field}.arguments", f"expected a JSON object in a string, got invalid JSON: {why}"
            ) from None
    if not isinstance(arguments, dict):
        raise RowInvalid(f"{field}.arguments", f"expected a JSON object, got {kind(arguments)}")
    return {"name": name, "arguments": arguments}


def tools(value: object, column: str, within: str = "") -> list[dict[str, Any]]:
    """A row's functions as ``{"type": "function", "function": {name, ...}}``; the older
    ``functions`` column lists the functions themselves, as some ``tools`` columns do.
    `within`: where the column is, as errors name it."""
    if not isinstance(value, list):
        raise RowInvalid(within + column, f"expected a list of tools, got {kind(value)}")
    out = []
    for i, tool in enumerate(value):
        at = f"{within}{column}[{i}]"
        if not isinstance(tool, dict):
            raise RowInvalid(at, f"expected a tool object, got {kind(tool)}")
        bare = column == "functions" or ("type" not in tool and "name" in tool)
        if bare:
            tool = {"type": "function", "function": tool}
        elif tool.get("type") != "function":
            got = short(tool.get("type"))
            raise RowInvalid(f"{at}.type", f"only function tools are supported, got {got}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RowInvalid(f"{at}.function", f"expected an object, got {kind(function)}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            where = at if bare else f"{at}.function"
            raise RowInvalid(f"{where}.name", f"expected the function's name, got {short(name)}")
        if not isinstance(function.get("parameters", {}), dict):
            where = at if bare else f"{at}.function"
            raise RowInvalid(f"{where}.parameters", "expected a JSON Schema object")
        out.append({"type": "function", "function": function})
    return out


def add_tools(obj: dict[str, Any], row: dict[str, Any], used: set[str], within: str = "") -> None:
    """A row's functions (``tools``, or OpenAI's older ``functions``; `within`: the object
    they are in, as errors name it), kept with the row for the chat template;
    ``parallel_tool_calls`` says nothing training needs. TRL's tools as a JSON string are
    read; LLaMA-Factory's (a JSON string of bare functions, its calls plain text) is left
    out, for the caller to name in a warning."""
    used.add("parallel_tool_calls")
    for column in TOOL_COLUMNS:
        if column not in obj:
            continue
        value = obj[column]
        if isinstance(value, str) and (value := _typed_tools(value)) is None:
            continue
        used.add(column)
        if not blank(value):  # "tools": null beside "functions": the functions
            row["tools"] = tools(value, column, within)
            return


def _typed_tools(text_: str) -> list[Any] | None:
    """Tools given as a JSON string (TRL's form, which keeps Arrow from merging their
    shapes), if each is ``{"type": "function", ...}``; None for any other string."""
    try:
        value = json.loads(text_)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list) and all(
        isinstance(t, dict) and t.get("type") == "function" for t in value
    ):
        return value
    return None
