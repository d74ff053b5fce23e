"""The contract of the OpenAI-compatible fine-tuning API: OpenAI's objects, as the official
`openai` SDK (3.57) reads and sends them, plus the options of ours that ride along.

The shapes follow the SDK's `types/file_object.py`, `types/fine_tuning/*` and
`pagination.py`; the mapping to and from our records is `service/openai/`. Our own options in a
create body are derived from `JobTemplate` and `Hyperparameters` (same types, bounds, defaults
and descriptions), so the two APIs cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from service.contract.base import Strict
from service.contract.spec import DEFAULT_LEARNING_RATES, Hyperparameters, JobTemplate

Auto = Literal["auto"]

BASE_LEARNING_RATES = {
    "dpo": DEFAULT_LEARNING_RATES["dpo"],
    "supervised": DEFAULT_LEARNING_RATES["sft"],
}
"""What learning_rate_multiplier 1 means, per OpenAI method: our default for it."""

OUR_JOB_OPTIONS = (
    "revision",
    "eval_fraction",
    "lora",
    "quantization",
    "chat_template",
    "output",
    "eval_prompts",
    "webhook_url",
    "max_new_tokens",
)
"""JobTemplate fields a create body may carry as they are (`extra_body` in the SDK)."""

OPENAI_HYPERPARAMETERS = (
    "beta",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "num_epochs",
    "seed",
)
"""Our Hyperparameters set through OpenAI's own fields (`method.dpo.hyperparameters`, `seed`;
OpenAI's batch_size is the batch per optimizer step, split into our batch_size and
gradient_accumulation_steps), so `training` leaves them out."""


def _derived(
    name: str,
    source: type[msgspec.Struct],
    keep: Any,
    doc: str,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """A Struct with `source`'s fields (type, bounds, default, description) that `keep` keeps,
    with the `defaults` given instead of theirs."""
    defaults = defaults or {}
    fields = [
        (
            f.name,
            f.type,
            defaults[f.name]
            if f.name in defaults
            else f.default
            if f.default is not msgspec.NODEFAULT
            else msgspec.field(default_factory=f.default_factory),
        )
        for f in msgspec.structs.fields(source)
        if keep(f.name)
    ]
    derived = msgspec.defstruct(name, fields, bases=(Strict,), kw_only=True, module=__name__)
    derived.__doc__ = doc
    return derived


if TYPE_CHECKING:
    TrainingOptions = Strict
    JobOptions = Strict
else:
    TrainingOptions = _derived(
        "TrainingOptions",
        Hyperparameters,
        lambda name: name not in OPENAI_HYPERPARAMETERS,
        "Our training options beyond OpenAI's hyperparameters (loss_type, max_steps, "
        "max_length, ...), with the defaults of POST /v1/jobs.",
    )
    JobOptions = _derived(
        "JobOptions",
        JobTemplate,
        lambda name: name in OUR_JOB_OPTIONS,
        "Our job options that ride along in an OpenAI create body. Without a validation_file "
        "every row trains, as on OpenAI (eval_fraction 0; POST /v1/jobs holds 5% out).",
        defaults={"eval_fraction": 0.0},
    )


# -- errors ----------------------------------------------------------------------------------


class OpenAIError(msgspec.Struct, kw_only=True):
    """OpenAI's error object; the SDK raises it as the exception for the status code."""

    message: Annotated[str, msgspec.Meta(description="What went wrong and what to change.")]
    type: Annotated[
        str,
        msgspec.Meta(
            description="invalid_request_error, authentication_error, not_found_error, "
            "conflict_error, rate_limit_error or server_error."
        ),
    ]
    param: Annotated[
        str | None,
        msgspec.Meta(description="The request field at fault, in OpenAI's names, if one is."),
    ] = None
    code: Annotated[
        str | None, msgspec.Meta(description="A machine-readable code, e.g. invalid_api_key.")
    ] = None


class OpenAIErrorResponse(msgspec.Struct, kw_only=True):
    """Every error on these routes: `{"error": {...}}`."""

    error: Annotated[OpenAIError, msgspec.Meta(description="The error.")]


# -- files -----------------------------------------------------------------------------------

FilePurpose = Literal["fine-tune", "fine-tune-results"]


