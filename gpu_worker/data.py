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
from gpu_worker.turns import (
    Message,
    Row,
    Tally,
    calls_functions,
    chat_ids,
    common_prefix,
    own_tokenizing,
    turn_token_ids,
)
from service.blobs import BlobNotFound, BlobStore, dataset_blob_key
from service.contract import ChatTemplate, DatasetRef, DroppedRows

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


_TOKENIZE_BATCH = 512
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
            tools = [r.get("tools") for r in batch]
            prompts = chat_ids(
                tokenizer, [r["prompt"] for r in batch], generation_prompt=True, tools=tools
            )
            chosen = chat_ids(tokenizer, [r["prompt"] + r["chosen"] for r in batch], tools=tools)
            rejected = chat_ids(
                tokenizer, [r["prompt"] + r["rejected"] for r in batch], tools=tools
            )
        else:
            prompts = _text_ids(tokenizer, [r["prompt"] for r in batch])
            chosen = _text_ids(tokenizer, [r["prompt"] + _ending(r["chosen"], eos) for r in batch])
            rejected = _text_ids(
                tokenizer, [r["prompt"] + _ending(r["rejected"], eos) for r in batch]
            )
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            n = min(common_prefix(p, c), common_prefix(p, r))
            yield n, c[n:], r[n:]


def completion_token_ids(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[int, list[int]]]:
    """(prompt tokens, completion ids) per sft or unpaired row, split as pair_token_ids does."""
    eos = tokenizer.eos_token or ""
    for start in range(0, len(rows), _TOKENIZE_BATCH):
        batch = rows[start : start + _TOKENIZE_BATCH]
        if is_conversational(batch[0]):
            tools = [r.get("tools") for r in batch]
            prompts = chat_ids(
                tokenizer, [r["prompt"] for r in batch], generation_prompt=True, tools=tools
            )
            full = chat_ids(tokenizer, [r["prompt"] + r["completion"] for r in batch], tools=tools)
        else:
            prompts = _text_ids(tokenizer, [r["prompt"] for r in batch])
            full = _text_ids(
                tokenizer, [r["prompt"] + _ending(r["completion"], eos) for r in batch]
            )
        for p, c in zip(prompts, full, strict=True):
            n = common_prefix(p, c)
            yield n, c[n:]


def _text_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    encoded: Any = tokenizer(texts)
    return [list(ids) for ids in encoded["input_ids"]]


def _ending(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


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
        tools = {"tools": row["tools"]} if "tools" in row else {}
        for answer, label in (("chosen", True), ("rejected", False)):
            unpaired.append(
                {"prompt": row["prompt"], "completion": row[answer], "label": label, **tools}
            )
    random.Random(seed).shuffle(unpaired)
    return unpaired


def _json_cells(rows: list[Row]) -> Dataset:
    """Preference or kto rows that call functions, each message and list of tools a JSON
    cell: the structs Arrow infers would give every message every key and every call every
    argument of every other row (as nulls, which templates render)."""
    from datasets import Dataset, Features, Json, List, Value

    columns = {name: List(Json()) for name in rows[0] if name not in ("tools", "label")}
    label = {"label": Value("bool")} if "label" in rows[0] else {}
    features = Features({**columns, **label, "tools": Json()})
    return Dataset.from_list([{**r, "tools": r.get("tools")} for r in rows], features=features)


def _rendered(rows: list[Row], tokenizer: PreTrainedTokenizerBase) -> list[Row]:
    """Preference rows as texts rendered by TRL's own ``apply_chat_template``, each with its
    tools: what TRL's ORPO and CPO trainers render a conversational row into, except that
    they pass no tools."""
    from trl.data_utils import apply_chat_template as render

    return [render(row, tokenizer, tools=row.get("tools")) for row in rows]


def to_dataset(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase | None = None,
    log: Callable[[str], None] | None = None,
    method: str = "dpo",
) -> Dataset:
    """The rows as `method`'s TRL trainer takes them. With the tokenizer, sft rows that need
    it (:func:`own_tokenizing`) are tokenized here: `input_ids` and a `completion_mask` over
    the answers trained and the completion (TRL makes the labels from it, then cuts at
    max_length or packs), built into Arrow a batch at a time (4 bytes a token where Python
    lists hold about 40). Rows that call functions go as JSON cells (DPO and KTO render each
    row with its tools) or rendered here (ORPO and CPO pass none). The others as they are:
    TRL's own prompt-completion tokenizing gives the same mask over the completion alone.
    `log` hears of answers that could not be placed."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if tokenizer is None or not own_tokenizing(rows):
        if calls_functions(rows):
            if method in ("orpo", "simpo"):
                assert tokenizer is not None, "rendering rows needs the tokenizer"
                return Dataset.from_list(_rendered(rows, tokenizer))
            return _json_cells(rows)
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
    if (said := lost.said()) and log is not None:
        log(said)
    return Dataset(InMemoryTable(pa.concat_tables(tables)))
