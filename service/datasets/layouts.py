"""Preference rows in the layouts their publishers ship, told apart by their columns and
normalized to canonical rows (README, "Dataset formats").

Each row is read on its own, so a file may mix layouts that normalize to the same format.
What a row holds beyond what its layout uses is named in ``Normalized.ignored`` (non-empty
columns only), so the caller can warn instead of dropping it silently. A text prompt stays a
standard row unless the row has a system or history column, or its answers are messages:
then the row becomes a conversation, because only a conversation can hold a system message
and earlier turns.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from service.contract import FieldMapping, SourceFormat
from service.datasets.messages import (
    Msg,
    RowInvalid,
    add_tools,
    answer,
    blank,
    check_completion,
    check_prompt,
    history,
    identical,
    kind,
    mark_trained,
    messages,
    short,
    split_conversations,
    text,
)

DEFAULT_MAPPING = FieldMapping()

CHOSEN_COLUMNS = ("chosen", "chosen_response", "response_chosen")
REJECTED_COLUMNS = ("rejected", "rejected_response", "response_rejected")
SYSTEM_COLUMNS = ("system", "system_prompt", "system_message")
CONVERSATION_COLUMNS = ("conversations", "messages")
PROMPT_LIKE = frozenset((*SYSTEM_COLUMNS, "instruction", "input", "history", "context"))
"""Columns whose text belongs in the prompt: a mapping that leaves one unused gets a warning."""
_PROMPT_HOLDERS = ("instruction", "question", "query", "input", "messages", "conversations")
"""Columns that hold a row's prompt in the layouts we read: a mapping with no prompt column
must not split chosen and rejected for one (they share only a first letter or word)."""

_OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_START = ("Human:", "\n\nHuman:")


class Normalized(NamedTuple):
    row: dict[str, Any]
    """The canonical row: prompt, chosen and rejected, texts or lists of messages."""
    layout: SourceFormat
    mapping: dict[str, str]
    """Where each part of the row came from."""
    ignored: list[str]
    """Non-empty columns of the row that went nowhere."""


def _first(obj: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in obj:
            return name
    return None


def system_column(obj: dict[str, Any]) -> str | None:
    """The row's system column: the first of SYSTEM_COLUMNS that holds text, else the first
    present (a blank one still makes the row a conversation)."""
    present = [c for c in SYSTEM_COLUMNS if c in obj]
    return next((c for c in present if not blank(obj[c])), None) or next(iter(present), None)


def _ignored(obj: dict[str, Any], used: set[str]) -> list[str]:
    return [k for k, v in obj.items() if k not in used and not blank(v)]


def _missing(field: str, obj: dict[str, Any], hint: str) -> RowInvalid:
    keys = ", ".join(short(k, 30) for k in list(obj)[:10]) or "none"
    if (wrapped := _wrapped_rows(obj)) is not None:
        hint = (
            f"; this looks like a whole file of rows under {wrapped!r} (one JSON object): "
            f"upload those rows instead, one per line or as a JSON array (jq -c '.{wrapped}[]' "
            "FILE > rows.jsonl)"
        )
    return RowInvalid(field, f"missing field {field!r} (the row has: {keys}){hint}")


def _wrapped_rows(obj: dict[str, Any]) -> str | None:
    """The key of an object that only wraps a list of rows (`{"data": [{...}, ...]}`, as some
    exports write a whole dataset), or None."""
    if len(obj) != 1:
        return None
    ((key, value),) = obj.items()
    rows = isinstance(value, list) and value and all(isinstance(v, dict) for v in value[:3])
    return key if rows and key not in CONVERSATION_COLUMNS else None


def preamble(
    obj: dict[str, Any],
    shared: list[Msg],
    system_col: str | None,
    history_col: str | None,
    used: set[str],
    *,
    train_history: bool = False,
) -> list[Msg]:
    """The prompt with the row's system column and earlier turns put in front of it.

    A conversation that already opens with a system message keeps it (as LLaMA-Factory does);
    the column then counts as unused, so the caller warns about it. `train_history`: the
    history's answers are marked ``"weight": 1`` (an sft row trains on them, as LLaMA-Factory does).
    """
    own = shared[0]["role"] == "system"
    head, rest = (shared[:1], shared[1:]) if own else ([], shared)
    if system_col is not None:
        value = obj.get(system_col)
        if blank(value):
            used.add(system_col)
        elif not own:
            used.add(system_col)
            head = [{"role": "system", "content": text(value, system_col)}]
    if history_col is not None:
        used.add(history_col)
        if not blank(obj.get(history_col)):
            turns = history(obj[history_col], history_col)
            if train_history:
                start = len(head)
                head = mark_trained(head + turns, range(start, start + len(turns)))
            else:
                head = head + turns
    return head + rest if head else shared


def _texts(chosen: object, rejected: object, cf: str, rf: str, pf: str) -> tuple[str, str]:
    c, r = text(chosen, cf, pf), text(rejected, rf, pf)
    if c == r:
        raise identical(cf, rf)
    return c, r


def _answers(chosen: object, rejected: object, cf: str, rf: str) -> tuple[list[Msg], list[Msg]]:
    c, r = answer(chosen, cf), answer(rejected, rf)
    if c == r:
        raise identical(cf, rf)
    return c, r


def _text_prompt(
    obj: dict[str, Any],
    prompt: str,
    cols: tuple[str, str, str, str | None, str | None],
    chosen: object,
    rejected: object,
    used: set[str],
    *,
    strict: bool,
) -> dict[str, Any]:
    """A text prompt with text (or message) answers; a conversation if the row needs one.

    ``strict`` (plain prompt/chosen/rejected rows) keeps answers texts, as the standard
    format has them, and says so when they are not.
    """
    pf, cf, rf, system_col, history_col = cols
    chat = system_col is not None or history_col is not None
    if not chat and (strict or (isinstance(chosen, str) and isinstance(rejected, str))):
        c, r = _texts(chosen, rejected, cf, rf, pf)
        return {"prompt": prompt, "chosen": c, "rejected": r}
    shared = [{"role": "user", "content": prompt}]
    msgs = preamble(obj, shared, system_col, history_col, used)
    cm, rm = _answers(chosen, rejected, cf, rf)
    return {"prompt": msgs, "chosen": cm, "rejected": rm}


def _prompt_and_conversations(
    obj: dict[str, Any],
    prompt: str,
    cols: tuple[str, str, str, str | None, str | None],
    chosen: object,
    rejected: object,
    used: set[str],
) -> dict[str, Any]:
    """UltraFeedback / Argilla: a prompt column and whole conversations that start with it."""
    pf, cf, rf, system_col, history_col = cols
    c, r = messages(chosen, cf, pf), messages(rejected, rf, pf)
    if c[0]["role"] == "assistant" and r[0]["role"] == "assistant":
        check_completion(c, cf)
        check_completion(r, rf)
        if c == r:
            raise identical(cf, rf)
        shared: list[Msg] = [{"role": "user", "content": prompt}]
    else:
        shared, c, r = split_conversations(c, r, cf, rf)
        last = next((m["content"] for m in reversed(shared) if m["role"] == "user"), None)
        if last is None or last.strip() != prompt.strip():
            raise RowInvalid(
                pf,
                f"the {pf} is not the last user message of the conversation {cf} and {rf} "
                f"share ({short(last)}): which one is the prompt?",
            )
    msgs = preamble(obj, shared, system_col, history_col, used)
    return {"prompt": msgs, "chosen": c, "rejected": r}


def _hh_turns(value: str, field: str) -> list[Msg]:
    """The turns of an Anthropic HH transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``)."""
    body = value if value.startswith("\n\n") else "\n\n" + value.lstrip()
    parts = _HH_TURN.split(body)
    if parts[0].strip():
        raise RowInvalid(
            field,
            "expected an HH transcript like the other answer's ('\\n\\nHuman: ...\\n\\n"
            "Assistant: ...'), got text before the first 'Human:'",
        )
    turns = len(parts) // 2
    out: list[Msg] = []
    for i in range(turns):
        speaker, said = parts[2 * i + 1], parts[2 * i + 2]
        if not said or said.isspace():
            if i == turns - 1 and speaker == "Assistant":
                raise RowInvalid(field, "the transcript's final Assistant answer is empty")
            raise RowInvalid(field, f"turn {i + 1} ({speaker}) of the transcript is empty")
        out.append({"role": "user" if speaker == "Human" else "assistant", "content": said})
    return out


def _hh(chosen: str, rejected: str, cf: str, rf: str) -> dict[str, Any]:
    c, r = _hh_turns(chosen, cf), _hh_turns(rejected, rf)
    try:
        prompt, cm, rm = split_conversations(c, r, cf, rf)
    except RowInvalid as e:
        field = (e.field or cf).split("[")[0]
        raise RowInvalid(field, f"{e.msg} (counting the turns of the HH transcripts)") from None
    return {"prompt": prompt, "chosen": cm, "rejected": rm}


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by halving (slice comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _implicit_text(chosen: object, rejected: object, cf: str, rf: str) -> dict[str, Any]:
    """TRL's implicit prompt for texts: the longest common prefix, minus a final space
    (which stays with the answers, as ``trl.extract_prompt`` does)."""
    c, r = text(chosen, cf), text(rejected, rf)
    if c == r:
        raise identical(cf, rf)
    n = _common_prefix(c, r)
    if n == min(len(c), len(r)):
        field = cf if n == len(c) else rf
        raise RowInvalid(
            field, f"{field} is the start of the other answer: nothing is left as its answer"
        )
    if n and c[n - 1] == " ":
        n -= 1
    if not c[:n].strip():
        raise RowInvalid(
            cf,
            f"without a prompt field, {cf} and {rf} must start with the same prompt; "
            "these differ from the first character",
        )
    return {"prompt": c[:n], "chosen": c[n:], "rejected": r[n:]}


def _openai(obj: dict[str, Any]) -> Normalized:
    for key in _OPENAI_KEYS:
        if key not in obj:
            raise RowInvalid(key, f"missing field {key!r} (OpenAI DPO format)")
    inp = obj["input"]
    if not isinstance(inp, dict):
        raise RowInvalid("input", f"expected an object with 'messages', got {kind(inp)}")
    if "messages" not in inp:
        raise RowInvalid("input.messages", "missing field 'messages'")
    prompt = messages(inp["messages"], "input.messages")
    check_prompt(prompt, "input.messages")
    chosen = messages(obj["preferred_output"], "preferred_output")
    check_completion(chosen, "preferred_output")
    rejected = messages(obj["non_preferred_output"], "non_preferred_output")
    check_completion(rejected, "non_preferred_output")
    if chosen == rejected:
        raise identical("preferred_output", "non_preferred_output")
    ignored = _ignored(obj, set(_OPENAI_KEYS))
    ignored += [f"input.{k}" for k, v in inp.items() if k != "messages" and not blank(v)]
    return Normalized(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        "openai",
        {
            "prompt": "input.messages",
            "chosen": "preferred_output",
            "rejected": "non_preferred_output",
        },
        ignored,
    )


def _describe(
    prompt: str, cf: str, rf: str, system_col: str | None, history_col: str | None
) -> dict[str, str]:
    mapping = {"prompt": prompt, "chosen": cf, "rejected": rf}
    if system_col is not None:
        mapping["system"] = system_col
    if history_col is not None:
        mapping["history"] = history_col
    return mapping


def _without_prompt(
    obj: dict[str, Any], cf: str, rf: str, system_col: str | None, used: set[str], mapped: bool
) -> tuple[dict[str, Any], SourceFormat, str]:
    """Rows whose prompt is inside chosen and rejected: TRL's implicit prompt or HH."""
    chosen, rejected = obj[cf], obj[rf]
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = messages(chosen, cf), messages(rejected, rf)
        shared, cm, rm = split_conversations(c, r, cf, rf)
        msgs = preamble(obj, shared, system_col, None, used)
        row: dict[str, Any] = {"prompt": msgs, "chosen": cm, "rejected": rm}
        return row, "mapped" if mapped else "implicit_prompt", f"shared start of {cf} and {rf}"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen.lstrip().startswith(_HH_START) or rejected.lstrip().startswith(_HH_START):
            row = _hh(chosen, rejected, cf, rf)
            row["prompt"] = preamble(obj, row["prompt"], system_col, None, used)
            return row, "mapped" if mapped else "hh", f"shared turns of {cf} and {rf} (HH)"
        row = _implicit_text(chosen, rejected, cf, rf)
        if system_col is not None:
            row = {
                "prompt": preamble(
                    obj, [{"role": "user", "content": row["prompt"]}], system_col, None, used
                ),
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        return row, "mapped" if mapped else "implicit_prompt", f"shared start of {cf} and {rf}"
    raise RowInvalid(
        cf,
        f"without a prompt field, {cf} and {rf} must both be texts or both be whole "
        f"conversations (lists of messages) that start with the prompt; got {kind(chosen)} "
        f"and {kind(rejected)}",
    )


def _with_prompt(
    obj: dict[str, Any],
    pf: str,
    cf: str,
    rf: str,
    system_col: str | None,
    history_col: str | None,
    used: set[str],
) -> tuple[dict[str, Any], bool]:
    """Rows with a prompt column (text or messages); True when it was UltraFeedback-style."""
    prompt, chosen, rejected = obj[pf], obj[cf], obj[rf]
    cols = (pf, cf, rf, system_col, history_col)
    if isinstance(prompt, str):
        p = text(prompt, pf)
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _prompt_and_conversations(obj, p, cols, chosen, rejected, used), True
        return _text_prompt(obj, p, cols, chosen, rejected, used, strict=True), False
    if isinstance(prompt, list):
        msgs = preamble(obj, messages(prompt, pf), system_col, history_col, used)
        check_prompt(msgs, pf)
        c, r = messages(chosen, cf, pf), messages(rejected, rf, pf)
        check_completion(c, cf)
        check_completion(r, rf)
        if c == r:
            raise identical(cf, rf)
        return {"prompt": msgs, "chosen": c, "rejected": r}, False
    raise RowInvalid(pf, f"expected a string or a list of messages, got {kind(prompt)}")


def _mapped(obj: dict[str, Any], m: FieldMapping) -> Normalized:
    pf, cf, rf = m.prompt_field, m.chosen_field, m.rejected_field
    for field in (cf, rf):
        if field not in obj:
            raise _missing(field, obj, "")
    used = {pf, cf, rf}
    if pf in obj:
        row, _ = _with_prompt(obj, pf, cf, rf, m.system_field, m.history_field, used)
        prompt = pf
    elif pf != DEFAULT_MAPPING.prompt_field:  # named, so meant to be there
        raise _missing(
            pf,
            obj,
            " (prompt_field); leave prompt_field out if chosen and rejected "
            "hold the prompt themselves",
        )
    elif m.history_field is not None:
        raise RowInvalid(
            m.history_field,
            "history_field needs a prompt column: rows whose prompt is inside chosen and "
            "rejected hold their earlier turns there too",
        )
    else:
        for name in _PROMPT_HOLDERS:
            if not blank(obj.get(name)):
                raise RowInvalid(
                    name,
                    "the mapping names no prompt_field and the row has no 'prompt', so chosen "
                    f"and rejected would be split where they stop agreeing, but {name!r} holds "
                    f"the prompt: map it (prompt_field={name}), or leave the mapping out",
                )
        row, _, prompt = _without_prompt(obj, cf, rf, m.system_field, used, mapped=True)
    mapping = _describe(prompt, cf, rf, m.system_field, m.history_field)
    return Normalized(row, "mapped", mapping, _ignored(obj, used))


def alpaca_prompt(obj: dict[str, Any], used: set[str]) -> tuple[str, str]:
    """LLaMA-Factory's alpaca prompt: ``instruction``, then ``input`` on the next line."""
    parts, names = [], []
    for name in ("instruction", "input"):
        if name in obj:
            used.add(name)
            if not blank(obj[name]):
                parts.append(text(obj[name], name))
                names.append(name)
    if not parts:
        raise RowInvalid("instruction", "the text is empty")
    return "\n".join(parts), " + ".join(names)


def _layout(pf: str | None, cf: str, pair: bool, chat: bool) -> SourceFormat:
    if cf == "response_chosen":
        return "medicalgpt"
    if cf == "chosen_response":
        return "argilla"
    if pair or pf == "instruction":
        return "alpaca"
    if pf == "question":
        return "intel"
    if pf == "input":
        return "icr"
    return "prompt_pairs" if chat else "standard"


def normalize(obj: object, mapping: FieldMapping | None = None) -> Normalized:
    """Check one decoded row, tell its layout and return it canonical.

    Raises :class:`RowInvalid` naming the field at fault.
    """
    if not isinstance(obj, dict):
        raise RowInvalid(None, f"expected a JSON object, got {kind(obj)}")
    if mapping is not None and mapping != DEFAULT_MAPPING:
        return _with_tools(obj, _mapped(obj, mapping))
    return _with_tools(obj, _unmapped(obj))


def _with_tools(obj: dict[str, Any], norm: Normalized) -> Normalized:
    """The row with the functions it lists (OpenAI's rows list them in ``input``); a text
    row that lists some becomes a conversation, the form a chat template renders them in."""
    within = "input." if norm.layout == "openai" else ""
    source = obj["input"] if within else obj
    row = dict(norm.row)
    used: set[str] = set()
    add_tools(source, row, used, within)
    taken = {within + name for name in used}
    ignored = [name for name in norm.ignored if name not in taken]
    if "tools" in row and isinstance(row["prompt"], str):
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        for answer_ in ("chosen", "rejected"):
            row[answer_] = [{"role": "assistant", "content": row[answer_]}]
    return norm._replace(row=row, ignored=ignored)


def _unmapped(obj: dict[str, Any]) -> Normalized:
    """A row read by its column names."""
    cf = _first(obj, CHOSEN_COLUMNS)
    rf = _first(obj, REJECTED_COLUMNS)
    if cf is None and rf is None:
        if any(k in obj for k in _OPENAI_KEYS[1:]) or isinstance(obj.get("input"), dict):
            return _openai(obj)
        if isinstance(obj.get("output"), list) and ("instruction" in obj or "input" in obj):
            return _alpaca_pair(obj)
    if cf is None or rf is None:
        sft = (
            "; with no rejected answer at all, these are not preference rows: an sft upload "
            "takes prompt and completion, or a chat in messages (name other columns with "
            "completion_field or messages_field), and a kto one adds a label"
            if cf is None and rf is None
            else ""
        )
        raise _missing(
            "chosen" if cf is None else "rejected",
            obj,
            "; a row needs a chosen and a rejected answer in one of the layouts of the "
            "README's \"Dataset formats\" (prompt, chosen and rejected; OpenAI's input, "
            "preferred_output and non_preferred_output; ...); other column names need a field "
            f"mapping{sft}",
        )
    system_col = system_column(obj)
    history_col = "history" if "history" in obj else None
    used = {cf, rf}
    chat = system_col is not None or history_col is not None
    if (
        "prompt" in obj
        or "instruction" in obj
        or "question" in obj
        or isinstance(obj.get("input"), str)
    ):
        if "prompt" in obj:
            pf = prompt_name = "prompt"
            used.add(pf)
            row, ultra = _with_prompt(obj, pf, cf, rf, system_col, history_col, used)
            conversational = isinstance(obj[pf], list)
            layout: SourceFormat = (
                "ultrafeedback"
                if ultra
                else "conversational"
                if conversational
                else _layout(pf, cf, False, chat)
            )
        else:
            if "instruction" in obj:
                pf = "instruction"
                prompt, prompt_name = alpaca_prompt(obj, used)
            else:
                pf = prompt_name = "question" if "question" in obj else "input"
                used.add(pf)
                prompt = text(obj[pf], pf)
            cols = (pf, cf, rf, system_col, history_col)
            row = _text_prompt(obj, prompt, cols, obj[cf], obj[rf], used, strict=False)
            layout = _layout(pf, cf, False, chat)
        described = _describe(prompt_name, cf, rf, system_col, history_col)
        return Normalized(row, layout, described, _ignored(obj, used))
    conv = _first(obj, CONVERSATION_COLUMNS)
    if conv is not None and isinstance(obj[conv], list):
        used.add(conv)
        msgs = preamble(obj, messages(obj[conv], conv), system_col, history_col, used)
        check_prompt(msgs, conv)
        c, r = _answers(obj[cf], obj[rf], cf, rf)
        sharegpt = isinstance(obj[conv][0], dict) and "from" in obj[conv][0]
        return Normalized(
            {"prompt": msgs, "chosen": c, "rejected": r},
            "sharegpt" if sharegpt else "chat_template",
            _describe(conv, cf, rf, system_col, history_col),
            _ignored(obj, used),
        )
    row, layout, prompt_name = _without_prompt(obj, cf, rf, system_col, used, mapped=False)
    described = _describe(prompt_name, cf, rf, system_col, None)
    return Normalized(row, layout, described, _ignored(obj, used))


def _alpaca_pair(obj: dict[str, Any]) -> Normalized:
    """LLaMA-Factory's pairwise alpaca row: ``output: [chosen, rejected]``."""
    output = obj["output"]
    if len(output) != 2:
        raise RowInvalid(
            "output",
            f"a preference row's output is [chosen, rejected], got a list of {len(output)}",
        )
    used = {"output"}
    system_col = system_column(obj)
    history_col = "history" if "history" in obj else None
    prompt, prompt_name = alpaca_prompt(obj, used)
    cols = ("instruction", "output[0]", "output[1]", system_col, history_col)
    row = _text_prompt(obj, prompt, cols, output[0], output[1], used, strict=False)
    mapping = _describe(prompt_name, "output[0]", "output[1]", system_col, history_col)
    return Normalized(row, "alpaca", mapping, _ignored(obj, used))
