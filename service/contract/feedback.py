"""The contract of feedback streams: batches in, receipts, streams, pairs and snapshots out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from service.contract.datasets import DatasetRef, Format

STREAM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(?!\n)$"
"""Stream (and policy) names: also part of Redis keys, so no ':'."""


MAX_BATCH = 1000
"""Events in one POST."""


MAX_REQUEST_BYTES = 1024 * 1024
"""The API's limit on a request body (all but dataset uploads, which stream): a batch of
feedback must fit in it as well as in MAX_BATCH."""


Kind = Literal["pair", "rating", "edit"]


Selection = Literal["all", "train", "held_out"]


EVENTS_EXAMPLE = [
    {"id": "e1", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
    {"id": "e2", "prompt": "Hi?", "response": "Hello!", "rating": "up"},
    {"id": "e3", "prompt": "Hi?", "response": "Hey", "edited": "Hey there!"},
]
"""One event of each kind: the schema's example and the feedback request body's."""


class FeedbackBatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Events for one stream, stored all or nothing."""

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
            examples=[EVENTS_EXAMPLE],
        ),
    ]


class FeedbackReceipt(msgspec.Struct, kw_only=True):
    """What one batch did to its stream."""

    stream: Annotated[str, msgspec.Meta(description="The stream's name.")]
    received: Annotated[int, msgspec.Meta(description="Events in the batch.")]
    accepted: Annotated[int, msgspec.Meta(description="Events stored now (new ids).")]
    duplicates: Annotated[
        int,
        msgspec.Meta(
            description="Events ignored because their id was seen before (a retry) or earlier "
            "in the batch."
        ),
    ]
    pairs_added: Annotated[
        int, msgspec.Meta(description="Preference pairs this batch made (training rows).")
    ]
    ratings_waiting: Annotated[
        int,
        msgspec.Meta(
            description="Ratings of this batch still waiting for an opposite rating of their "
            "prompt."
        ),
    ]
    pairs_total: Annotated[int, msgspec.Meta(description="Pairs in the stream after this batch.")]
    ratings_dropped: Annotated[
        int,
        msgspec.Meta(
            description="Waiting ratings this batch pushed out, oldest first: one prompt keeps "
            "at most 1,000 waiting in each direction (they stay as unpaired rows for kto)."
        ),
    ] = 0


class FeedbackStream(msgspec.Struct, kw_only=True):
    """A named stream of feedback events and the preference pairs made of them."""

    name: Annotated[str, msgspec.Meta(description="The stream's name, unique per tenant.")]
    tenant: Annotated[str, msgspec.Meta(description="The tenant that owns it.")]
    format: Annotated[
        Format | None,
        msgspec.Meta(
            description="Fixed by the first event: a dataset holds one format. Null before any "
            "event."
        ),
    ] = None
    events: Annotated[int, msgspec.Meta(description="Distinct events stored.")] = 0
    duplicates: Annotated[
        int, msgspec.Meta(description="Events ignored as repeats of a stored id.")
    ] = 0
    pairs: Annotated[int, msgspec.Meta(description="Preference pairs gathered so far.")] = 0
    pending_ratings: Annotated[
        int, msgspec.Meta(description="Ratings waiting for an opposite rating of the same prompt.")
    ] = 0
    ratings: Annotated[
        int,
        msgspec.Meta(
            description="Unpaired rows gathered so far: every rating, paired or not, as a "
            "completion labelled good (up) or bad (down), for kto."
        ),
    ] = 0
    dropped_ratings: Annotated[
        int,
        msgspec.Meta(
            description="Waiting ratings dropped, oldest first, because one prompt had more "
            "than 1,000 waiting in one direction."
        ),
    ] = 0
    pair_bytes: Annotated[
        int, msgspec.Meta(description="Bytes the pairs take as a dataset's JSON lines.")
    ] = 0
    rating_bytes: Annotated[
        int, msgspec.Meta(description="Bytes the ratings take as a dataset's JSON lines.")
    ] = 0
    stored_bytes: Annotated[
        int,
        msgspec.Meta(
            description="About what the stream takes in the service's database: its pairs, "
            "ratings, waiting ratings and event ids, as counted against the tenant's "
            "`feedback_bytes` limit (0 for a stream made before that limit existed)."
        ),
    ] = 0
    snapshots: Annotated[int, msgspec.Meta(description="Snapshots taken so far.")] = 0
    created_at: Annotated[
        float, msgspec.Meta(description="When its first event arrived, in seconds since the epoch.")
    ]
    updated_at: Annotated[
        float, msgspec.Meta(description="When it last changed, in seconds since the epoch.")
    ]
    recent_snapshots: Annotated[
        list[FeedbackSnapshot],
        msgspec.Meta(description="The newest snapshots (filled in when read through the API)."),
    ] = []


