"""Where a chat's trained answers are among its tokens, for the sft rows TRL cannot tokenize.

TRL's prompt-completion rows train the completion alone. An sft chat also trains the answers
its prompt marks ``"weight": 1`` (see service/datasets/kinds.py), and rows that call functions
carry tools that vary in shape from row to row, which TRL's Arrow columns cannot hold: such
rows are rendered here, with their own tools, into ids and a mask of the tokens trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import DatasetError
from service.contract import uses_functions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]
Message = dict[str, Any]
Span = tuple[int, int] | None
"""Where one trained answer's tokens are; None: not found. The last span is the completion's."""

_CHAT_BATCH = 64
"""Chats rendered at once: each is rendered up to twice an answer, and a fast tokenizer's
batch keeps every token's offsets and text (512 long chats held ~1.5 GB)."""


def trained_answers(prompt: list[Message]) -> list[int]:
    """The answers a prompt marks to train as well as the completion (never its first
    message: the upload does not mark it, as it answers nothing)."""
    return [i for i, m in enumerate(prompt) if i and m.get("weight") == 1]


def own_tokenizing(rows: list[Row]) -> bool:
    """Whether sft rows need tokenizing here: a prompt marks answers to train, or the rows
    call functions (preference and kto rows never: TRL's DPO and KTO trainers render each
    row with its own tools)."""
    if not rows or "completion" not in rows[0] or "label" in rows[0]:
        return False
    return calls_functions(rows) or any(
        trained_answers(r["prompt"]) for r in rows if _msgs(r, "prompt")
    )


def calls_functions(rows: list[Row]) -> bool:
    """Whether any row lists tools or holds a function call or result."""
    return any(map(uses_functions, rows))


def _msgs(row: Row, part: str) -> list[Message]:
    value = row.get(part)
    return value if isinstance(value, list) else []


class Tally:
    """Earlier answers to train on (`of`), and those no span could be found for (`count`)."""

    def __init__(self) -> None:
        self.count = 0
        self.of = 0

    def said(self) -> str | None:
        """The job log's line about answers not trained, if any."""
        if not self.count:
            return None
        return (
            f"{self.count} of {self.of} earlier answers are not trained: the base model's chat "
            "template renders a chat cut after them otherwise than the whole chat (or refuses "
            "it), and TRL has no training template for it (one with {% generation %} marks "
            "would train them)"
        )


def turn_token_ids(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, lost: Tally | None = None
) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, mask) per conversational sft row: the whole chat rendered, and 1 on the tokens of
    each trained answer (its text and end-of-turn tokens) and of the completion.

    With a template that marks answers (its own `{% generation %}` marks, or TRL's training
    template for the model family: Qwen, Llama 3, Gemma, Phi, DeepSeek, gpt-oss, ...) the marks
    say where each answer is, as for TRL's `assistant_only_loss`. Otherwise an answer spans
    from the end of the chat up to it with the generation prompt to the end of the chat up to
    and with it, both checked to render as the start of the whole chat; an answer for which
    they do not is left untrained and counted in `lost`."""
    marked = _training_template(tokenizer)
    lost = lost if lost is not None else Tally()
    for start in range(0, len(rows), _CHAT_BATCH):
        batch = rows[start : start + _CHAT_BATCH]
        chats = [
            [{k: v for k, v in m.items() if k != "weight"} for m in r["prompt"]] for r in batch
        ]
        tools = [r.get("tools") for r in batch]
        turns = [trained_answers(r["prompt"]) for r in batch]
        lost.of += sum(map(len, turns))
        wholes = [c + r["completion"] for c, r in zip(chats, batch, strict=True)]
        if marked is not None:
            found = _marked_spans(tokenizer, marked, wholes, chats, turns, tools)
        else:
            found = _prefix_spans(tokenizer, wholes, chats, turns, tools)
        for ids, spans in found:
            mask = [0] * len(ids)
            for span in spans:
                if span is None:
                    lost.count += 1
                else:
                    mask[span[0] : span[1]] = [1] * (span[1] - span[0])
            yield ids, mask


def _training_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A template of the tokenizer's family whose `{% generation %}` marks say where answers
    are, end-of-turn token included (its own, or TRL's patched one); None where TRL has none
    for it, or where the marks leave the end-of-turn token out (the model would never learn
    to stop: those are split by prefixes instead)."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_stop_token_trained,
    )

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    try:
        marked = get_training_chat_template(tokenizer) or template
        if marked is None or not is_chat_template_stop_token_trained(tokenizer, marked):
            return None
    except Exception:  # TRL knows none for it, or its probes fail on it (a template that raises)
        return None
    return str(marked)


def _marked_spans(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    wholes: list[list[Message]],
    chats: list[list[Message]],
    turns: list[list[int]],
    tools: list[Any],
) -> Iterator[tuple[list[int], list[Span]]]:
    """Spans from the template's answer marks: the nth run of marked tokens is the chat's nth
    assistant message. A chat whose runs do not match its answers is split by prefixes."""
    encoded = chat_encodings(
        tokenizer, wholes, tools, chat_template=template, return_assistant_tokens_mask=True
    )
    for found, whole, chat, trained, tool in zip(encoded, wholes, chats, turns, tools, strict=True):
        assert found is not None  # a whole chat the template refuses fails the job
        ids, marks = found
        runs = _runs(marks)
        answers = [i for i, m in enumerate(whole) if m["role"] == "assistant"]
        if len(runs) != len(answers):
            yield from _prefix_spans(tokenizer, [whole], [chat], [trained], [tool])
            continue
        at: dict[int, Span] = dict(zip(answers, runs, strict=True))
        completion = [runs[n] for n, i in enumerate(answers) if i >= len(chat)]
        last = (completion[0][0], completion[-1][1]) if completion else None
        yield ids, [at[i] for i in trained] + [last]


def _runs(marks: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s."""
    runs: list[tuple[int, int]] = []
    for i, on in enumerate(marks):
        if on and (i == 0 or not marks[i - 1]):
            runs.append((i, i + 1))
        elif on:
            runs[-1] = (runs[-1][0], i + 1)
    return runs