class FileObject(msgspec.Struct, kw_only=True):
    """An uploaded dataset (`fine-tune`) or a job's metrics CSV (`fine-tune-results`)."""

    id: Annotated[
        str,
        msgspec.Meta(
            description="The dataset id (ds_...) for an upload that passed validation, file_... "
            "for one that failed, res_... for a job's results."
        ),
    ]
    object: Annotated[Literal["file"], msgspec.Meta(description="Always `file`.")] = "file"
    bytes: Annotated[
        int, msgspec.Meta(description="Size of what GET /v1/files/{id}/content returns.")
    ]
    created_at: Annotated[int, msgspec.Meta(description="Unix seconds of the upload.")]
    filename: Annotated[
        str, msgspec.Meta(description="The uploaded file's name (the dataset's name).")
    ]
    purpose: Annotated[FilePurpose, msgspec.Meta(description="fine-tune or fine-tune-results.")]
    status: Annotated[
        Literal["uploaded", "processed", "error"],
        msgspec.Meta(
            description="processed: validated and stored as a dataset; error: it failed "
            "validation and nothing was stored (status_details says why)."
        ),
    ]
    status_details: Annotated[
        str | None,
        msgspec.Meta(
            description="For error, the line-numbered validation errors; for processed, the "
            "dataset's warnings (e.g. columns left unused), if any."
        ),
    ] = None
    expires_at: Annotated[
        int | None, msgspec.Meta(description="Always null: files are kept until deleted.")
    ] = None


class FileList(msgspec.Struct, kw_only=True):
    """A page of files, newest first."""

    object: Annotated[Literal["list"], msgspec.Meta(description="Always `list`.")] = "list"
    data: Annotated[list[FileObject], msgspec.Meta(description="The files on this page.")]
    has_more: Annotated[bool, msgspec.Meta(description="Whether a page follows (after=last id).")]
    first_id: Annotated[str | None, msgspec.Meta(description="Id of the first file here.")] = None
    last_id: Annotated[str | None, msgspec.Meta(description="Id of the last file here.")] = None


class FileDeleted(msgspec.Struct, kw_only=True):
    """The answer to a delete."""

    id: Annotated[str, msgspec.Meta(description="The deleted file's id.")]
    object: Annotated[Literal["file"], msgspec.Meta(description="Always `file`.")] = "file"
    deleted: Annotated[bool, msgspec.Meta(description="Always true.")] = True


# -- creating a job --------------------------------------------------------------------------

BatchSize = Annotated[int, msgspec.Meta(ge=1, le=4096)]
LearningRateMultiplier = Annotated[float, msgspec.Meta(gt=0.0, le=100_000.0)]
Epochs = Annotated[int, msgspec.Meta(ge=1, le=100)]
Beta = Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]


class LegacyHyperparameters(Strict):
    """OpenAI's older top-level `hyperparameters` (deprecated there in favour of `method`)."""

    batch_size: Annotated[
        Auto | BatchSize | None,
        msgspec.Meta(description="Examples per optimizer step; auto: from the dataset size."),
    ] = None
    learning_rate_multiplier: Annotated[
        Auto | LearningRateMultiplier | None,
        msgspec.Meta(
            description="learning_rate = this x our default for the method "
            f"({BASE_LEARNING_RATES['dpo']:g} for dpo, {BASE_LEARNING_RATES['supervised']:g} "
            "for supervised); auto: 1."
        ),
    ] = None
    n_epochs: Annotated[
        Auto | Epochs | None,
        msgspec.Meta(description="Passes over the dataset; auto: from the dataset size."),
    ] = None


class DpoHyperparametersCreate(LegacyHyperparameters):
    """DPO's hyperparameters; each may be a value, "auto" or left out (= auto)."""

    beta: Annotated[
        Auto | Beta | None,
        msgspec.Meta(description="Strength of the pull towards the base model; auto: 0.1."),
    ] = None


class DpoMethodCreate(Strict):
    """Configuration of the DPO method."""

    hyperparameters: Annotated[
        DpoHyperparametersCreate | None, msgspec.Meta(description="DPO's hyperparameters.")
    ] = None


class SupervisedMethodCreate(Strict):
    """Configuration of the supervised method (our `sft`)."""

    hyperparameters: Annotated[
        LegacyHyperparameters | None,
        msgspec.Meta(description="Supervised fine-tuning's hyperparameters."),
    ] = None


class FineTuningMethodCreate(Strict):
    """The fine-tuning method: dpo or supervised (sft); reinforcement is refused for now."""

    type: Annotated[
        Literal["dpo", "supervised", "reinforcement"],
        msgspec.Meta(
            description="dpo (preference pairs) or supervised (chat `messages` rows, trained "
            "as our sft method); reinforcement answers 400 for now."
        ),
    ]
    dpo: Annotated[DpoMethodCreate | None, msgspec.Meta(description="Configuration for dpo.")] = (
        None
    )
    supervised: Annotated[
        SupervisedMethodCreate | None, msgspec.Meta(description="Configuration for supervised.")
    ] = None
    reinforcement: Annotated[
        dict[str, Any] | None, msgspec.Meta(description="Not supported yet.")
    ] = None


