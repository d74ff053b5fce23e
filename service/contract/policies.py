"""The contract of retraining policies: a trigger, a template, a gate; runs and decisions."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.contract.cron import Cron
from service.contract.datasets import DatasetRef
from service.contract.feedback import STREAM_NAME
from service.contract.jobs import Artifact, JobTemplate, Strict

MetricName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_./-]{1,64}$")]


class Trigger(Strict):
    min_new_pairs: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] | None = None
    """Fire once this many pairs arrived since the last run (with `cron`: at a scheduled time,
    once they are there)."""
    cron: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    """5-field cron schedule in UTC, e.g. `0 3 * * *`; fires only with new pairs."""
    min_interval_seconds: Annotated[float, msgspec.Meta(ge=0.0, le=366 * 86400.0)] = 0.0
    """At least this long between two firings."""

    def __post_init__(self) -> None:
        if self.min_new_pairs is None and self.cron is None:
            raise ValueError("a trigger needs min_new_pairs, cron, or both")
        if self.cron is not None:
            Cron(self.cron)


class Gate(Strict):
    """What a run's final metrics must show for it to be promoted. Eval metrics are scored on
    the policy's fixed held-out pairs (TRL's keys with `eval_`)."""

    at_least: Annotated[dict[MetricName, float], msgspec.Meta(max_length=16)] = {}
    """Each metric at least this, e.g. `{"eval_rewards/accuracies": 0.75}`."""
    at_most: Annotated[dict[MetricName, float], msgspec.Meta(max_length=16)] = {}
    """Each metric at most this, e.g. `{"eval_loss": 0.6}`."""
    not_worse_than_promoted: Annotated[
        dict[MetricName, Literal["higher", "lower"]], msgspec.Meta(max_length=16)
    ] = msgspec.field(default_factory=lambda: {"eval_rewards/accuracies": "higher"})
    """Each metric, in the direction that is better, no worse than the promoted run's."""
    tolerance: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    """How much worse than the promoted run still counts as not worse."""


class PolicySpec(Strict):
    stream: Annotated[str, msgspec.Meta(pattern=STREAM_NAME)]
    template: JobTemplate
    trigger: Trigger
    gate: Gate = msgspec.field(default_factory=Gate)
    holdout_fraction: Annotated[float, msgspec.Meta(gt=0.0, le=0.5)] = 0.1
    """Share of the pairs gathered at the first firing held out as the fixed eval set
    (ignored when the template names an eval_dataset_id)."""
    enabled: bool = True


class GateCheck(msgspec.Struct, kw_only=True):
    rule: Literal["at_least", "at_most", "not_worse_than_promoted", "job"]
    metric: str | None = None
    value: float | None = None
    bound: float | None = None
    passed: bool
    note: str


class GateDecision(msgspec.Struct, kw_only=True):
    promote: bool
    checks: list[GateCheck]
    reason: str


class Holdout(msgspec.Struct, kw_only=True):
    """The pairs held out of training for good, and the dataset made of them."""

    stream: str
    dataset: DatasetRef
    pairs_end: int
    """Drawn from pairs 0 .. pairs_end-1."""
    indices: list[int]
    created_at: float


RunStatus = Literal[
    "starting", "queued", "running", "succeeded", "failed", "cancelled", "not_started", "lost"
]
"""A run mirrors its job's status; `not_started`: its snapshot or job could not be made;
`lost`: its firing was interrupted or its job record vanished."""


class PolicyRun(msgspec.Struct, kw_only=True):
    id: str
    number: int
    fired_at: float
    reason: str
    """Why the policy fired."""
    pairs_end: int
    """The run trains on pairs 0 .. pairs_end-1 of the stream (minus the held-out ones)."""
    new_pairs: int
    job_id: str
    status: RunStatus = "starting"
    dataset: DatasetRef | None = None
    eval_dataset: DatasetRef | None = None
    snapshot_version: int | None = None
    metrics: dict[str, float] = {}
    """The job's final metrics."""
    decision: Literal["promoted", "rejected"] | None = None
    gate: list[GateCheck] = []
    decision_reason: str | None = None
    decided_at: float | None = None
    published: list[str] = []
    """Where the promoted artifacts were published (Hub or S3 URIs)."""
    publish_error: str | None = None


class Promoted(msgspec.Struct, kw_only=True):
    run_id: str
    number: int
    job_id: str
    promoted_at: float
    metrics: dict[str, float]
    eval_dataset: DatasetRef
    base_model: str
    revision: str | None
    beta: float
    loss_type: str
    artifacts: list[Artifact]
    published: list[str] = []


class PolicyStatus(msgspec.Struct, kw_only=True):
    checked_at: float
    message: str
    new_pairs: int | None = None
    next_cron_at: float | None = None


class Policy(msgspec.Struct, kw_only=True):
    name: str
    tenant: str
    spec: PolicySpec
    revision: int = 1
    """Goes up with every PUT."""
    created_at: float
    updated_at: float
    pairs_at_last_run: int = 0
    last_fired_at: float | None = None
    cron_after: float
    """Scheduled times after this one are pending."""
    active_run: str | None = None
    promoted: Promoted | None = None
    holdout: Holdout | None = None
    runs: list[PolicyRun] = []
    """Newest first; the last MAX_RUNS."""
    status: PolicyStatus | None = None
    """The last evaluation by the periodic task (filled in when read)."""


class PolicyList(msgspec.Struct, kw_only=True):
    items: list[Policy]
    next_cursor: str | None = None
