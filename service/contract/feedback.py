"""The contract of feedback streams: batches in, receipts, streams, pairs and snapshots out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from service.contract.datasets import DatasetRef

STREAM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""Stream (and policy) names: also part of Redis keys, so no ':'."""


MAX_BATCH = 1000
"""Events in one POST."""


MAX_REQUEST_BYTES = 1024 * 1024
"""The API's limit on a request body (all but dataset uploads, which stream): a batch of
feedback must fit in it as well as in MAX_BATCH."""


Format = Literal["standard", "conversational"]


Kind = Literal["pair", "rating", "edit"]


Selection = Literal["all", "train", "held_out"]


class FeedbackBatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    events: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(
            min_length=1,
            max_length=MAX_BATCH,
            description=(
                "Each event has a unique `id` and is one of: a pair (`prompt`, `chosen`, "
                "`rejected`); a rating (`prompt`, `response`, `rating`: up|down), paired with "
                "an opposite rating of the same prompt; an edit (`prompt`, `response`, "
                "`edited`: the edit is chosen, the original rejected). Texts are strings, or "
                "lists of {role, content} messages as in conversational datasets."
            ),
            examples=[
                [
                    {"id": "e1", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
                    {"id": "e2", "prompt": "Hi?", "response": "Hello!", "rating": "up"},
                    {"id": "e3", "prompt": "Hi?", "response": "Hey", "edited": "Hey there!"},
                ]
            ],
        ),
    ]


class FeedbackReceipt(msgspec.Struct, kw_only=True):
    stream: str
    received: int
    """Events in the batch."""
    accepted: int
    """Events stored now (new ids)."""
    duplicates: int
    """Events ignored because their id was seen before (a retry) or earlier in the batch."""
    pairs_added: int
    ratings_waiting: int
    """Ratings of this batch still waiting for an opposite rating of their prompt."""
    pairs_total: int


class FeedbackStream(msgspec.Struct, kw_only=True):
    name: str
    tenant: str
    format: Format | None = None
    """Fixed by the first event: a dataset holds one format."""
    events: int = 0
    """Distinct events stored."""
    duplicates: int = 0
    """Events ignored as repeats of a stored id."""
    pairs: int = 0
    pending_ratings: int = 0
    """Ratings waiting for an opposite rating of the same prompt."""
    snapshots: int = 0
    created_at: float
    updated_at: float
    recent_snapshots: list[FeedbackSnapshot] = []
    """The newest snapshots (filled in when read through the API)."""


class FeedbackStreamList(msgspec.Struct, kw_only=True):
    items: list[FeedbackStream]
    next_cursor: str | None = None


class PairRecord(msgspec.Struct, kw_only=True):
    row: dict[str, Any]
    """The canonical dataset row (prompt, chosen, rejected)."""
    kind: Kind
    events: list[str]
    """Ids of the events that made it (two for a pair of ratings)."""
    at: float


class PairList(msgspec.Struct, kw_only=True):
    stream: str
    offset: int
    total: int
    items: list[PairRecord]


class FeedbackSnapshot(msgspec.Struct, kw_only=True):
    stream: str
    version: int
    dataset: DatasetRef
    selection: Selection
    """`all` pairs; `train`: all but a policy's held-out pairs; `held_out`: only those."""
    pairs_end: int
    """The snapshot considered pairs 0 .. pairs_end-1 of the stream (it only grows)."""
    excluded: int
    """Pairs among those left out by the selection."""
    by: str
    """Who asked: `api`, or `policy <name> run <n>`."""
    created_at: float


class EventError(msgspec.Struct, kw_only=True):
    index: int
    """0-based position of the event in the batch."""
    field: str | None
    msg: str
