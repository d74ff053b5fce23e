"""A fine-tuning job both ways: OpenAI's create body to our JobSpec, our Job to OpenAI's
`fine_tuning.job`. Pure: the API looks the records up and passes them in.

A create becomes a spec as if it had been sent to `POST /v1/jobs`: model -> base_model,
training_file -> dataset_id, validation_file -> eval_dataset_id, metadata -> labels, seed and
the method's hyperparameters -> hyperparameters (see `hyperparameters` for "auto"), our own
options (`lora`, `output`, `training`, ...) as they are; its webhook, if it has a webhook_url,
is OpenAI's event (`fine_tuning.job.succeeded`, ...).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from service.contract import (
    DEFAULT_LEARNING_RATES,
    LABEL_KEY_RE,
    MAX_LEARNING_RATE,
    MODEL_REF_RE,
    Job,
    JobSpec,
    JobStatus,
    beta_of,
    learning_rate_of,
)
from service.contract.openai import (
    BASE_LEARNING_RATES,
    OUR_JOB_OPTIONS,
    DpoHyperparameters,
    DpoMethod,
    FineTuningHyperparameters,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobError,
    FineTuningMethod,
    JobStatusName,
    SupervisedMethod,
)
from service.openai.files import result_file_id
from service.openai.hyperparameters import SpecError, requested, resolve, splits

_RENAMED = {
    "base_model": "model",
    "dataset_id": "training_file",
    "eval_dataset_id": "validation_file",
    "labels": "metadata",
}
_HYPERPARAMETERS = {
    "beta": "beta",
    "learning_rate": "learning_rate_multiplier",
    "num_epochs": "n_epochs",
    "batch_size": "batch_size",
    "gradient_accumulation_steps": "batch_size",
}
"""Our hyperparameters by OpenAI's name (learning_rate is set through the multiplier, the
batch split through batch_size)."""
LABEL_KEY = re.compile(LABEL_KEY_RE)
_AT = re.compile(r"\s*-\s*at `(?:key` in `)?\$\.?(?P<path>[^`]*)`$")
_FILE_KINDS = {"supervised": "sft", "dpo": "preference"}
_HELD = {
    "sft": "chat examples (messages)",
    "preference": "preference pairs (input, preferred_output, non_preferred_output)",
    "unpaired": "single completions labelled good or bad (KTO rows)",
}


def openai_param(
    path: list[str], hyperparameters: str = "method.dpo.hyperparameters"
) -> str | None:
    """The create-body field (OpenAI's name, or ours riding along) for a JobSpec field path;
    OpenAI's hyperparameters are named under ``hyperparameters`` (where the body gave them)."""
    if not path:
        return None
    head, rest = path[0], path[1:]
    if head == "hyperparameters" and rest:
        if rest[0] == "seed":
            return "seed"
        name = _HYPERPARAMETERS.get(rest[0])
        return f"{hyperparameters}.{name}" if name else ".".join(["training", *rest])
    return ".".join([_RENAMED.get(head, head), *rest])


def method_of(create: FineTuningJobCreate, dataset_kind: str) -> str:
    """OpenAI's method type of a create: the one it names, else the training file's (chat
    examples: supervised, which is what OpenAI takes when none is named; pairs: dpo)."""
    if create.method is not None:
        return create.method.type
    return "supervised" if dataset_kind == "sft" else "dpo"


def hyperparameters_at(create: FineTuningJobCreate, kind: str) -> str:
    """Where the create body gives its hyperparameters, to name them in errors."""
    return f"method.{kind}.hyperparameters" if create.method is not None else "hyperparameters"


def check_file_kind(kind: str, dataset_kind: str, param: str, file_id: str) -> None:
    """SpecError, in OpenAI's terms, when method ``kind`` cannot train on the file."""
    if kind not in _FILE_KINDS or _FILE_KINDS[kind] == dataset_kind:
        return
    if dataset_kind == "unpaired":
        advice = "OpenAI's API has no method for them: create the job with POST /v1/jobs and "
        advice += "method 'kto'"
    else:
        advice = f"use method type '{'dpo' if kind == 'supervised' else 'supervised'}'"
    raise SpecError(
        param,
        f"{param} {file_id} holds {_HELD[dataset_kind]}; method '{kind}' trains on "
        f"{_HELD[_FILE_KINDS[kind]]}: {advice}",
    )


def to_spec(
    create: FineTuningJobCreate,
    *,
    rows: int,
    fits: Callable[[JobSpec], bool],
    gpus: int = 1,
    dataset_kind: str = "preference",
) -> JobSpec:
    """The JobSpec for a create body; `rows` and `dataset_kind` are the training file's, `fits`
    says whether a spec fits the workers' GPUs (it picks how a batch is split). Raises
    SpecError.

    OpenAI's batch_size is the examples per optimizer step; ours is per GPU, and a worker of
    `gpus` GPUs trains on each of them: the batch is divided among them (an auto batch is
    rounded up to a multiple of `gpus`; an explicit one must be one)."""
    kind = method_of(create, dataset_kind)
    if kind == "reinforcement":
        raise SpecError(
            "method.type",
            "reinforcement fine-tuning is not available here yet; use method type 'dpo' with "
            "preference pairs or 'supervised' with chat messages",
        )
    method = "sft" if kind == "supervised" else "dpo"
    if create.integrations:
        raise SpecError(
            "integrations",
            "integrations (wandb) are not supported yet: leave them out and follow the metrics "
            "through the job's events or its result file",
        )
    if not MODEL_REF_RE.match(create.model):
        raise SpecError(
            "model",
            f"model {create.model!r} is not a model reference here: give a Hub id (org/name "
            "or hf://org/name), s3://bucket/prefix/ or file:///path inside the workers' models "
            "dir; OpenAI model names do not exist on this service",
        )
    for key in create.metadata or {}:
        if not LABEL_KEY.match(key):
            raise SpecError(
                "metadata",
                f"metadata key {key!r}: metadata are stored as the job's labels here, so a key "
                "is lowercase letters, digits, '.', '_' and '-', at most 63 characters "
                "(and a value at most 63 characters)",
            )
    if create.validation_file is not None and create.validation_file == create.training_file:
        raise SpecError("validation_file", "validation_file must differ from training_file")
    req = requested(create)
    at = hyperparameters_at(create, kind)
    # TrainingOptions is derived from Hyperparameters at import, so typed loosely here.
    max_steps = getattr(create.training, "max_steps", None)
    if max_steps is not None and req.n_epochs is not None:
        raise SpecError(
            f"{at}.n_epochs",
            "n_epochs has no effect when training.max_steps is set (training stops at max_steps "
            "whatever the epoch): set only one of them",
        )
    values = resolve(req, rows, kind)
    if values["learning_rate"] > MAX_LEARNING_RATE:
        raise SpecError(
            f"{at}.learning_rate_multiplier",
            f"learning_rate_multiplier {req.learning_rate_multiplier:g} gives a learning rate of "
            f"{values['learning_rate']:g} ({kind}'s base {BASE_LEARNING_RATES[kind]:g} times "
            f"it), over the limit of {MAX_LEARNING_RATE:g}: give at most "
            f"{MAX_LEARNING_RATE / BASE_LEARNING_RATES[kind]:g}",
        )
    if method == "sft":
        del values["beta"]  # supervised fine-tuning has no beta
    if max_steps is not None:
        del values["num_epochs"]  # max_steps decides how long it trains
    if req.batch_size is not None and req.batch_size > rows:
        raise SpecError(
            f"{at}.batch_size",
            f"batch_size {req.batch_size} is more than the training file's {rows} examples: a "
            "step can take each example once at most (the job would report a batch it never "
            f"trained); give at most {rows}, or leave it auto",
        )
    batch, left = divmod(int(values.pop("batch")), gpus)
    if left or not batch:
        if req.batch_size is not None:
            param = f"{at}.batch_size"
            raise SpecError(
                param,
                f"{param}: {req.batch_size} is not a multiple of the workers' {gpus} GPUs: each "
                "optimizer step divides its batch among them",
            )
        batch += 1
    hyperparameters: dict[str, Any] = {
        **(msgspec.to_builtins(create.training) if create.training else {}),
        **values,
    }
    if create.seed is not None:
        hyperparameters["seed"] = create.seed
    doc = {
        **{name: msgspec.to_builtins(getattr(create, name)) for name in OUR_JOB_OPTIONS},
        "base_model": create.model,
        "dataset_id": create.training_file,
        "eval_dataset_id": create.validation_file,
        "labels": create.metadata or {},
        "method": method,
        "webhook_format": "openai",
    }
    spec: JobSpec | None = None
    for micro, accumulation in splits(batch):
        hyperparameters |= {"batch_size": micro, "gradient_accumulation_steps": accumulation}
        spec = _convert({**doc, "hyperparameters": hyperparameters}, at)
        if fits(spec):
            break
    assert spec is not None  # splits() always yields (1, batch) last
    return spec


def _convert(doc: dict[str, Any], at: str) -> JobSpec:
    try:
        return msgspec.convert(doc, JobSpec)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT.search(message)
        if match is None:
            raise SpecError(None, message) from None
        path = [p for p in re.split(r"[.\[\]]", match.group("path")) if p]
        param = openai_param(path, at)
        raise SpecError(param, f"{param}: {message[: match.start()]}") from None


def _epochs(job: Job, batch: int) -> int | float:
    """The epochs the job trains: its num_epochs, or as many as its max_steps amount to; a
    whole number as an int (the SDK types n_epochs as one)."""
    hp = job.spec.hyperparameters
    if hp.max_steps is None:
        return int(hp.num_epochs) if hp.num_epochs.is_integer() else hp.num_epochs
    return max(1, math.ceil(hp.max_steps * batch / max(1, job.dataset.rows)))


def job_object(job: Job, *, suffix: str | None = None, gpus: int = 1) -> FineTuningJob:
    """OpenAI's view of one of our jobs, whichever API created it, as trained by workers of
    `gpus` GPUs (its batch_size is the examples of an optimizer step on all of them)."""
    spec, hp = job.spec, job.spec.hyperparameters
    batch = hp.batch_size * hp.gradient_accumulation_steps * gpus
    used = FineTuningHyperparameters(
        batch_size=batch,
        # Stored as the product: 12 significant digits give back the multiplier as sent.
        learning_rate_multiplier=float(
            f"{learning_rate_of(spec) / DEFAULT_LEARNING_RATES[spec.method]:.12g}"
        ),
        n_epochs=_epochs(job, batch),
    )
    if spec.method == "sft":
        method = FineTuningMethod(
            type="supervised", supervised=SupervisedMethod(hyperparameters=used)
        )
    else:
        given = DpoHyperparameters(**msgspec.structs.asdict(used), beta=beta_of(spec))
        block = {spec.method: DpoMethod(hyperparameters=given)}
        method = FineTuningMethod(type=spec.method, **block)  # type: ignore[arg-type]
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at),
        finished_at=int(job.finished_at) if job.finished_at is not None else None,
        model=spec.base_model,
        fine_tuned_model=fine_tuned_model(job),
        organization_id=job.tenant,
        status=_status(job),
        training_file=job.dataset.id,
        validation_file=job.eval_dataset.id if job.eval_dataset else None,
        hyperparameters=used,
        method=method,
        result_files=[result_file_id(job.id)] if job.status == JobStatus.succeeded else [],
        trained_tokens=_trained_tokens(job),
        error=_error(job),
        estimated_finish=_estimated_finish(job),
        seed=hp.seed,
        metadata=dict(spec.labels) or None,
        suffix=suffix,
    )


