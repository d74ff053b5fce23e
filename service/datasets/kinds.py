"""SFT and unpaired rows: told apart from preference rows, checked, normalized and counted.

A dataset holds one kind of row (:data:`service.contract.DatasetKind`). Preference rows go
through :mod:`service.datasets.collect`; the two other kinds through :class:`KindCollector`
here, which keeps the same interface (lines, decoded objects, ``finish``) and the same
rules: the first errors kept and all counted, nothing stored unless the whole file passes
(or ``on_invalid=skip`` leaves out a few), duplicates and unused columns named in warnings.

Canonical rows, one JSON object a line:

- sft: ``{"prompt": str, "completion": str}`` or the same with lists of ``{role, content}``
  messages; a chat (``messages``, OpenAI's chat fine-tuning JSONL) becomes the messages
  before its last assistant turn and that turn, its earlier answers marked ``"weight": 1``
  in the prompt: trained as well, as OpenAI, LLaMA-Factory and Axolotl train every answer
  of a chat (so are the answers of a ``history`` column). A prompt given as a prompt is
  context only, as in TRL, but for answers it marks so (rows stored here, uploaded again);
- unpaired: the same plus ``"label": true|false`` (a good or a bad completion).
"""

from __future__ import annotations

from typing import Any

import msgspec

from service.contract import (
    Container,
    DatasetKind,
    DatasetStats,
    DatasetWarning,
    FieldMapping,
    Format,
    OnInvalid,
    SourceFormat,
    uses_functions,
)
from service.datasets.canonical import decode_error
from service.datasets.collect import (
    MAX_COLUMNS,
    ErrorTally,
    IngestResult,
    Limits,
    made_conversational,
)
from service.datasets.containers import Lines
from service.datasets.layouts import (
    CHOSEN_COLUMNS,
    DEFAULT_MAPPING,
    REJECTED_COLUMNS,
    alpaca_prompt,
    preamble,
    system_column,
)
from service.datasets.layouts import normalize as preference_row
from service.datasets.messages import (
    Msg,
    RowInvalid,
    add_tools,
    answer,
    blank,
    check_completion,
    check_prompt,
    kind,
    mark_trained,
    messages,
    noting_dropped,
    text,
)
from service.datasets.output import Output, Sink
from service.datasets.stats import (
    WARNING_LINES,
    HashSet,
    Lengths,
    Tally,
    column_warnings,
    row_warnings,
)

_PREFERENCE_KEYS = frozenset(
    ("chosen", "rejected", "preferred_output", "non_preferred_output", "chosen_response")
)
_MAX_HELD = 512


_LABELS = frozenset(("label", "kto_tag"))
"""Where a row says whether its answer is good: ours (TRL's), LLaMA-Factory's KTO column."""
HEAD_ROWS = 16
"""Rows a file's kind is told from: its first rows that can be read (one cut short, or a kto
row that lacks its label, does not decide alone)."""


def detect_kind(rows: list[Any], mapping: FieldMapping | None) -> DatasetKind:
    """The kind a file's first readable rows are: the mapping decides if it names one."""
    if mapping is not None and mapping.kind() != "preference":
        return mapping.kind()
    first = rows[0] if rows else None
    if not isinstance(first, dict) or _PREFERENCE_KEYS & first.keys():
        return "preference"
    # LLaMA-Factory's forms only unmapped: a mapping names the preference columns
    llama = mapping is None and (
        isinstance(first.get("conversations"), list)
        or ("instruction" in first and isinstance(first.get("output"), str))
    )
    if "completion" in first or isinstance(first.get("messages"), list) or llama:
        labelled = any(isinstance(r, dict) and _LABELS & r.keys() for r in rows)
        return "unpaired" if labelled else "sft"
    return "preference"


Source = tuple[SourceFormat, dict[str, str]]
"""A row's layout and its parts' columns (`{"messages": "conversations"}`)."""