class FeedbackStreamList(msgspec.Struct, kw_only=True):
    """One page of streams, by name."""

    items: Annotated[list[FeedbackStream], msgspec.Meta(description="The streams of this page.")]
    next_cursor: Annotated[
        str | None,
        msgspec.Meta(description="Pass as `cursor` for the next page; null on the last page."),
    ] = None


class PairRecord(msgspec.Struct, kw_only=True):
    """One preference pair of a stream and the events it was made of."""

    row: Annotated[
        dict[str, Any],
        msgspec.Meta(description="The canonical dataset row (prompt, chosen, rejected)."),
    ]
    kind: Annotated[
        Kind, msgspec.Meta(description="The kind of event(s) that made it: pair, rating or edit.")
    ]
    events: Annotated[
        list[str],
        msgspec.Meta(description="Ids of the events that made it (two for a pair of ratings)."),
    ]
    at: Annotated[float, msgspec.Meta(description="When it was made, in seconds since the epoch.")]


class PairList(msgspec.Struct, kw_only=True):
    """A slice of a stream's pairs, in the order they were gathered."""

    stream: Annotated[str, msgspec.Meta(description="The stream's name.")]
    offset: Annotated[int, msgspec.Meta(description="Position of the first item in the stream.")]
    total: Annotated[int, msgspec.Meta(description="Pairs in the stream.")]
    items: Annotated[list[PairRecord], msgspec.Meta(description="The pairs of this slice.")]


SnapshotRows = Literal["pairs", "unpaired"]
"""Which rows of a stream a snapshot freezes."""


class FeedbackSnapshot(msgspec.Struct, kw_only=True):
    """A stream's pairs frozen into a versioned dataset."""

    stream: Annotated[str, msgspec.Meta(description="The stream's name.")]
    version: Annotated[int, msgspec.Meta(description="1 for the stream's first snapshot, then +1.")]
    dataset: Annotated[
        DatasetRef, msgspec.Meta(description="The dataset made of the pairs: train a job on it.")
    ]
    selection: Annotated[
        Selection,
        msgspec.Meta(
            description="`all` pairs; `train`: all but a policy's held-out pairs; `held_out`: "
            "only those."
        ),
    ]
    pairs_end: Annotated[
        int,
        msgspec.Meta(
            description="The snapshot considered pairs 0 .. pairs_end-1 of the stream (it only "
            "grows)."
        ),
    ]
    excluded: Annotated[
        int, msgspec.Meta(description="Pairs among those left out by the selection.")
    ]
    rows: Annotated[
        SnapshotRows,
        msgspec.Meta(
            description="`pairs`: the stream's preference pairs (a preference dataset); "
            "`unpaired`: its ratings as labelled completions (an unpaired dataset, for kto)."
        ),
    ] = "pairs"
    by: Annotated[str, msgspec.Meta(description="Who asked: `api`, or `policy <name> run <n>`.")]
    created_at: Annotated[
        float, msgspec.Meta(description="When it was taken, in seconds since the epoch.")
    ]


class EventError(msgspec.Struct, kw_only=True):
    index: int
    """0-based position of the event in the batch."""
    field: str | None
    msg: str
