"""The contract of retraining policies: a trigger, a template, a gate; runs and decisions."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.contract.base import Strict
from service.contract.cron import Cron
from service.contract.datasets import DatasetRef
from service.contract.feedback import STREAM_NAME, SnapshotRows
from service.contract.jobs import Artifact
from service.contract.spec import JobTemplate

MetricName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_./-]{1,64}(?!\n)$")]


class Trigger(Strict):
    """When a policy fires a run: after enough new pairs, on a schedule, or both."""

    min_new_pairs: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=100_000_000,
                description="Fire once this many pairs arrived since the last run (with `cron`: "
                "at a scheduled time, once they are there).",
            ),
        ]
        | None
    ) = None
    cron: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=200,
                description="5-field cron schedule in UTC, e.g. `0 3 * * *`; fires only with "
                "new pairs.",
            ),
        ]
        | None
    ) = None
    min_interval_seconds: Annotated[
        float,
        msgspec.Meta(
            ge=0.0, le=366 * 86400.0, description="At least this many seconds between two firings."
        ),
    ] = 0.0

    def __post_init__(self) -> None:
        if self.min_new_pairs is None and self.cron is None:
            raise ValueError("a trigger needs min_new_pairs, cron, or both")
        if self.cron is not None:
            Cron(self.cron)


DEFAULT_NOT_WORSE: dict[str, dict[str, Literal["higher", "lower"]]] = {
    "dpo": {"eval_rewards/accuracies": "higher"},
    "orpo": {"eval_rewards/accuracies": "higher"},
    "simpo": {"eval_rewards/accuracies": "higher"},
    "kto": {"eval_loss": "lower"},
    "sft": {"eval_loss": "lower"},
}
"""A gate's comparison with the promoted run when the policy names none, per template method:
a metric that method's TRL trainer reports on the held-out rows."""


class Gate(Strict):
    """What a run's final metrics must show for it to be promoted. Eval metrics are scored on
    the policy's fixed held-out pairs (TRL's keys with `eval_`)."""

    at_least: Annotated[
        dict[MetricName, float],
        msgspec.Meta(
            max_length=16,
            description='Each metric at least this, e.g. `{"eval_rewards/accuracies": 0.75}`.',
        ),
    ] = {}
    at_most: Annotated[
        dict[MetricName, float],
        msgspec.Meta(
            max_length=16, description='Each metric at most this, e.g. `{"eval_loss": 0.6}`.'
        ),
    ] = {}
    not_worse_than_promoted: (
        Annotated[
            dict[MetricName, Literal["higher", "lower"]],
            msgspec.Meta(
                max_length=16,
                description="Each metric, in the direction that is better, no worse than the "
                "promoted run's (the first run has none to beat). Left out: "
                '`{"eval_rewards/accuracies": "higher"}`, or `{"eval_loss": "lower"}` for a kto '
                "template (TRL's KTO reports no accuracies); the policy's record shows it.",
            ),
        ]
        | None
    ) = None
    tolerance: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1e6,
            description="How much worse than the promoted run still counts as not worse.",
        ),
    ] = 0.0


class PolicySpec(Strict):
    """A retraining policy: which stream, how to train, when, and what a run must show."""

    stream: Annotated[
        str,
        msgspec.Meta(
            pattern=STREAM_NAME, description="The feedback stream whose pairs it trains on."
        ),
    ]
    template: Annotated[
        JobTemplate,
        msgspec.Meta(
            description="The job each run submits, on a fresh snapshot of the stream: its "
            "method picks the rows, the pairs (dpo, orpo, simpo) or every rating unpaired (kto)."
        ),
    ]
    trigger: Annotated[Trigger, msgspec.Meta(description="When it fires a run.")]
    gate: Annotated[
        Gate, msgspec.Meta(description="What a run must show to be promoted and published.")
    ] = msgspec.field(default_factory=Gate)
    holdout_fraction: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=0.5,
            description="Share of the pairs gathered at the first firing held out as the fixed "
            "eval set (ignored when the template names an eval_dataset_id).",
        ),
    ] = 0.1
    enabled: Annotated[
        bool, msgspec.Meta(description="false: it never fires (its history is kept).")
    ] = True
    init_from_promoted: Annotated[
        bool,
        msgspec.Meta(
            description="Each run continues the promoted run's adapter instead of training a "
            "fresh one (until a run is promoted, the template's own init_from, if any, is "
            "used); needs template.output.artifacts `adapter` or `both`."
        ),
    ] = False

    def __post_init__(self) -> None:
        if self.gate.not_worse_than_promoted is None:
            self.gate.not_worse_than_promoted = dict(DEFAULT_NOT_WORSE[self.template.method])
        if self.template.method == "sft":
            raise ValueError(
                "template.method 'sft' cannot train on feedback, which gathers preference "
                "pairs and ratings: use dpo, orpo or simpo (pairs) or kto (every rating)"
            )
        if self.init_from_promoted and self.template.output.artifacts == "merged":
            raise ValueError(
                "init_from_promoted needs the promoted run's adapter: set "
                "template.output.artifacts to 'adapter' or 'both'"
            )

    @property
    def rows(self) -> SnapshotRows:
        """The rows of the stream its runs train and evaluate on."""
        return "unpaired" if self.template.method == "kto" else "pairs"


