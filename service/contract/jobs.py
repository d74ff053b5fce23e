"""The contract of a job's record: where it is, what it trained on, what it produced."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

from service.contract.datasets import DatasetRef
from service.contract.spec import JobSpec


class JobStatus(enum.StrEnum):
    """Where a job is in its life: succeeded, failed and cancelled are final."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Phase(enum.StrEnum):
    """What a running job is doing: preparing data and model, training, evaluating, merging
    the adapter into the base (if asked), uploading the artifacts."""

    preparing = "preparing"
    training = "training"
    evaluating = "evaluating"
    merging = "merging"
    uploading = "uploading"


class Progress(msgspec.Struct, kw_only=True):
    """How far training is."""

    step: Annotated[int, msgspec.Meta(description="Optimizer steps done.")] = 0
    total_steps: Annotated[
        int | None, msgspec.Meta(description="Steps the run will take; null until known.")
    ] = None
    epoch: Annotated[
        float, msgspec.Meta(description="Passes over the training rows done, fractional.")
    ] = 0.0
    eta_seconds: Annotated[
        float | None,
        msgspec.Meta(description="Estimated seconds of training left; null until measured."),
    ] = None


ArtifactKind = Literal["adapter", "merged"]
"""What a job publishes: its LoRA adapter, or the model merged with it."""


class Artifact(msgspec.Struct, kw_only=True):
    """A published result: its files and their checksums."""

    kind: Annotated[
        ArtifactKind,
        msgspec.Meta(
            description="`adapter`: LoRA weights to load on the base; `merged`: a full model."
        ),
    ]
    uri: Annotated[
        str,
        msgspec.Meta(
            description="Where it is: `hf://org/name[@revision][/adapter]`, "
            "`s3://bucket/prefix/<kind>/`, or a URL in the service's own store."
        ),
    ]
    files: Annotated[list[str], msgspec.Meta(description="File names, relative to the uri.")]
    sha256: Annotated[
        dict[str, str],
        msgspec.Meta(description="sha256 hex per file, as in the manifest.json beside it."),
    ]
    sizes: Annotated[
        dict[str, int],
        msgspec.Meta(description="Bytes per file; empty in records from before this field."),
    ] = msgspec.field(default_factory=dict)


class JobError(msgspec.Struct, kw_only=True):
    """Why a job failed."""

    type: Annotated[
        str,
        msgspec.Meta(
            description="The kind of failure, e.g. `ConfigError`, `WorkerLost`, "
            "`WorkerProcessDied`."
        ),
    ]
    message: Annotated[str, msgspec.Meta(description="What went wrong and, where known, the fix.")]
    phase: Annotated[
        Phase | None, msgspec.Meta(description="The phase it failed in; null if before any.")
    ] = None


GeneratedBy = Literal["merged", "adapter_on_4bit_base", "adapter_on_8bit_base", "adapter_on_base"]


class Generation(msgspec.Struct, kw_only=True):
    """One eval prompt answered before and after training."""

    prompt: Annotated[str, msgspec.Meta(description="One of the spec's eval_prompts.")]
    base: Annotated[str, msgspec.Meta(description="The base model's answer.")]
    tuned: Annotated[str, msgspec.Meta(description="The tuned model's answer.")]
    generated_by: (
        Annotated[
            GeneratedBy,
            msgspec.Meta(
                description=(
                    "The models that wrote `base` and `tuned`. `merged`: the published merged "
                    "model, and the unquantized base in the same dtype. "
                    "`adapter_on_4bit_base` (or 8-bit): the adapter on the quantized base it "
                    "trained on, and that base with the adapter off; with the published adapter "
                    "on an unquantized base the output can differ. `adapter_on_base`: plain "
                    "LoRA, unquantized base. Null in records from before this field."
                )
            ),
        ]
        | None
    ) = None


def _count(description: str) -> msgspec.Meta:
    return msgspec.Meta(ge=0, description=description)