class WandbIntegration(msgspec.Struct, kw_only=True):
    """OpenAI's Weights & Biases settings."""

    project: Annotated[str, msgspec.Meta(description="The W&B project.")]
    entity: Annotated[str | None, msgspec.Meta(description="The W&B entity.")] = None
    name: Annotated[str | None, msgspec.Meta(description="The run's display name.")] = None
    tags: Annotated[list[str] | None, msgspec.Meta(description="The run's tags.")] = None


class FineTuningIntegration(msgspec.Struct, kw_only=True):
    """An integration; answers 400 for now (our tracking integrations have not landed)."""

    type: Annotated[Literal["wandb"], msgspec.Meta(description="Always wandb.")]
    wandb: Annotated[WandbIntegration, msgspec.Meta(description="Its settings.")]


MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512)]


class FineTuningJobCreate(JobOptions, kw_only=True):
    """OpenAI's create body, plus our options (`lora`, `quantization`, `output`, `training`,
    ...) as extra fields."""

    model: Annotated[
        str,
        msgspec.Meta(
            description="The base model: a Hub id (org/name), s3://bucket/prefix/ or "
            "file:///path inside the workers' models dir; not an OpenAI model name."
        ),
    ]
    training_file: Annotated[
        str, msgspec.Meta(description="Id of a processed file (POST /v1/files): a dataset id.")
    ]
    validation_file: Annotated[
        str | None,
        msgspec.Meta(description="Id of a processed file to evaluate on, of the same format."),
    ] = None
    hyperparameters: Annotated[
        LegacyHyperparameters | None,
        msgspec.Meta(description="OpenAI's deprecated form; give `method` or this, not both."),
    ] = None
    method: Annotated[
        FineTuningMethodCreate | None,
        msgspec.Meta(
            description="The method; left out: the training file's (`dpo` for preference rows, "
            "`supervised` for chat rows), all auto."
        ),
    ] = None
    suffix: Annotated[
        Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None,
        msgspec.Meta(
            description="Kept and returned on the job; `output` decides where the model goes."
        ),
    ] = None
    seed: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None,
        msgspec.Meta(description="Training seed; left out: 42."),
    ] = None
    metadata: Annotated[
        Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)] | None,
        msgspec.Meta(
            description="Up to 16 pairs, stored as the job's labels (so keys follow our label "
            "rules: lowercase letters, digits, '.', '_', '-'; values up to 63 characters)."
        ),
    ] = None
    integrations: Annotated[
        list[FineTuningIntegration] | None,
        msgspec.Meta(description="Refused (400) for now: tracking integrations have not landed."),
    ] = None
    training: Annotated[
        TrainingOptions | None,
        msgspec.Meta(description="Our training options beyond OpenAI's hyperparameters."),
    ] = None


# -- a job -----------------------------------------------------------------------------------


class FineTuningHyperparameters(msgspec.Struct, kw_only=True):
    """The values used, with every "auto" resolved."""

    batch_size: Annotated[
        int, msgspec.Meta(description="Examples per optimizer step (batch x accumulation).")
    ]
    learning_rate_multiplier: Annotated[
        float,
        msgspec.Meta(
            description="learning_rate / our default for the method "
            f"({BASE_LEARNING_RATES['dpo']:g} for dpo, {BASE_LEARNING_RATES['supervised']:g} "
            "for supervised)."
        ),
    ]
    n_epochs: Annotated[
        float,  # a whole one is sent as an int (the SDK's type), which "number" takes
        msgspec.Meta(
            description="Passes over the dataset: a whole number, as OpenAI's, unless the job "
            "was made with fractional epochs through POST /v1/jobs."
        ),
    ]


class DpoHyperparameters(FineTuningHyperparameters, kw_only=True):
    """DPO's values used, with every "auto" resolved."""

    beta: Annotated[float, msgspec.Meta(description="DPO's beta.")]


class DpoMethod(msgspec.Struct, kw_only=True):
    """DPO's configuration as used."""

    hyperparameters: Annotated[DpoHyperparameters, msgspec.Meta(description="Values used.")]


class SupervisedMethod(msgspec.Struct, kw_only=True):
    """Supervised fine-tuning's configuration as used."""

    hyperparameters: Annotated[FineTuningHyperparameters, msgspec.Meta(description="Values used.")]


