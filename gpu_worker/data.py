"""The job's rows: fetched, de-duplicated, split by prompt, templated, fitted to length.

Rows arrive canonical (the API normalized them): preference `{"prompt", "chosen", "rejected"}`,
sft `{"prompt", "completion"}` or unpaired `{"prompt", "completion", "label"}`, as standard
strings or conversational lists of `{role, content}` messages (an sft prompt's answers marked
`"weight": 1` are trained too: `to_dataset`). Everything here is a plain
function over lists of dicts, so it can be tested without a trainer.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gpu_worker.errors import ConfigError, DatasetError
from service.blobs import BlobNotFound, BlobStore, dataset_blob_key
from service.contract import ChatTemplate, DatasetRef, DroppedRows

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]
Message = dict[str, Any]

_TOKENIZE_BATCH = 512
_CHAT_BATCH = 64
"""Chats rendered at once by turn_token_ids: each is rendered up to twice an answer, and a
fast tokenizer's batch keeps every token's offsets and text (512 long chats held ~1.5 GB)."""
ANSWER_FIELDS = ("chosen", "rejected", "completion")
"""The fields of a row that hold an answer (the rest: prompt, and an unpaired row's label)."""


def fetch_rows(store: BlobStore, ref: DatasetRef, dest_dir: Path) -> list[Row]:
    """Download a dataset's JSONL into `dest_dir`, check its sha256 and parse it."""
    key = dataset_blob_key(ref.sha256)
    path = dest_dir / f"{ref.id}.jsonl"
    try:
        store.get_file(key, path)
    except BlobNotFound:
        raise DatasetError(
            f"dataset {ref.id} is missing from the blob store ({store.uri(key)}): upload it "
            "again and resubmit the job"
        ) from None
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != ref.sha256:
        raise DatasetError(
            f"dataset {ref.id} in the blob store is corrupted (sha256 {digest}, expected "
            f"{ref.sha256}): upload it again"
        )
    decoder = msgspec.json.Decoder(dict[str, Any])
    with path.open("rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]


def is_conversational(row: Row) -> bool:
    return isinstance(row.get("prompt"), list)


def apply_chat_template(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: ChatTemplate,
    log: Callable[[str], None],
) -> list[Row]:
    """Put rows in the form the trainer should see, following `spec.chat_template`.

    With `apply` and a tokenizer that has a template, every row becomes conversational (TRL
    then renders prompt and completions with the model's own template) and the system prompt,
    if given, is prepended where a row has none. Otherwise standard rows are trained on as raw
    text, and conversational rows, which cannot be rendered, are refused.
    """
    if not rows:
        return rows
    conversational = is_conversational(rows[0])
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not chat_template.apply or not has_template:
        if conversational:
            why = (
                "chat_template.apply is false"
                if not chat_template.apply
                else "the base model's tokenizer has no chat template"
            )
            raise ConfigError(
                f"{why}, so the conversational dataset cannot be rendered into text: use a chat "
                "model with a chat template (and chat_template.apply true) or standard rows"
            )
        if chat_template.apply:
            log("the base model's tokenizer has no chat template: training on the raw text")
        if chat_template.system_prompt is not None:
            log("chat_template.system_prompt is ignored: the rows are used as raw text")
        return rows
    if calls_functions(rows):
        from trl.chat_template_utils import supports_tool_calling

        if not supports_tool_calling(tokenizer):
            raise ConfigError(
                "the rows call functions (tools, tool_calls), but the base model's chat "
                "template does not render function calls and their results: use a model whose "
                "template does (Qwen2.5 and later, Llama 3.1 and later, ...)"
            )
    system = chat_template.system_prompt
    out = []
    for row in rows:
        if conversational:
            prompt: list[Message] = list(row["prompt"])
            templated = dict(row)
        else:
            prompt = [{"role": "user", "content": row["prompt"]}]
            templated = {
                k: [{"role": "assistant", "content": v}] if k in ANSWER_FIELDS else v
                for k, v in row.items()
            }
        if system is not None and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        templated["prompt"] = prompt
        out.append(templated)
    return out


def prompt_ids(
    prompt: str, tokenizer: PreTrainedTokenizerBase, chat_template: ChatTemplate
) -> list[int]:
    """Token ids of one eval prompt as the tuned model sees it at inference.

    Rendered with the chat template (and system prompt) when training used it, else raw text,
    the same way TRL tokenized the training prompts.
    """
    if not chat_template.apply or getattr(tokenizer, "chat_template", None) is None:
        plain: Any = tokenizer(prompt)
        return list(plain["input_ids"])
    messages = [{"role": "user", "content": prompt}]
    if chat_template.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": chat_template.system_prompt})
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


MIN_COMPLETION_TOKENS = 8
"""A pair whose completions max_length cuts to fewer tokens is dropped: a handful of leading
tokens ("Sure, here", "I think") carries no preference. Pairs that fit whole are always kept."""


def prompt_key(prompt: str | list[Message]) -> str:
    """A hash of the normalized prompt: rows asking the same thing share it.

    Text is compared after Unicode NFKC, case folding and collapsing whitespace; a standard
    prompt counts as one user message, so a standard and a conversational dataset compare too.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    normalized = [
        (m["role"], " ".join(unicodedata.normalize("NFKC", m["content"]).casefold().split()))
        for m in messages
    ]
    return hashlib.sha256(msgspec.json.encode(normalized)).hexdigest()


def remove_duplicates(rows: list[Row]) -> tuple[list[Row], int]:
    """Rows without exact repeats (first occurrence kept, order kept), and how many went.

    A repeated pair would weigh twice in training, or sit on both sides of the eval split.
    """
    seen: set[bytes] = set()
    kept = []
    for row in rows:
        key = hashlib.sha256(msgspec.json.encode(row, order="sorted")).digest()
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded (train, eval) split by prompt: all pairs of a prompt land on the same side.

    Prompts are ordered by a seeded hash of their normalized text and taken into eval until it
    holds `fraction` of the rows (at least one prompt if fraction > 0, never every prompt), so
    the eval metrics measure prompts the model never trained on. Both sides keep row order.
    """
    if fraction <= 0:
        return rows, []
    keys = [prompt_key(row["prompt"]) for row in rows]
    sizes = Counter(keys)
    order = sorted(sizes, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())
    target = max(1, round(len(rows) * fraction))
    picked: set[str] = set()
    taken = 0
    for key in order[:-1]:
        if taken >= target:
            break
        picked.add(key)
        taken += sizes[key]
    train = [row for row, key in zip(rows, keys, strict=True) if key not in picked]
    evals = [row for row, key in zip(rows, keys, strict=True) if key in picked]
    return train, evals


def fit_max_length(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[Row], DroppedRows]:
    """The rows that still carry a preference once cut to max_length, and the others counted.

    TRL cuts prompt + completion on the right at max_length. Dropped: a prompt that fills
    max_length on its own (TRL would drop it silently), completions cut to fewer than
    MIN_COMPLETION_TOKENS, and pairs whose chosen and rejected become the same tokens once cut
    (loss ln 2, zero gradient, accuracy 0: pure noise in the metrics). Long prompts are not
    cut from the left: that would remove the chat template's header and system prompt and train
    on a context the model never sees at inference.
    """
    kept: list[Row] = []
    dropped = DroppedRows()
    if own_tokenizing(rows):  # several answers a row, or calls: counted by trained tokens
        for row, (_, mask) in zip(rows, turn_token_ids(rows, tokenizer), strict=True):
            inside = sum(mask[:max_length])
            if not inside:
                dropped.prompt_too_long += 1
            elif inside < sum(mask) and inside < MIN_COMPLETION_TOKENS:
                dropped.completion_budget_too_small += 1
            else:
                kept.append(row)
        return kept, dropped
    found: Iterable[tuple[int, list[int], list[int] | None]]
    if rows and "completion" in rows[0]:  # one answer a row: nothing can become identical
        found = ((n, c, None) for n, c in completion_token_ids(rows, tokenizer))
    else:
        found = pair_token_ids(rows, tokenizer)
    for row, (n_prompt, chosen, rejected) in zip(rows, found, strict=True):
        budget = max_length - n_prompt
        cut = max(len(chosen), len(rejected or ())) > budget
        if budget <= 0:
            dropped.prompt_too_long += 1
        elif rejected is not None and chosen[:budget] == rejected[:budget]:
            dropped.identical_after_truncation += 1
        elif cut and budget < MIN_COMPLETION_TOKENS:
            dropped.completion_budget_too_small += 1
        else:
            kept.append(row)
    return kept, dropped


def pair_token_ids(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[int, list[int], list[int]]]:
    """(prompt tokens, chosen ids, rejected ids) per row, split the way TRL 1.16's DPOTrainer
    splits them: the completion starts where the tokenized prompt and prompt + completion
    diverge, and raw-text completions end with the EOS token."""
    eos = tokenizer.eos_token or ""
    for start in range(0, len(rows), _TOKENIZE_BATCH):
        batch = rows[start : start + _TOKENIZE_BATCH]
        if is_conversational(batch[0]):
            prompts = _chat_ids(tokenizer, [r["prompt"] for r in batch], generation_prompt=True)
            chosen = _chat_ids(tokenizer, [r["prompt"] + r["chosen"] for r in batch])
            rejected = _chat_ids(tokenizer, [r["prompt"] + r["rejected"] for r in batch])
        else:
            prompts = _text_ids(tokenizer, [r["prompt"] for r in batch])
            chosen = _text_ids(tokenizer, [r["prompt"] + _ending(r["chosen"], eos) for r in batch])
            rejected = _text_ids(
                tokenizer, [r["prompt"] + _ending(r["rejected"], eos) for r in batch]
            )
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            n = min(_common_prefix(p, c), _common_prefix(p, r))
            yield n, c[n:], r[n:]


def completion_token_ids(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[int, list[int]]]:
    """(prompt tokens, completion ids) per sft or unpaired row, split as pair_token_ids does."""
    eos = tokenizer.eos_token or ""
    for start in range(0, len(rows), _TOKENIZE_BATCH):
        batch = rows[start : start + _TOKENIZE_BATCH]
        if is_conversational(batch[0]):
            prompts = _chat_ids(tokenizer, [r["prompt"] for r in batch], generation_prompt=True)
            full = _chat_ids(tokenizer, [r["prompt"] + r["completion"] for r in batch])
        else:
            prompts = _text_ids(tokenizer, [r["prompt"] for r in batch])
            full = _text_ids(
                tokenizer, [r["prompt"] + _ending(r["completion"], eos) for r in batch]
            )
        for p, c in zip(prompts, full, strict=True):
            n = _common_prefix(p, c)
            yield n, c[n:]


def own_tokenizing(rows: list[Row]) -> bool:
    """Whether sft rows need tokenizing here: a prompt holds answers trained as well
    (``"weight": 1``: a chat's earlier answers, see service/datasets/kinds.py), or the rows
    call functions (tools vary in shape from row to row, which TRL's Arrow columns cannot
    hold)."""
    return calls_functions(rows) or any(
        m.get("weight") == 1 for r in rows if "completion" in r for m in _msgs(r, "prompt")
    )


def calls_functions(rows: list[Row]) -> bool:
    """Whether any row lists tools or holds a function call (only sft chats do)."""
    return any(
        "tools" in r or any("tool_calls" in m for m in _msgs(r, "prompt") + _msgs(r, "completion"))
        for r in rows
    )


def _msgs(row: Row, part: str) -> list[Message]:
    value = row.get(part)
    return value if isinstance(value, list) else []


class Tally:
    """Earlier answers to train on (`of`), and those no span could be found for (`count`)."""

    def __init__(self) -> None:
        self.count = 0
        self.of = 0


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
        turns = [
            [i for i, m in enumerate(r["prompt"]) if i and m.get("weight") == 1] for r in batch
        ]
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


Span = tuple[int, int] | None
"""Where one trained answer's tokens are; None: not found. The last span is the completion's."""


def _training_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A template of the tokenizer's family whose `{% generation %}` marks say where answers
    are (its own, or TRL's patched one); None where TRL has none for it."""
    from trl.chat_template_utils import get_training_chat_template

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL knows none for it, or its probes fail on it (a template that raises)
        return None
    return patched or template


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
    encoded = _chat_encodings(
        tokenizer, wholes, tools, chat_template=template, return_assistant_tokens_mask=True
    )
    for (ids, marks), whole, chat, trained, tool in zip(
        encoded, wholes, chats, turns, tools, strict=True
    ):
        runs = _runs(list(marks))
        answers = [i for i, m in enumerate(whole) if m["role"] == "assistant"]
        if len(runs) != len(answers):
            yield from _prefix_spans(tokenizer, [whole], [chat], [trained], [tool])
            continue
        at: dict[int, Span] = dict(zip(answers, runs, strict=True))
        completion = [runs[n] for n, i in enumerate(answers) if i >= len(chat)]
        last = (completion[0][0], completion[-1][1]) if completion else None
        yield list(ids), [at[i] for i in trained] + [last]


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
    """Spans from renderings of the chat cut before and after each answer; the completion
    starts where the prompt with the generation prompt stops matching, as TRL splits it."""
    whole_ids = _chat_ids(tokenizer, wholes, tools=tools)
    cuts = [(c, i, f) for c, t, f in zip(chats, turns, tools, strict=True) for i in [*t, len(c)]]
    heads = iter(
        _chat_ids(
            tokenizer,
            [c[:i] for c, i, _ in cuts],
            generation_prompt=True,
            tools=[f for _, _, f in cuts],
        )
    )
    after = [(c, i, f) for c, t, f in zip(chats, turns, tools, strict=True) for i in t]
    answered = [c[: i + 1] for c, i, _ in after]
    ends = iter(_chat_ids(tokenizer, answered, tools=[f for _, _, f in after]) if answered else [])
    for ids, trained in zip(whole_ids, turns, strict=True):
        spans: list[Span] = []
        for _ in trained:
            head, end = next(heads), next(ends)
            fits = ids[: len(head)] == head and ids[: len(end)] == end and len(end) > len(head)
            spans.append((len(head), len(end)) if fits else None)
        begin = _common_prefix(next(heads), ids)
        spans.append((begin, len(ids)))
        yield ids, spans


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    *,
    generation_prompt: bool = False,
    tools: list[Any] | None = None,
) -> list[list[int]]:
    encoded = _chat_encodings(
        tokenizer, conversations, tools or [None], add_generation_prompt=generation_prompt
    )
    return [ids for ids, _ in encoded]


def _chat_encodings(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    tools: list[Any],
    **kwargs: Any,
) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant marks or []) per conversation: in one batch, or one by one when rows
    list their own tools (the template takes one list for a whole batch)."""
    if not any(tools):
        groups = [(conversations, None)]
    else:
        groups = [([c], t) for c, t in zip(conversations, tools, strict=True)]
    from jinja2.exceptions import TemplateError

    out = []
    for batch, tool in groups:
        try:
            encoded: Any = tokenizer.apply_chat_template(
                batch, tools=tool, tokenize=True, return_dict=True, **kwargs
            )
        except TemplateError as exc:  # the template's own refusal, e.g. Llama 3.1's one call
            first = next((m["content"] for m in batch[0] if m["role"] == "user"), "")
            raise DatasetError(
                f"the base model's chat template refuses a row: {exc} (the row asking "
                f"{first[:80]!r}{' and others' if len(batch) > 1 else ''}). Leave such rows out "
                "or train a model whose template takes them"
            ) from None
        marks = encoded.get("assistant_masks") or [[] for _ in batch]
        out += [(list(ids), list(m)) for ids, m in zip(encoded["input_ids"], marks, strict=True)]
    return out


def _text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    encoded: Any = tokenizer(texts)
    return [list(ids) for ids in encoded["input_ids"]]


def _ending(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def kto_rows(rows: list[Row], seed: int) -> list[Row]:
    """kto's training rows: each pair as its chosen (label true) and rejected (label false)
    completion, then every row in a seeded random order.

    TRL's KTOTrainer reads its rows in order (its KL term pairs each row with its neighbours
    in a batch), and unpairs a block of pairs into all its chosen, then all its rejected: left
    to it, every batch held one label, and unpaired rows trained in upload order.
    """
    unpaired: list[Row] = []
    for row in rows:
        if "label" in row:
            unpaired.append(row)
            continue
        unpaired.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        unpaired.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    random.Random(seed).shuffle(unpaired)
    return unpaired


def to_dataset(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase | None = None,
    log: Callable[[str], None] | None = None,
) -> Dataset:
    """The rows as TRL's trainers take them. With the tokenizer, sft rows that need it
    (:func:`own_tokenizing`) are tokenized here: `input_ids` and a `completion_mask` over the
    answers trained and the completion (TRL makes the labels from it, then cuts at max_length
    or packs), built into Arrow a batch at a time (4 bytes a token where Python lists hold
    about 40). The others as they are: TRL's own prompt-completion tokenizing gives the same
    mask over the completion alone. `log` hears of answers that could not be placed."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if tokenizer is None or not own_tokenizing(rows):
        return Dataset.from_list(rows)
    import pyarrow as pa

    lost = Tally()
    tokens = turn_token_ids(rows, tokenizer, lost)
    tables = []
    while batch := list(itertools.islice(tokens, _TOKENIZE_BATCH)):
        ids, masks = zip(*batch, strict=True)
        columns = {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "completion_mask": pa.array(masks, pa.list_(pa.int8())),
        }
        tables.append(pa.table(columns))
    if lost.count and log is not None:
        log(
            f"{lost.count} of {lost.of} earlier answers are not trained: the base model's chat "
            "template renders a chat cut after them otherwise than the whole chat, and TRL has "
            "no training template for it (one with {% generation %} marks would train them)"
        )
    return Dataset(InMemoryTable(pa.concat_tables(tables)))