class DroppedRows(msgspec.Struct, kw_only=True):
    """Rows left out because they do not fit max_length, by reason; none is dropped silently."""

    prompt_too_long: Annotated[
        int, _count("The prompt alone fills max_length: no completion token is left.")
    ] = 0
    completion_budget_too_small: Annotated[
        int,
        _count(
            "max_length cuts the completions to fewer than 8 tokens, too few to carry a preference."
        ),
    ] = 0
    identical_after_truncation: Annotated[
        int,
        _count(
            "Cut at max_length, chosen and rejected become the same tokens: loss ln 2 and no "
            "gradient."
        ),
    ] = 0

    @property
    def total(self) -> int:
        return (
            self.prompt_too_long
            + self.completion_budget_too_small
            + self.identical_after_truncation
        )


class DataReport(msgspec.Struct, kw_only=True):
    """What the job trained and evaluated on, with every row of its datasets accounted for."""

    train_rows: Annotated[int, _count("Rows trained on.")]
    eval_rows: Annotated[int, _count("Rows evaluated on.")]
    eval_prompts: Annotated[int, _count("Distinct prompts among the eval rows.")]
    eval_source: Annotated[
        Literal["split", "eval_dataset", "none"],
        msgspec.Meta(
            description="split: held out from the dataset by prompt (eval_fraction); "
            "eval_dataset: the rows of eval_dataset_id; none: no eval set."
        ),
    ]
    eval_prompt_disjoint: Annotated[
        bool,
        msgspec.Meta(
            description="No eval prompt is also a training prompt (compared after normalizing "
            "case, spacing and Unicode form), so eval metrics measure new prompts."
        ),
    ]
    eval_prompts_shared: Annotated[
        int, _count("Eval prompts that are also training prompts (0 when disjoint).")
    ]
    duplicates_removed: Annotated[
        int, _count("Exact duplicate rows removed (from the training and eval datasets).")
    ]
    dropped: Annotated[DroppedRows, msgspec.Meta(description="Training rows left out.")] = (
        msgspec.field(default_factory=DroppedRows)
    )
    eval_dropped: Annotated[DroppedRows, msgspec.Meta(description="Eval rows left out.")] = (
        msgspec.field(default_factory=DroppedRows)
    )

    @property
    def rows_left_out(self) -> int:
        """Duplicates and rows that do not fit, on both sides: the job's `rows_dropped`."""
        return self.duplicates_removed + self.dropped.total + self.eval_dropped.total


class Job(msgspec.Struct, kw_only=True):
    """A fine-tuning job: its spec, where it is, and what it produced."""

    id: Annotated[str, msgspec.Meta(description="The job's id (`job_...`).")]
    tenant: Annotated[str, msgspec.Meta(description="The tenant that owns it.")]
    status: Annotated[
        JobStatus,
        msgspec.Meta(
            description="queued -> running -> succeeded, failed or cancelled (final); a running "
            "job whose worker was lost or stopped goes back to queued."
        ),
    ]
    spec: Annotated[JobSpec, msgspec.Meta(description="The spec as submitted, defaults filled in.")]
    dataset: Annotated[
        DatasetRef, msgspec.Meta(description="The training dataset, as it was at submission.")
    ]
    eval_dataset: Annotated[
        DatasetRef | None,
        msgspec.Meta(description="The eval dataset, if the spec named one."),
    ] = None
    init_adapter: Annotated[
        str | None,
        msgspec.Meta(
            description="Where the adapter it continues (`spec.init_from`) is: an earlier "
            "job's adapter artifact, or the `hf://` / `s3://` reference given; null: it trains "
            "a fresh adapter."
        ),
    ] = None
    phase: Annotated[
        Phase | None,
        msgspec.Meta(description="What a running job is doing; null while queued."),
    ] = None
    created_at: Annotated[
        float, msgspec.Meta(description="When it was submitted, in seconds since the epoch.")
    ]
    started_at: Annotated[
        float | None,
        msgspec.Meta(description="When a worker first started it; null while never started."),
    ] = None
    finished_at: Annotated[
        float | None,
        msgspec.Meta(description="When it reached a final status; null until then."),
    ] = None
    updated_at: Annotated[
        float, msgspec.Meta(description="When the record last changed, in seconds since the epoch.")
    ]
    attempt: Annotated[
        int,
        msgspec.Meta(
            description="0 for the first run; +1 each time the job is re-queued, by a lost "
            "worker or a planned stop (it resumes from its last checkpoint)."
        ),
    ] = 0
    lost_attempts: Annotated[
        int,
        msgspec.Meta(
            description="Attempts whose worker was lost (a crash, a hard kill, no lease "
            "renewal); the job fails when these reach the service's max_attempts. A planned "
            "stop (SIGTERM on a rolling upgrade, drain or scale-down) checkpoints and re-queues "
            "without counting here."
        ),
    ] = 0
    progress: Annotated[Progress, msgspec.Meta(description="How far training is.")] = msgspec.field(
        default_factory=Progress
    )
    latest_metrics: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="The newest value of each metric (TRL's names, e.g. `loss`, "
            "`rewards/accuracies`); the whole series is at /metrics."
        ),
    ] = msgspec.field(default_factory=dict)
    artifacts: Annotated[
        list[Artifact], msgspec.Meta(description="What was published; filled when it succeeds.")
    ] = msgspec.field(default_factory=list)
    eval_generations: Annotated[
        list[Generation],
        msgspec.Meta(description="The eval_prompts answered by the base and the tuned model."),
    ] = msgspec.field(default_factory=list)
    rows_dropped: Annotated[
        int | None,
        msgspec.Meta(
            description="Rows of the job's data (training and eval datasets) left out: exact "
            "duplicates and rows that do not fit max_length, by reason in `data`. Trained + eval "
            "+ dropped = rows given; null until the data is prepared."
        ),
    ] = None
    data: Annotated[
        DataReport | None,
        msgspec.Meta(
            description="How the rows were prepared: trained, evaluated and dropped, by reason; "
            "set once the worker has prepared them."
        ),
    ] = None
    error: Annotated[
        JobError | None, msgspec.Meta(description="Why it failed; null unless it failed.")
    ] = None
    cancel_requested: Annotated[
        bool,
        msgspec.Meta(description="A cancel was asked for; a running job stops at its next step."),
    ] = False
    worker: Annotated[
        str | None,
        msgspec.Meta(description="The worker (`host:pid`) running it; null when none is."),
    ] = None