class FineTuningMethod(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The method as used."""

    type: Annotated[
        Literal["dpo", "supervised", "kto", "orpo", "simpo"],
        msgspec.Meta(
            description="dpo, or supervised for a job of our sft method; a job made with "
            "POST /v1/jobs for one of our other preference methods names it (kto, orpo, simpo: "
            "OpenAI has none of them, and its create takes only dpo and supervised)."
        ),
    ]
    dpo: Annotated[
        DpoMethod | None, msgspec.Meta(description="DPO's configuration (type dpo).")
    ] = None
    supervised: Annotated[
        SupervisedMethod | None,
        msgspec.Meta(description="Supervised fine-tuning's configuration (type supervised)."),
    ] = None
    kto: Annotated[
        DpoMethod | None, msgspec.Meta(description="KTO's configuration (type kto).")
    ] = None
    orpo: Annotated[
        DpoMethod | None,
        msgspec.Meta(description="ORPO's configuration (type orpo; beta is its lambda)."),
    ] = None
    simpo: Annotated[
        DpoMethod | None, msgspec.Meta(description="SimPO's configuration (type simpo).")
    ] = None


class FineTuningJobError(msgspec.Struct, kw_only=True):
    """Why a job failed."""

    code: Annotated[
        str, msgspec.Meta(description="Our error type, e.g. DatasetError, ModelLoadError.")
    ]
    message: Annotated[str, msgspec.Meta(description="What went wrong and what to change.")]
    param: Annotated[
        str | None, msgspec.Meta(description="training_file for a dataset error, else null.")
    ] = None


JobStatusName = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class FineTuningJob(msgspec.Struct, kw_only=True):
    """A fine-tuning job: our job record (GET /v1/jobs/{id} has the same id) in OpenAI's form."""

    id: Annotated[str, msgspec.Meta(description="The job id (job_...).")]
    object: Annotated[
        Literal["fine_tuning.job"], msgspec.Meta(description="Always `fine_tuning.job`.")
    ] = "fine_tuning.job"
    created_at: Annotated[int, msgspec.Meta(description="Unix seconds of the submit.")]
    finished_at: Annotated[
        int | None, msgspec.Meta(description="Unix seconds of the end; null until then.")
    ] = None
    model: Annotated[str, msgspec.Meta(description="The base model reference.")]
    fine_tuned_model: Annotated[
        str | None,
        msgspec.Meta(
            description="Where the model is once it succeeded: hf://org/name for the Hub, the "
            "s3:// URI, or the URI in our blob store; the merged model if one was made, else "
            "the adapter."
        ),
    ] = None
    organization_id: Annotated[str, msgspec.Meta(description="The tenant.")]
    status: Annotated[
        JobStatusName,
        msgspec.Meta(
            description="queued, running, succeeded, failed or cancelled; `cancelled` as soon "
            "as a cancel is asked (the worker stops the job at its next step)."
        ),
    ]
    training_file: Annotated[str, msgspec.Meta(description="The training dataset's id.")]
    validation_file: Annotated[
        str | None, msgspec.Meta(description="The eval dataset's id, if one was given.")
    ] = None
    hyperparameters: Annotated[
        FineTuningHyperparameters, msgspec.Meta(description="The values used (auto resolved).")
    ]
    method: Annotated[FineTuningMethod, msgspec.Meta(description="The method and its values used.")]
    result_files: Annotated[
        list[str],
        msgspec.Meta(description="Once succeeded: the per-step metrics CSV's file id (res_...)."),
    ]
    trained_tokens: Annotated[
        int | None,
        msgspec.Meta(description="Tokens trained on (TRL's num_tokens); null until it ends."),
    ] = None
    error: Annotated[
        FineTuningJobError | None, msgspec.Meta(description="Why it failed, when it did.")
    ] = None
    estimated_finish: Annotated[
        int | None, msgspec.Meta(description="Unix seconds it should end at, while running.")
    ] = None
    seed: Annotated[int, msgspec.Meta(description="The training seed used.")]
    metadata: Annotated[
        dict[str, str] | None, msgspec.Meta(description="The job's labels; null if none.")
    ] = None
    integrations: Annotated[
        list[FineTuningIntegration] | None, msgspec.Meta(description="Always null for now.")
    ] = None
    suffix: Annotated[
        str | None, msgspec.Meta(description="The suffix given at create, if any.")
    ] = None


class FineTuningJobList(msgspec.Struct, kw_only=True):
    """A page of jobs, newest first."""

    object: Annotated[Literal["list"], msgspec.Meta(description="Always `list`.")] = "list"
    data: Annotated[list[FineTuningJob], msgspec.Meta(description="The jobs on this page.")]
    has_more: Annotated[bool, msgspec.Meta(description="Whether a page follows (after=last id).")]


class FineTuningJobEvent(msgspec.Struct, kw_only=True):
    """A status change, phase, log line or metrics point of a job."""

    id: Annotated[str, msgspec.Meta(description="ftevent-<position in the job's stream>.")]
    object: Annotated[
        Literal["fine_tuning.job.event"],
        msgspec.Meta(description="Always `fine_tuning.job.event`."),
    ] = "fine_tuning.job.event"
    created_at: Annotated[int, msgspec.Meta(description="Unix seconds of the event.")]
    level: Annotated[
        Literal["info", "warn", "error"],
        msgspec.Meta(description="error for a failure, warn for a cancel or retry, else info."),
    ]
    message: Annotated[str, msgspec.Meta(description="What happened, in words.")]
    type: Annotated[
        Literal["message", "metrics"], msgspec.Meta(description="metrics for a metrics point.")
    ]
    data: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(
            description="For metrics: step, total_steps, train_loss, valid_loss and every "
            "metric the step logged under TRL's names (rewards/accuracies, ...); for a status "
            "change: status, attempt and error."
        ),
    ] = None