class GateCheck(msgspec.Struct, kw_only=True):
    """One rule of the gate applied to a run."""

    rule: Annotated[
        Literal["at_least", "at_most", "not_worse_than_promoted", "job"],
        msgspec.Meta(description="The gate rule; `job`: the run's job itself did not succeed."),
    ]
    metric: Annotated[str | None, msgspec.Meta(description="The metric checked, if any.")] = None
    value: Annotated[
        float | None, msgspec.Meta(description="The run's value of the metric; null if missing.")
    ] = None
    bound: Annotated[
        float | None,
        msgspec.Meta(description="What it was held to: the rule's bound or the promoted value."),
    ] = None
    passed: Annotated[bool, msgspec.Meta(description="Whether the run passed this check.")]
    note: Annotated[str, msgspec.Meta(description="The check in words.")]


class GateDecision(msgspec.Struct, kw_only=True):
    promote: bool
    checks: list[GateCheck]
    reason: str


class Holdout(msgspec.Struct, kw_only=True):
    """The pairs held out of training for good, and the dataset made of them."""

    stream: Annotated[str, msgspec.Meta(description="The feedback stream they come from.")]
    dataset: Annotated[
        DatasetRef, msgspec.Meta(description="The eval dataset made of the held-out pairs.")
    ]
    pairs_end: Annotated[int, msgspec.Meta(description="Drawn from pairs 0 .. pairs_end-1.")]
    indices: Annotated[
        list[int], msgspec.Meta(description="Positions in the stream of the held-out pairs.")
    ]
    rows: Annotated[
        SnapshotRows,
        msgspec.Meta(description="Whether they are pairs or unpaired ratings (kto policies)."),
    ] = "pairs"
    created_at: Annotated[
        float, msgspec.Meta(description="When they were drawn, in seconds since the epoch.")
    ]
    by: Annotated[
        Literal["prompt", "pair"],
        msgspec.Meta(
            description="`prompt`: every pair of each held-out prompt is held out, now and "
            "later, so no prompt is both trained and scored on; `pair`: pairs drawn one by "
            "one, and later copies of them kept out (a stream whose pairs gather on a few "
            "prompts, too many to keep out of training; and every set drawn before held-out "
            "sets were drawn by prompt)."
        ),
    ] = "pair"
    prompts: Annotated[
        list[str],
        msgspec.Meta(description="With `by: prompt`, digests of the held-out prompts."),
    ] = []


RunStatus = Literal[
    "starting", "queued", "running", "succeeded", "failed", "cancelled", "not_started", "lost"
]
"""A run mirrors its job's status; `not_started`: its snapshot or job could not be made;
`lost`: its firing was interrupted or its job record vanished."""


class PolicyRun(msgspec.Struct, kw_only=True):
    """One firing of a policy: its snapshot, its job and the gate's decision."""

    id: Annotated[str, msgspec.Meta(description="The run's id.")]
    number: Annotated[int, msgspec.Meta(description="1 for the policy's first run, then +1.")]
    fired_at: Annotated[
        float, msgspec.Meta(description="When it fired, in seconds since the epoch.")
    ]
    reason: Annotated[str, msgspec.Meta(description="Why the policy fired.")]
    pairs_end: Annotated[
        int,
        msgspec.Meta(
            description="The run trains on pairs 0 .. pairs_end-1 of the stream (minus the "
            "held-out ones)."
        ),
    ]
    new_pairs: Annotated[
        int, msgspec.Meta(description="Pairs that arrived since the previous run.")
    ]
    job_id: Annotated[str, msgspec.Meta(description="The job it submitted.")]
    status: Annotated[
        RunStatus,
        msgspec.Meta(
            description="Its job's status; `starting` before the job exists, `not_started`: "
            "its snapshot or job could not be made, `lost`: its firing was interrupted or its "
            "job record vanished."
        ),
    ] = "starting"
    dataset: Annotated[
        DatasetRef | None, msgspec.Meta(description="The training snapshot; null until made.")
    ] = None
    eval_dataset: Annotated[
        DatasetRef | None, msgspec.Meta(description="The held-out eval set it is scored on.")
    ] = None
    snapshot_version: Annotated[
        int | None, msgspec.Meta(description="Version of the stream's snapshot it trains on.")
    ] = None
    metrics: Annotated[dict[str, float], msgspec.Meta(description="The job's final metrics.")] = {}
    decision: Annotated[
        Literal["promoted", "rejected"] | None,
        msgspec.Meta(description="The gate's verdict; null until its job ends."),
    ] = None
    gate: Annotated[
        list[GateCheck], msgspec.Meta(description="Each gate check and its result.")
    ] = []
    decision_reason: Annotated[str | None, msgspec.Meta(description="The decision in words.")] = (
        None
    )
    decided_at: Annotated[
        float | None,
        msgspec.Meta(description="When it was decided, in seconds since the epoch."),
    ] = None
    published: Annotated[
        list[str],
        msgspec.Meta(description="Where the promoted artifacts were published (Hub or S3 URIs)."),
    ] = []
    publish_error: Annotated[
        str | None,
        msgspec.Meta(description="Why publishing a promoted run failed; null if it did not."),
    ] = None