def _status(job: Job) -> JobStatusName:
    """A running job asked to stop is `cancelled` at once, as OpenAI answers a cancel: a client
    polling for a terminal status stops there (our own view says `running` with
    `cancel_requested` until the worker has stopped it, and then `cancelled`)."""
    if job.cancel_requested and not job.status.terminal:
        return "cancelled"
    return job.status.value


def fine_tuned_model(job: Job) -> str | None:
    """Where the model is: the merged model if one was made, else the adapter; null unless
    the job succeeded (one cancelled while it uploaded keeps its artifacts' record)."""
    if job.status != JobStatus.succeeded:
        return None
    by_kind = {a.kind: a.uri for a in job.artifacts}
    return by_kind.get("merged") or by_kind.get("adapter")


def _trained_tokens(job: Job) -> int | None:
    tokens = job.latest_metrics.get("num_tokens")
    return int(tokens) if job.status.terminal and tokens is not None else None


def _error(job: Job) -> FineTuningJobError | None:
    if job.status != JobStatus.failed or job.error is None:
        return None
    param = "training_file" if job.error.type == "DatasetError" else None
    return FineTuningJobError(code=job.error.type, message=job.error.message, param=param)


def _estimated_finish(job: Job) -> int | None:
    eta = job.progress.eta_seconds
    if job.status != JobStatus.running or job.cancel_requested or eta is None:
        return None  # a job being cancelled is `cancelled` here: it has no finish ahead
    return int(max(job.updated_at + eta, time.time()))  # the ETA of the last step, never past