def _prefix_spans(
    tokenizer: PreTrainedTokenizerBase,
    wholes: list[list[Message]],
    chats: list[list[Message]],
    turns: list[list[int]],
    tools: list[Any],
) -> Iterator[tuple[list[int], list[Span]]]:
    """Spans from renderings of the chat cut before and after each answer (a cut the template
    refuses leaves that answer unplaced); the completion starts where the prompt with the
    generation prompt stops matching, as TRL splits it."""
    whole_ids = chat_ids(tokenizer, wholes, tools=tools)
    prompts = iter(chat_ids(tokenizer, chats, generation_prompt=True, tools=tools))
    cuts = [(c, i, f) for c, t, f in zip(chats, turns, tools, strict=True) for i in t]
    heads = iter(
        chat_encodings(
            tokenizer,
            [c[:i] for c, i, _ in cuts],
            [f for _, _, f in cuts],
            lenient=True,
            add_generation_prompt=True,
        )
    )
    ends = iter(
        chat_encodings(
            tokenizer, [c[: i + 1] for c, i, _ in cuts], [f for _, _, f in cuts], lenient=True
        )
    )
    for ids, trained in zip(whole_ids, turns, strict=True):
        spans: list[Span] = []
        for _ in trained:
            head, end = next(heads), next(ends)
            if (
                head is not None
                and end is not None
                and ids[: len(head[0])] == head[0]
                and ids[: len(end[0])] == end[0]
                and len(end[0]) > len(head[0])
            ):
                spans.append((len(head[0]), len(end[0])))
            else:
                spans.append(None)
        spans.append((common_prefix(next(prompts), ids), len(ids)))
        yield ids, spans


def chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    *,
    generation_prompt: bool = False,
    tools: list[Any] | None = None,
) -> list[list[int]]:
    """Each conversation's token ids; a conversation the template refuses fails the job."""
    encoded = chat_encodings(
        tokenizer,
        conversations,
        tools or [None] * len(conversations),
        add_generation_prompt=generation_prompt,
    )
    return [found[0] for found in encoded if found is not None]


def chat_encodings(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    tools: list[Any],
    *,
    lenient: bool = False,
    **kwargs: Any,
) -> list[tuple[list[int], list[int]] | None]:
    """(ids, assistant marks or []) per conversation: in one batch, or one by one when rows
    list their own tools (the template takes one list for a whole batch) or the template
    refuses one of the batch. A conversation the template refuses is None if `lenient`, else
    the job fails naming it."""
    from jinja2.exceptions import TemplateError

    if not conversations:
        return []
    if not any(tools):
        groups = [(conversations, None)]
    else:
        groups = [([c], t) for c, t in zip(conversations, tools, strict=True)]
    out: list[tuple[list[int], list[int]] | None] = []
    for batch, tool in groups:
        try:
            encoded: Any = tokenizer.apply_chat_template(
                batch, tools=tool, tokenize=True, return_dict=True, **kwargs
            )
        except TemplateError as exc:  # the template's own refusal, e.g. Llama 3.1's one call
            if len(batch) > 1:  # find which: one at a time
                for one in batch:
                    out += chat_encodings(tokenizer, [one], [None], lenient=lenient, **kwargs)
                continue
            if lenient:
                out.append(None)
                continue
            first = next((m["content"] for m in batch[0] if m["role"] == "user"), "")
            raise DatasetError(
                f"the base model's chat template refuses a row: {exc} (the row asking "
                f"{first[:80]!r}). Leave such rows out or train a model whose template takes "
                "them"
            ) from None
        marks = encoded.get("assistant_masks") or [[] for _ in batch]
        out += [(list(ids), list(m)) for ids, m in zip(encoded["input_ids"], marks, strict=True)]
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
