"""Feedback events: parse a batch and turn it into pairs (pure: no Redis)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from service.contract import EventError, FieldMapping, Format, Kind, PairRecord
from service.datasets.layouts import system_column
from service.datasets.messages import TOOL_COLUMNS, blank
from service.datasets.rows import RowInvalid, normalize_row, row_format

_encoder = msgspec.json.Encoder()

MAX_EVENT_ID = 200


_STAND_IN = "\x00stand-in\x00"


_RATING_FIELDS = FieldMapping(
    prompt_field="prompt", chosen_field="response", rejected_field=_STAND_IN
)


_EDIT_FIELDS = FieldMapping(prompt_field="prompt", chosen_field="edited", rejected_field="response")

# A `system` field makes the prompt a conversation that starts with it, as a pair's does: a
# rating under one system prompt is never paired with one under another.
_RATING_SYSTEM = msgspec.structs.replace(_RATING_FIELDS, system_field="system")
_EDIT_SYSTEM = msgspec.structs.replace(_EDIT_FIELDS, system_field="system")


class InvalidFeedback(Exception):
    """The batch was refused: the first errors (in batch order) and how many there were."""

    def __init__(self, errors: list[EventError], total: int) -> None:
        self.errors = errors
        self.total = total
        first = errors[0]
        where = f"events[{first.index}]" + (f".{first.field}" if first.field else "")
        super().__init__(
            f"{total} invalid event{'s' if total != 1 else ''} in the batch; nothing was "
            f"stored (first: {where}: {first.msg})"
        )


class ParsedEvent(msgspec.Struct, kw_only=True):
    index: int
    id: str
    kind: Kind
    format: Format
    row: dict[str, Any] | None = None
    """Pairs and edits: the canonical row."""
    prompt: Any = None
    """Ratings: the canonical prompt and response, and which way."""
    response: Any = None
    rating: Literal["up", "down"] | None = None
    tools: Any = None
    """Ratings: the functions the prompt lists, if any."""


WAYS = ("up", "down")


class Waiting(msgspec.Struct, array_like=True):
    id: str
    response: Any


class Pending(msgspec.Struct, kw_only=True):
    """The ratings of one prompt that wait for an opposite rating, oldest first."""

    prompt: Any
    up: list[Waiting] = []
    down: list[Waiting] = []
    tools: Any = None
    """The functions the prompt lists: part of what a rating is about."""


class Applied(msgspec.Struct, kw_only=True):
    pairs: list[PairRecord]
    unpaired: list[PairRecord]
    """Every new rating as an unpaired row: the response labelled true (up) or false (down)."""
    accepted: list[str]
    duplicates: int
    pending: dict[str, Pending]
    """The touched prompts' queues after the batch (empty ones are to be deleted)."""
    pending_delta: int
    waiting_from_batch: int


def _event_id(obj: dict[str, Any]) -> str:
    if "id" not in obj:
        raise RowInvalid("id", "missing field 'id' (each event needs a unique id)")
    value = obj["id"]
    if not isinstance(value, str):
        raise RowInvalid("id", f"expected a string, got {type(value).__name__}")
    if not value or value.isspace():
        raise RowInvalid("id", "the id is empty")
    if len(value) > MAX_EVENT_ID:
        raise RowInvalid("id", f"the id is longer than {MAX_EVENT_ID} characters")
    return value


def _kind(obj: dict[str, Any]) -> Kind:
    marks: list[Kind] = []
    if "rating" in obj:
        marks.append("rating")
    if "edited" in obj:
        marks.append("edit")
    if "chosen" in obj or "rejected" in obj or "preferred_output" in obj:
        marks.append("pair")
    if len(marks) > 1:
        raise RowInvalid(
            None,
            f"the event mixes the fields of a {' and a '.join(marks)}; send one kind per event",
        )
    if not marks:
        keys = ", ".join(repr(k)[:30] for k in list(obj)[:10])
        raise RowInvalid(
            None,
            "not a known event: a pair has chosen and rejected, a rating has response and "
            f"rating (up or down), an edit has response and edited (the event has: {keys})",
        )
    return marks[0]


def _need(obj: dict[str, Any], *fields: str) -> None:
    for name in fields:
        if name not in obj:
            raise RowInvalid(name, f"missing field {name!r}")


