"""How ratings pair up, as pure functions (no Redis): the rules a product team relies on."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service.retraining.events import (
    InvalidFeedback,
    Pending,
    apply_events,
    parse_events,
    prompt_key,
    row_prompt_key,
)


def rate(event_id: str, prompt: Any, response: Any, value: str) -> dict[str, Any]:
    return {"id": event_id, "prompt": prompt, "response": response, "rating": value}


def run(events: list[dict[str, Any]], seen: set[str] | None = None) -> Any:
    return apply_events(parse_events(events, None), seen or set(), {}, now=1.0)


def test_an_up_pairs_with_the_oldest_waiting_down_of_a_different_response() -> None:
    applied = run(
        [
            rate("d1", "Q?", "Bad one.", "down"),
            rate("d2", "Q?", "Worse one.", "down"),
            rate("u1", "Q?", "Bad one.", "up"),  # same text as d1: pairs with d2 instead
            rate("u2", "Q?", "Good.", "up"),  # pairs with d1
        ]
    )
    assert [(p.row["chosen"], p.row["rejected"], p.events) for p in applied.pairs] == [
        ("Bad one.", "Worse one.", ["d2", "u1"]),
        ("Good.", "Bad one.", ["d1", "u2"]),
    ]
    assert applied.pending_delta == 0 and applied.waiting_from_batch == 0
    queue = applied.pending[prompt_key("Q?")]
    assert queue.up == [] and queue.down == []


def test_ratings_of_different_prompts_never_pair() -> None:
    applied = run([rate("u", "Q1?", "Yes.", "up"), rate("d", "Q2?", "No.", "down")])
    assert applied.pairs == [] and applied.pending_delta == 2


def test_a_system_prompt_is_kept_and_ratings_under_different_ones_never_pair() -> None:
    """Was dropped from ratings and edits: a "pirate" up and a "butler" down on the same
    question became one pair with no system message."""
    pirate = {**rate("u", "Greet me.", "Arr, ahoy!", "up"), "system": "You are a pirate."}
    butler = {**rate("d", "Greet me.", "Good evening.", "down"), "system": "You are a butler."}
    applied = run([pirate, butler])
    assert applied.pairs == [] and applied.pending_delta == 2
    [up, _] = applied.unpaired
    assert up.row["prompt"] == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Greet me."},
    ]
    again = {**rate("d2", "Greet me.", "Avast.", "down"), "system": "You are a pirate."}
    [pair] = run([pirate, again]).pairs
    assert pair.row["prompt"][0] == {"role": "system", "content": "You are a pirate."}
    edit = {"id": "e", "prompt": "Hi", "response": "Yo", "edited": "Hello.", "system": "Be kind."}
    [edited] = run([edit]).pairs
    assert edited.row["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert edited.row["chosen"] == [{"role": "assistant", "content": "Hello."}]


def test_ratings_of_function_calls_keep_the_functions_and_pair_under_them() -> None:
    """An agent's answers rated up or down: the functions its prompt listed stay with the
    rows (they were dropped while the calls were kept), and ratings under other functions
    are about another prompt."""
    weather = [{"type": "function", "function": {"name": "weather"}}]
    clock = [{"type": "function", "function": {"name": "clock"}}]
    ask = [{"role": "user", "content": "Weather in Lima?"}]
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}
    calling = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    guess = [{"role": "assistant", "content": "Sunny."}]
    applied = run(
        [
            {**rate("d1", ask, guess, "down"), "tools": weather},
            {**rate("u0", ask, calling, "up"), "tools": clock},  # other functions: waits
            {**rate("u1", ask, calling, "up"), "tools": weather},
        ]
    )
    stored_call = {**call, "function": {"name": "weather", "arguments": {"city": "Lima"}}}
    stored_calling = [{"role": "assistant", "content": "", "tool_calls": [stored_call]}]
    assert [(p.row, p.events) for p in applied.pairs] == [
        (
            {"prompt": ask, "chosen": stored_calling, "rejected": guess, "tools": weather},
            ["d1", "u1"],
        )
    ]
    assert [(r.row["tools"], r.row["label"]) for r in applied.unpaired] == [
        (weather, False),
        (clock, True),
        (weather, True),
    ]
    assert applied.pending_delta == 1  # u0


def test_a_null_or_empty_system_prompt_is_no_system_prompt() -> None:
    """JavaScript clients send an unset field as null: such ratings, edits and pairs stay in
    a stream of texts (they were conversations, refused as 'a stream holds one format')."""
    events = [
        rate("u", "Greet me.", "Hello!", "up"),
        {**rate("d", "Greet me.", "Go away.", "down"), "system": None},
        {"id": "e", "prompt": "Hi", "response": "Yo", "edited": "Hello.", "system": ""},
        {"id": "p", "prompt": "Hi", "chosen": "Hello.", "rejected": "Yo", "system": None},
    ]
    applied = run(events)
    assert [(p.row["prompt"], p.row["chosen"]) for p in applied.pairs] == [
        ("Greet me.", "Hello!"),
        ("Hi", "Hello."),
        ("Hi", "Hello."),
    ]


def test_waiting_ratings_from_earlier_batches_pair_and_seen_ids_are_skipped() -> None:
    first = run([rate("u1", "Q?", "Good.", "up")])
    pending: dict[str, Pending] = first.pending
    events = parse_events([rate("u1", "Q?", "Good.", "up"), rate("d1", "Q?", "Bad.", "down")], None)
    applied = apply_events(events, {"u1"}, pending, now=2.0)
    assert applied.duplicates == 1 and applied.accepted == ["d1"]
    assert [(p.row["chosen"], p.row["rejected"]) for p in applied.pairs] == [("Good.", "Bad.")]
    assert applied.pending_delta == -1
    # The input queues are not modified in place (a retried transaction starts afresh).
    assert [w.id for w in pending[prompt_key("Q?")].up] == ["u1"]


def test_prompts_match_after_normalization() -> None:
    messages = [{"role": "user", "content": "Q?", "name": "ignored"}]
    applied = run(
        [
            rate("u", messages, [{"role": "assistant", "content": "Yes."}], "up"),
            rate(
                "d",
                [{"role": "user", "content": "Q?"}],
                [{"role": "assistant", "content": "No."}],
                "down",
            ),
        ]
    )
    assert len(applied.pairs) == 1
    assert applied.pairs[0].row["prompt"] == [{"role": "user", "content": "Q?"}]


@pytest.mark.parametrize(
    ("event", "field", "needle"),
    [
        ({"id": "a", "prompt": "Q?", "response": "", "rating": "up"}, "response", "empty"),
        ({"id": "a", "prompt": "Q?", "rating": "up"}, "response", "missing"),
        ({"id": "a", "response": "R", "edited": "E"}, "prompt", "missing"),
        ({"id": "a", "prompt": "Q?", "response": "R", "rating": True}, "rating", "up"),
        ({"id": 5, "prompt": "Q?", "chosen": "a", "rejected": "b"}, "id", "string"),
        (
            {"id": "a", "prompt": "Q?", "chosen": "a", "rejected": "b", "rating": "up"},
            None,
            "mixes",
        ),
        (
            {
                "id": "a",
                "prompt": [{"role": "user", "content": "Q"}],
                "response": "R",
                "rating": "up",
            },
            "response",
            "list of messages",
        ),
    ],
)
def test_bad_events_name_their_field(event: dict[str, Any], field: str | None, needle: str) -> None:
    with pytest.raises(InvalidFeedback) as caught:
        parse_events([{"id": "ok", "prompt": "Q?", "chosen": "a", "rejected": "b"}, event], None)
    [error] = caught.value.errors
    assert (error.index, error.field) == (1, field)
    assert needle in error.msg, error.msg


@pytest.mark.parametrize(
    "prompt",
    [
        "What is 2+2?",
        '台北有什麼好吃的？ "quoted" \\ back\nslash',  # noqa: RUF001 - the text itself
        [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Hola?"}],
    ],
)
def test_a_stored_rows_prompt_key_is_read_from_its_json(prompt: Any) -> None:
    """Held-out prompts are matched on every stored row without decoding it whole."""
    row = {"prompt": prompt, "chosen": "a", "rejected": "b", "metadata": {"k": [1, 2]}}
    line = msgspec.json.encode(row)
    assert row_prompt_key(line) == prompt_key(prompt)
    assert row_prompt_key(msgspec.json.encode({**row, "prompt": "other"})) != prompt_key(prompt)