class FineTuningJobEventList(msgspec.Struct, kw_only=True):
    """A page of events, newest first."""

    object: Annotated[Literal["list"], msgspec.Meta(description="Always `list`.")] = "list"
    data: Annotated[list[FineTuningJobEvent], msgspec.Meta(description="The events.")]
    has_more: Annotated[bool, msgspec.Meta(description="Whether older events follow.")]


class CheckpointMetrics(msgspec.Struct, kw_only=True):
    """The metrics logged at a checkpoint's step."""

    step: Annotated[float, msgspec.Meta(description="The step.")]
    train_loss: Annotated[float | None, msgspec.Meta(description="TRL's loss.")] = None
    train_mean_token_accuracy: Annotated[
        float | None, msgspec.Meta(description="TRL's mean_token_accuracy.")
    ] = None
    valid_loss: Annotated[
        float | None, msgspec.Meta(description="eval_loss, if evaluated at this step.")
    ] = None
    valid_mean_token_accuracy: Annotated[
        float | None, msgspec.Meta(description="eval_mean_token_accuracy, if evaluated.")
    ] = None
    full_valid_loss: Annotated[
        float | None, msgspec.Meta(description="Always null: eval runs on the whole eval set.")
    ] = None
    full_valid_mean_token_accuracy: Annotated[
        float | None, msgspec.Meta(description="Always null, as full_valid_loss.")
    ] = None
    train_rewards_accuracies: Annotated[
        float | None, msgspec.Meta(description="TRL's rewards/accuracies.")
    ] = None
    train_rewards_margins: Annotated[
        float | None, msgspec.Meta(description="TRL's rewards/margins.")
    ] = None


class FineTuningJobCheckpoint(msgspec.Struct, kw_only=True):
    """A training checkpoint kept in the blob store (the newest two of a job are kept)."""

    id: Annotated[str, msgspec.Meta(description="ftckpt-<job id>-<step>.")]
    object: Annotated[
        Literal["fine_tuning.job.checkpoint"],
        msgspec.Meta(description="Always `fine_tuning.job.checkpoint`."),
    ] = "fine_tuning.job.checkpoint"
    created_at: Annotated[int, msgspec.Meta(description="Unix seconds of its step's log.")]
    fine_tuned_model_checkpoint: Annotated[
        str, msgspec.Meta(description="The checkpoint folder's URI in our blob store.")
    ]
    fine_tuning_job_id: Annotated[str, msgspec.Meta(description="The job's id.")]
    metrics: Annotated[CheckpointMetrics, msgspec.Meta(description="Metrics at its step.")]
    step_number: Annotated[int, msgspec.Meta(description="The step it was saved at.")]


class FineTuningJobCheckpointList(msgspec.Struct, kw_only=True):
    """A page of checkpoints, newest first."""

    object: Annotated[Literal["list"], msgspec.Meta(description="Always `list`.")] = "list"
    data: Annotated[list[FineTuningJobCheckpoint], msgspec.Meta(description="The checkpoints.")]
    has_more: Annotated[bool, msgspec.Meta(description="Whether older checkpoints follow.")]
    first_id: Annotated[str | None, msgspec.Meta(description="Id of the first one here.")] = None
    last_id: Annotated[str | None, msgspec.Meta(description="Id of the last one here.")] = None