class Promoted(msgspec.Struct, kw_only=True):
    """The run whose model the policy serves: the one later runs must not be worse than."""

    run_id: Annotated[str, msgspec.Meta(description="The promoted run's id.")]
    number: Annotated[int, msgspec.Meta(description="The promoted run's number.")]
    job_id: Annotated[str, msgspec.Meta(description="Its job.")]
    promoted_at: Annotated[
        float, msgspec.Meta(description="When it was promoted, in seconds since the epoch.")
    ]
    metrics: Annotated[dict[str, float], msgspec.Meta(description="Its job's final metrics.")]
    eval_dataset: Annotated[
        DatasetRef, msgspec.Meta(description="The eval set its metrics were scored on.")
    ]
    base_model: Annotated[str, msgspec.Meta(description="The base model it was tuned from.")]
    revision: Annotated[str | None, msgspec.Meta(description="The base model's revision.")]
    beta: Annotated[float, msgspec.Meta(description="The beta it was trained with.")]
    loss_type: Annotated[str, msgspec.Meta(description="The DPO loss it was trained with.")]
    method: Annotated[str, msgspec.Meta(description="The method it was trained with.")] = "dpo"
    artifacts: Annotated[list[Artifact], msgspec.Meta(description="Its job's artifacts.")]
    published: Annotated[
        list[str], msgspec.Meta(description="Where it was published (Hub or S3 URIs).")
    ] = []


class PolicyStatus(msgspec.Struct, kw_only=True):
    """The scheduler's last look at a policy."""

    checked_at: Annotated[
        float, msgspec.Meta(description="When it was evaluated, in seconds since the epoch.")
    ]
    message: Annotated[
        str, msgspec.Meta(description="What it found: why it fired, or what it waits for.")
    ]
    new_pairs: Annotated[
        int | None, msgspec.Meta(description="Pairs that arrived since the last run.")
    ] = None
    next_cron_at: Annotated[
        float | None,
        msgspec.Meta(description="The next scheduled time, if the trigger has a cron."),
    ] = None


class Policy(msgspec.Struct, kw_only=True):
    """A retraining policy with its promoted model and run history."""

    name: Annotated[str, msgspec.Meta(description="The policy's name, unique per tenant.")]
    tenant: Annotated[str, msgspec.Meta(description="The tenant that owns it.")]
    spec: Annotated[PolicySpec, msgspec.Meta(description="The spec of the last PUT.")]
    revision: Annotated[int, msgspec.Meta(description="Goes up with every PUT.")] = 1
    created_at: Annotated[
        float, msgspec.Meta(description="When it was created, in seconds since the epoch.")
    ]
    updated_at: Annotated[
        float, msgspec.Meta(description="When it last changed, in seconds since the epoch.")
    ]
    pairs_at_last_run: Annotated[
        int, msgspec.Meta(description="The stream's pair count when it last fired.")
    ] = 0
    stream_created_at: Annotated[
        float | None,
        msgspec.Meta(
            description="When the stream it counted was created: a stream deleted and made "
            "again is another stream, whose pairs are all new and held out afresh."
        ),
    ] = None
    last_fired_at: Annotated[
        float | None, msgspec.Meta(description="When it last fired; null if never.")
    ] = None
    cron_after: Annotated[
        float, msgspec.Meta(description="Scheduled times after this one are pending.")
    ]
    active_run: Annotated[
        str | None,
        msgspec.Meta(description="The run in flight; null when none (it fires one at a time)."),
    ] = None
    promoted: Annotated[
        Promoted | None, msgspec.Meta(description="The promoted run; null until one passes.")
    ] = None
    holdout: Annotated[
        Holdout | None,
        msgspec.Meta(description="The fixed held-out eval set; null until the first firing."),
    ] = None
    runs: Annotated[
        list[PolicyRun],
        msgspec.Meta(description="Newest first; only the most recent ones are kept."),
    ] = []
    status: Annotated[
        PolicyStatus | None,
        msgspec.Meta(description="The last evaluation by the scheduler (filled in when read)."),
    ] = None


class PolicyList(msgspec.Struct, kw_only=True):
    """One page of policies, by name."""

    items: Annotated[list[Policy], msgspec.Meta(description="The policies of this page.")]
    next_cursor: Annotated[
        str | None,
        msgspec.Meta(description="Pass as `cursor` for the next page; null on the last page."),
    ] = None