def normalize(
    obj: object, kind_: DatasetKind, mapping: FieldMapping | None, *, chosen: bool = False
) -> tuple[dict[str, Any], set[str], Source | None]:
    """One sft or unpaired row in canonical form, and the columns it used (the others are
    named as ignored), and the layout it was read in (None: read column by column, its
    format says which); RowInvalid names the field at fault. `chosen`: the mapping
    asks for a preference row's chosen answers (:func:`_chosen_answers_asked`)."""
    if not isinstance(obj, dict):
        raise RowInvalid(None, f"expected a JSON object, got {kind(obj)}")
    if chosen and _has_rejected(obj):
        try:
            return (*_chosen_answers(obj), None)  # its source: _chosen_source, once
        except RowInvalid as exc:  # a row the plain reading takes (e.g. equal answers) still is
            try:
                return _plain(obj, kind_, mapping)
            except RowInvalid:
                raise exc from None
    return _plain(obj, kind_, mapping)


def _plain(
    obj: dict[str, Any], kind_: DatasetKind, mapping: FieldMapping | None
) -> tuple[dict[str, Any], set[str], Source | None]:
    """A row read column by column: a prompt and a completion (or a chat), as mapped."""
    m = mapping or DEFAULT_MAPPING
    messages_field = m.messages_field or (
        "conversations" if mapping is None and "messages" not in obj else "messages"
    )
    completion_field = m.completion_field or "completion"
    used: set[str] = set()
    source: Source | None = None
    history_field = m.history_field if m.history_field in obj else None
    if completion_field not in obj and isinstance(obj.get(messages_field), list):
        # OpenAI's chats, ShareGPT's
        chat = obj[messages_field]
        row = _chat(chat, messages_field, sft=kind_ == "sft")
        used.add(messages_field)
        sharegpt = any(isinstance(m, dict) and "from" in m for m in chat)
        source = ("sharegpt" if sharegpt else "openai", {"messages": messages_field})
    elif mapping is None and "instruction" in obj and "output" in obj and "prompt" not in obj:
        # LLaMA-Factory's alpaca form: instruction, then input; output; history, system
        prompt, _ = alpaca_prompt(obj, used)
        row = _pair(prompt, obj["output"], "instruction", "output")
        used.add("output")
        history_field = "history" if "history" in obj else None
        source = ("alpaca", {"prompt": "instruction", "completion": "output"})
    else:
        if m.prompt_field not in obj:
            raise RowInvalid(m.prompt_field, f"missing field {m.prompt_field!r}")
        if completion_field not in obj:
            raise RowInvalid(completion_field, f"missing field {completion_field!r}")
        row = _pair(obj[m.prompt_field], obj[completion_field], m.prompt_field, completion_field)
        used.update((m.prompt_field, completion_field))
        if isinstance(row["prompt"], list) and kind_ == "sft":  # stored rows read back as is
            row["prompt"] = _marked(obj[m.prompt_field], row["prompt"], m.prompt_field)
    add_tools(obj, row, used)
    if "tools" in row and isinstance(row["prompt"], str):  # only a chat can list functions
        row = as_conversation(row)
    system_field = m.system_field or system_column(obj)
    if system_field in obj or history_field is not None:
        # A row with a system column is a conversation, even where the column is blank: a
        # file's rows must all be texts or all conversations.
        if isinstance(row["prompt"], str):
            row = as_conversation(row)
        row["prompt"] = preamble(
            obj, row["prompt"], system_field, history_field, used, train_history=kind_ == "sft"
        )
    if kind_ == "unpaired":
        label_field = m.label_field or ("kto_tag" if "kto_tag" in obj else "label")
        used.add(label_field)
        if label_field not in obj:
            raise RowInvalid(label_field, f"missing field {label_field!r} (true or false)")
        row["label"] = _label(obj[label_field], label_field)
        if source is not None:
            source[1]["label"] = label_field
    return row, used, source if mapping is None else None


_ANSWERS = frozenset((*CHOSEN_COLUMNS, "preferred_output"))


def _chosen_answers_asked(kind_: DatasetKind, mapping: FieldMapping | None) -> bool:
    """`completion_field=chosen` (or the layout's own name of the chosen answer) and nothing
    else: sft on the chosen answers of a preference file, whatever its layout."""
    return (
        kind_ == "sft"
        and mapping is not None
        and mapping.completion_field in _ANSWERS
        and mapping == FieldMapping(completion_field=mapping.completion_field)
    )