def _parse_one(obj: object, index: int) -> ParsedEvent:
    if not isinstance(obj, dict):
        raise RowInvalid(None, "expected an event object")
    event_id = _event_id(obj)
    kind = _kind(obj)
    if "system" in obj and blank(obj["system"]):
        # A client that serializes an unset system prompt as null or "" sends none: the
        # event stays in a stream of texts (a dataset's system column makes a chat instead).
        obj = {k: v for k, v in obj.items() if k != "system"}
    if kind == "pair":
        row, _ = normalize_row(obj)
        _one_system(obj, row["prompt"])
        return ParsedEvent(index=index, id=event_id, kind=kind, format=row_format(row), row=row)
    system = {"system": obj["system"]} if "system" in obj else {}
    if kind == "edit":
        _need(obj, "prompt", "response")
        row, _ = normalize_row(obj, mapping=_EDIT_FIELDS if not system else _EDIT_SYSTEM)
        _one_system(obj, row["prompt"])
        return ParsedEvent(index=index, id=event_id, kind=kind, format=row_format(row), row=row)
    _need(obj, "prompt", "response")
    rating = obj["rating"]
    if rating not in ("up", "down"):
        raise RowInvalid("rating", f"expected 'up' or 'down', got {repr(rating)[:40]}")
    response = obj["response"]
    stand_in: Any = (
        [{"role": "assistant", "content": _STAND_IN}] if isinstance(response, list) else _STAND_IN
    )
    tools = {k: obj[k] for k in TOOL_COLUMNS if k in obj}
    checked, _ = normalize_row(
        {"prompt": obj["prompt"], "response": response, _STAND_IN: stand_in, **system, **tools},
        mapping=_RATING_FIELDS if not system else _RATING_SYSTEM,
    )
    _one_system(obj, checked["prompt"])
    return ParsedEvent(
        index=index,
        id=event_id,
        kind="rating",
        format=row_format(checked),
        prompt=checked["prompt"],
        response=checked["chosen"],
        rating=rating,
        tools=checked.get("tools"),
    )


def _one_system(obj: dict[str, Any], prompt: Any) -> None:
    """A system column (`system`, `system_prompt`, ...) beside a prompt that opens with a
    system message of its own would be lost (the prompt's is kept, as in datasets): refused
    instead, unless they say the same."""
    column = system_column(obj)
    if column is None or blank(obj[column]) or not isinstance(prompt, list) or not prompt:
        return
    first = prompt[0]
    if first["role"] == "system" and first["content"] != obj[column]:
        raise RowInvalid(
            column,
            "the prompt opens with a system message of its own, and a different one is given "
            f"as {column}: give the system prompt once, in one place",
        )


def parse_events(
    events: list[Any], stream_format: Format | None, *, max_errors: int = 100
) -> list[ParsedEvent]:
    """Check and normalize a batch; InvalidFeedback lists every bad event by its index.

    A stream holds one format, as a dataset does. A new stream holds conversations if any
    event of its first batch is one (a system prompt makes one), else texts. A text event
    joins a stream of conversations as the one-turn conversation it stands for, as an
    upload's text rows do; a conversation cannot join a stream of texts.
    """
    parsed: list[ParsedEvent] = []
    errors: list[EventError] = []
    total = 0

    def refuse(i: int, field: str | None, msg: str) -> None:
        nonlocal total
        total += 1
        if len(errors) < max_errors:
            errors.append(EventError(index=i, field=field, msg=msg))

    for i, obj in enumerate(events):
        try:
            parsed.append(_parse_one(obj, i))
        except RowInvalid as exc:
            refuse(i, exc.field, exc.msg)
    fmt = stream_format or (
        "conversational" if any(e.format == "conversational" for e in parsed) else "standard"
    )
    kept: list[ParsedEvent] = []
    for event in parsed:
        if event.format == fmt:
            kept.append(event)
        elif fmt == "conversational":
            kept.append(_conversational(event))
        else:
            refuse(
                event.index,
                "prompt",
                "the event is a conversation (a system prompt or a list of messages) but the "
                "stream holds texts, as its first events did; send conversations to a stream "
                "of their own, or give this stream's events as conversations from its start",
            )
    if total:
        errors.sort(key=lambda e: e.index)
        raise InvalidFeedback(errors, total)
    return kept


def _conversational(event: ParsedEvent) -> ParsedEvent:
    """A text event as the one-turn conversation it stands for."""
    if event.row is not None:
        row = {
            k: _as_chat(v, "user" if k == "prompt" else "assistant") for k, v in event.row.items()
        }
        return msgspec.structs.replace(event, format="conversational", row=row)
    return msgspec.structs.replace(
        event,
        format="conversational",
        prompt=_as_chat(event.prompt, "user"),
        response=_as_chat(event.response, "assistant"),
    )