class JobList(msgspec.Struct, kw_only=True):
    """One page of jobs, newest first."""

    items: Annotated[list[Job], msgspec.Meta(description="The jobs of this page.")]
    next_cursor: Annotated[
        str | None,
        msgspec.Meta(description="Pass as `cursor` for the next page; null on the last page."),
    ] = None


class MetricPoint(msgspec.Struct, kw_only=True):
    """The metrics logged at one training step."""

    step: Annotated[int, msgspec.Meta(description="The optimizer step.")]
    time: Annotated[
        float, msgspec.Meta(description="When it was logged, in seconds since the epoch.")
    ]
    values: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="TRL's metric names as keys (`loss`, `rewards/accuracies`, `eval_loss`, "
            "...) plus the worker's own (`tokens_per_second`, `step_seconds`, `memory_bytes`)."
        ),
    ]


class MetricSeries(msgspec.Struct, kw_only=True):
    """A job's metric points, oldest first."""

    job_id: Annotated[str, msgspec.Meta(description="The job's id.")]
    points: Annotated[list[MetricPoint], msgspec.Meta(description="One point per logging step.")]


class GpuMemoryEstimate(msgspec.Struct, kw_only=True):
    """The GPU memory a spec needs at the peak of a training step, before it is submitted."""

    base_model: Annotated[str, msgspec.Meta(description="The base model estimated for.")]
    architecture: Annotated[
        str | None,
        msgspec.Meta(description="The shape the estimate used; null when it is unknown."),
    ] = None
    total_gb: Annotated[
        float | None,
        msgspec.Meta(description="GiB at the peak; null when the model's shape is unknown."),
    ] = None
    parts_gb: Annotated[
        dict[str, float],
        msgspec.Meta(
            description="GiB by what holds them: `weights`, `adapter` (with its gradients and "
            "optimizer states), `activations`, `lm_head`, `overhead` (CUDA context, allocator)."
        ),
    ] = msgspec.field(default_factory=dict)
    gpu_memory_gb: Annotated[
        float | None,
        msgspec.Meta(description="The workers' GPU memory (`FTUNE_WORKER_GPU_MEMORY_GB`), if set."),
    ] = None
    fits: Annotated[
        bool | None,
        msgspec.Meta(
            description="Whether a submit would pass the memory check; null when nothing can be "
            "judged (no limit configured or an unknown shape)."
        ),
    ] = None
    summary: Annotated[str, msgspec.Meta(description="The estimate in words.")]