def _has_rejected(obj: dict[str, Any]) -> bool:
    """Whether a row holds a rejected answer beside its chosen one: a preference row."""
    return any(c in obj for c in (*REJECTED_COLUMNS, "non_preferred_output")) or (
        isinstance(obj.get("output"), list)
    )


def _chosen_answers(obj: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The prompt and chosen answer of a preference row, read as a preference upload reads
    it (HH transcripts, implicit prompts, OpenAI's rows, system and history columns...); its
    rejected answer is left out, and so named in a warning."""
    norm = preference_row(obj)
    rejected = norm.mapping.get("rejected")
    used = {k for k in obj if k not in norm.ignored and k != rejected}
    row = {"prompt": norm.row["prompt"], "completion": norm.row["chosen"]}
    if "tools" in norm.row:
        row["tools"] = norm.row["tools"]
    return row, used


def _chosen_source(obj: dict[str, Any]) -> Source | None:
    """The layout of a row read for its chosen answer, and its parts' columns (the chosen
    answer as the completion); None for a row read column by column."""
    if not _has_rejected(obj):
        return None
    try:
        norm = preference_row(obj)
    except RowInvalid:
        return None
    parts = {("completion" if k == "chosen" else k): v for k, v in norm.mapping.items()}
    parts.pop("rejected", None)
    return norm.layout, parts


def _pair(prompt: object, completion: object, pf: str, cf: str) -> dict[str, Any]:
    """A prompt and its answer, function calls kept."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            got = kind(completion)
            raise RowInvalid(cf, f"expected a string (the {pf} is a string), got {got}")
        p, c = text(prompt, pf), text(completion, cf)
        return {"prompt": p, "completion": c}
    msgs = messages(prompt, pf)
    check_prompt(msgs, pf)
    done = answer(completion, cf)
    check_completion(done, cf)
    return {"prompt": msgs, "completion": done}


def _chat(value: list[Any], field: str, *, sft: bool) -> dict[str, Any]:
    """A whole chat: the messages before its last assistant turn to train on (OpenAI's
    ``weight`` 0 marks one not to), and that turn; what follows a weight-0 answer is left out.
    `sft`: the answers before it that are trained on too are marked in the prompt (a kto
    label is about the last answer alone)."""
    msgs: list[Msg] = messages(value, field)
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    answered = [i for i in answers if _weight(value[i], f"{field}[{i}]")]
    last = max(answered, default=-1)
    if last <= 0:
        why = "every assistant message has weight 0" if answers and not answered else None
        raise RowInvalid(
            field,
            f"{why}: nothing to train on"
            if why
            else "a chat needs an assistant message after at least one other message",
        )
    # What follows the last answer trained (a tool's result, a weight-0 answer) trains nothing.
    prompt, completion = msgs[:last], msgs[last : last + 1]
    check_prompt(prompt, field)
    check_completion(completion, field, 0)
    if sft:
        prompt = mark_trained(prompt, answered[:-1])
    return {"prompt": prompt, "completion": completion}


def _marked(source: list[Any], msgs: list[Msg], field: str) -> list[Msg]:
    """An sft prompt given as messages keeps the answers it marks ``"weight": 1`` (rows this
    service stored, downloaded and uploaded again); the others are context, as in TRL."""
    return mark_trained(
        msgs,
        (
            i
            for i, m in enumerate(source)
            if isinstance(m, dict) and "weight" in m and _weight(m, f"{field}[{i}]")
        ),
    )


def _weight(message: Any, where: str) -> bool:
    """Whether an assistant message is trained on: OpenAI's ``weight``, 1 when left out. ShareGPT
    sets (SlimOrca, OpenHermes) write it as a float on every turn, null where it has none."""
    weight = message.get("weight") if isinstance(message, dict) else None
    if weight is None:
        return True
    if weight not in (0, 1) or isinstance(weight, bool):
        raise RowInvalid(f"{where}.weight", f"expected 0 or 1, got {kind(weight)} {weight!r}")
    return bool(weight)


def _label(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1) and isinstance(value, int):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # CSV has no booleans
    raise RowInvalid(field, f"expected true or false, got {kind(value)} {value!r}")


def as_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A text row as the conversation it stands for: one user message, one answer."""
    return {
        **row,
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "completion": [{"role": "assistant", "content": row["completion"]}],
    }


def _chars(msgs: list[Msg]) -> int:
    """Characters of the messages, a function call's as its JSON."""
    return sum(
        len(m["content"]) + (len(msgspec.json.encode(m["tool_calls"])) if "tool_calls" in m else 0)
        for m in msgs
    )


def _row_hash(row: dict[str, Any], data: bytes) -> int:
    """A text row and the one-turn conversation it would become hash alike, so a row repeated
    across a file's switch from texts to conversations is a duplicate; else the encoding's."""
    prompt, completion, label = row["prompt"], row["completion"], row.get("label")
    if isinstance(prompt, str):
        return hash((prompt, completion, label))
    if (
        "tools" not in row
        and len(prompt) == len(completion) == 1
        and prompt[0].keys() == completion[0].keys() == {"role", "content"}
        and prompt[0]["role"] == "user"
        and completion[0]["role"] == "assistant"
    ):
        return hash((prompt[0]["content"], completion[0]["content"], label))
    return hash(data)


class KindCollector:
    """The state of one validation of sft or unpaired rows (see the module's docstring)."""

    def __init__(
        self,
        dst: Sink,
        *,
        kind: DatasetKind,
        mapping: FieldMapping | None,
        limits: Limits,
        on_invalid: OnInvalid,
        max_invalid_fraction: float,
    ) -> None:
        self.kind = kind
        self.mapping = mapping
        self.chosen = _chosen_answers_asked(kind, mapping)
        self.source: Source | None = None
        """The layout of the rows (a preference layout read for `completion_field=chosen`,
        LLaMA-Factory's, ShareGPT's, OpenAI's chats), and where each part of the row came
        from, told from the first valid row; None: read column by column."""
        self.told = False
        self.limits = limits
        self.skip = on_invalid == "skip"
        self.max_invalid_fraction = max_invalid_fraction
        self.errors = ErrorTally(limits.max_errors)
        self.output = Output(dst)
        self.encode = msgspec.json.Encoder().encode
        self.lengths = Lengths()
        self.seen = HashSet(limits.max_tracked_rows)
        self.duplicate, self.long_row = Tally(), Tally()
        self.ignored: dict[str, Tally] = {}
        self.fmt: Format | None = None
        self.records = 0
        self.functions = False
        self.desirable = 0
        self.stopped = False
        self.held: list[tuple[int, dict[str, Any]]] = []
        self.standard_rows = 0
        """Text rows written before the first conversation, rewritten as ones at the end."""
        self.converted = Tally()

    def fatal(self, line: int, msg: str) -> None:
        self.errors.stop(line, msg)
        self.stopped = True

    def add_block(self, first: int, block: Lines, *, file_start: bool) -> None:
        for i, raw in enumerate(block.lines):
            if self.stopped:
                return
            line = first + i
            if raw is None:
                if self._record(line):
                    self.errors.add(
                        line, None, f"line {line} is longer than {self.limits.max_line_bytes} bytes"
                    )
                continue
            if file_start and i == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw or raw.isspace():
                continue
            if not self._record(line):
                return
            try:
                obj = msgspec.json.decode(raw)
            except (msgspec.MsgspecError, UnicodeDecodeError) as e:
                self.errors.add(line, None, decode_error(raw, line, e))
                continue
            self._row(line, obj)

    def add_invalid(self, line: int, field: str | None, msg: str) -> None:
        """A row that could not be read, numbered ``line``."""
        if self._record(line):
            self.errors.add(line, field, msg)

    def add_object(self, line: int, obj: Any) -> None:
        if self._record(line):
            self._row(line, obj)

    def _record(self, line: int) -> bool:
        self.records += 1
        if self.records > self.limits.max_rows:
            self.fatal(line, f"the dataset has more than {self.limits.max_rows} rows (the limit)")
            return False
        return True

    def _row(self, line: int, obj: Any) -> None:
        try:
            with noting_dropped() as dropped:
                row, own, source = normalize(obj, self.kind, self.mapping, chosen=self.chosen)
        except RowInvalid as e:
            self.errors.add(line, e.field, e.msg)
            return
        if not self.told:
            self.source, self.told = source or _chosen_source(obj), True
        self.functions = self.functions or uses_functions(row)
        fmt: Format = "standard" if isinstance(row["prompt"], str) else "conversational"
        if self.fmt is None:
            self.fmt = fmt
        elif fmt != self.fmt:
            # Texts and conversations in one file (a system column in some rows only): the
            # dataset is a conversation, and a text row reads as one user turn and one answer.
            if fmt == "standard":
                row = as_conversation(row)
                self.converted.add(line)
            else:
                self._drain()
                self.fmt, self.standard_rows = "conversational", self.output.rows
        if (
            fmt == "standard"
            and self.fmt == "standard"
            and len(self.converted.lines) < WARNING_LINES
        ):
            self.converted.lines.append(line)  # the first text rows, in case they turn
        for name in obj:
            if name in own:  # what this row read; a chat's unused prompt column is named too
                continue
            if not blank(obj[name]) and len(self.ignored) < MAX_COLUMNS:
                self.ignored.setdefault(name, Tally()).add(line)
        for name in sorted(dropped):  # a message's field: `messages[].reasoning_content`
            if name in self.ignored or len(self.ignored) < MAX_COLUMNS:
                self.ignored.setdefault(name, Tally()).add(line)
        self.held.append((line, row))
        if len(self.held) >= _MAX_HELD:
            self._drain()

    def _drain(self) -> None:
        if not self.held:
            return
        datas = [self.encode(row) for _, row in self.held]
        lines = [line for line, _ in self.held]
        self.output.write(datas)
        rows = [row for _, row in self.held]
        for i in self.seen.add_many(map(_row_hash, rows, datas)):
            self.duplicate.add(lines[i])
        size = len if self.fmt == "standard" else _chars
        ps = [size(row["prompt"]) for _, row in self.held]
        cs = [size(row["completion"]) for _, row in self.held]
        self.lengths.add_many(ps, cs, [0] * len(ps))
        for line, p, c in zip(lines, ps, cs, strict=True):
            if p + c > self.limits.long_row_chars:
                self.long_row.add(line)
        self.desirable += sum(bool(row.get("label")) for _, row in self.held)
        self.held = []

    def finish(self, source_bytes: int, container: Container, compressed: bool) -> IngestResult:
        self._drain()
        errors, invalid = self.errors, self.errors.total
        if not errors.fatal and self.output.rows == 0 and not invalid:
            self.fatal(0, "the dataset has no rows")
        errors.verdict(
            kept=self.output.rows,
            records=self.records,
            skip=self.skip,
            max_invalid_fraction=self.max_invalid_fraction,
            container=container,
        )
        self.output.flush()
        assert self.fmt is not None
        warnings = row_warnings(
            self.duplicate, self.seen, self.long_row, Tally(), self.limits.long_row_chars
        )
        if self.standard_rows:
            decode, encode = msgspec.json.decode, self.encode
            self.output.rewrite_as_conversations(
                self.standard_rows, lambda line: encode(as_conversation(decode(line)))
            )
        if self.fmt == "conversational":
            warnings += made_conversational(self.standard_rows, self.converted)
        warnings += column_warnings(self.ignored, mapped=self.mapping is not None)
        if self.kind == "unpaired" and self.desirable in (0, self.output.rows):
            side = "true" if self.desirable else "false"
            warnings.append(
                DatasetWarning(
                    kind="one_label",
                    msg=f"every row is labelled {side}: KTO learns most from both good and bad "
                    "completions",
                    count=self.output.rows,
                    lines=[],
                )
            )
        summary = self.lengths.stats()
        return IngestResult(
            rows=self.output.rows,
            bytes=self.output.written,
            source_bytes=source_bytes,
            sha256=self.output.sha.hexdigest(),
            format=self.fmt,
            kind=self.kind,
            source_format=self.source[0]
            if self.source
            else "mapped"
            if self.mapping is not None
            else self.fmt,
            mapping=self.source[1] if self.source else {},
            functions=self.functions,
            stats=DatasetStats(
                prompt_chars=summary.prompt_chars,
                completion_chars=summary.chosen_chars,
                desirable_rows=self.desirable if self.kind == "unpaired" else None,
            ),
            warnings=warnings,
            container=container,
            compressed=compressed,
            skipped_rows=invalid,
            skipped=errors.items if invalid else [],
        )