def _as_chat(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def check_row_sizes(
    applied: Applied, events: list[ParsedEvent], max_bytes: int, *, max_errors: int = 100
) -> None:
    """InvalidFeedback for each new row longer than a dataset's line may be (`max_bytes`),
    located at the batch's event that made it: a snapshot of the stream could never hold it.
    A pair of two ratings is checked here too, when the second rating arrives."""
    index = {e.id: e.index for e in events}
    errors: list[EventError] = []
    total = 0
    for record in (*applied.pairs, *applied.unpaired):
        size = len(msgspec.json.encode(record.row))
        if size <= max_bytes:
            continue
        total += 1
        if len(errors) < max_errors:
            what = "the pair it completes" if len(record.events) > 1 else "its row"
            errors.append(
                EventError(
                    index=index[record.events[-1]],
                    field=None,
                    msg=f"{what} would be {size:,} bytes of JSON, past a dataset's line limit "
                    f"of {max_bytes:,} (FTUNE_MAX_LINE_BYTES)",
                )
            )
    if total:
        errors.sort(key=lambda e: e.index)
        raise InvalidFeedback(errors, total)


def prompt_key(prompt: Any) -> str:
    """Ratings pair up when their normalized prompts are equal: this digest names one."""
    return _digest(_encoder.encode(prompt))


def rating_key(event: ParsedEvent) -> str:
    """What a rating is about: its prompt, and the functions the prompt lists."""
    return prompt_key(event.prompt if event.tools is None else [event.prompt, event.tools])


def row_prompt_key(row_json: bytes) -> str:
    """`prompt_key` of a row as stored (msgspec's JSON of it), without decoding the rest of
    the row: its prompt's JSON is the same bytes `prompt_key` hashes."""
    return _digest(_prompt_decoder.decode(row_json).prompt)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class _Prompt(msgspec.Struct):
    prompt: msgspec.Raw


_prompt_decoder = msgspec.json.Decoder(_Prompt)


def apply_events(
    events: list[ParsedEvent],
    seen: set[str],
    pending: dict[str, Pending],
    *,
    now: float,
) -> Applied:
    """What a checked batch adds: pairs in batch order, and the rating queues it leaves.

    `seen` holds the ids already stored; `pending` the queues of the prompts rated in this
    batch (missing ones are empty). A rating pairs with the oldest waiting opposite rating
    of a different response; if there is none, it waits.
    """
    pairs: list[PairRecord] = []
    unpaired: list[PairRecord] = []
    accepted: list[str] = []
    duplicates = 0
    taken = set(seen)
    queues = {
        k: msgspec.structs.replace(v, up=list(v.up), down=list(v.down)) for k, v in pending.items()
    }
    delta = 0
    waiting_ids: set[str] = set()
    for event in events:
        if event.id in taken:
            duplicates += 1
            continue
        taken.add(event.id)
        accepted.append(event.id)
        if event.row is not None:
            pairs.append(PairRecord(row=event.row, kind=event.kind, events=[event.id], at=now))
            continue
        tools = {} if event.tools is None else {"tools": event.tools}
        labelled = {"prompt": event.prompt, "completion": event.response, **tools}
        labelled["label"] = event.rating == "up"
        unpaired.append(PairRecord(row=labelled, kind="rating", events=[event.id], at=now))
        key = rating_key(event)
        queue = queues.setdefault(key, Pending(prompt=event.prompt, tools=event.tools))
        same, opposite = (queue.up, queue.down) if event.rating == "up" else (queue.down, queue.up)
        match = next((w for w in opposite if w.response != event.response), None)
        if match is None:
            same.append(Waiting(id=event.id, response=event.response))
            waiting_ids.add(event.id)
            delta += 1
            continue
        opposite.remove(match)
        waiting_ids.discard(match.id)
        delta -= 1
        good, bad = (
            (event.response, match.response)
            if event.rating == "up"
            else (match.response, event.response)
        )
        row = {"prompt": queue.prompt, "chosen": good, "rejected": bad}
        if queue.tools is not None:
            row["tools"] = queue.tools
        pairs.append(PairRecord(row=row, kind="rating", events=[match.id, event.id], at=now))
    return Applied(
        pairs=pairs,
        unpaired=unpaired,
        accepted=accepted,
        duplicates=duplicates,
        pending=queues,
        pending_delta=delta,
        waiting_from_batch=len(waiting_ids),
    )
