"""The contract: msgspec Structs shared by the API, the store, the CLI and the worker.

Bounds live in the types so that validation and the OpenAPI schema cannot drift;
cross-field rules live in ``__post_init__`` (msgspec turns their ``ValueError`` into a
``ValidationError`` with the field path).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from service.contract.datasets import DatasetRef

REPO_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
MODEL_REF_RE = re.compile(
    r"^(?:(?:hf://)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
    r"|s3://[a-z0-9][a-z0-9.-]{1,62}(?:/[^\s]*)?"
    r"|file:///[^\s]+)$"
)
LABEL_KEY_RE = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Label = Annotated[str, msgspec.Meta(max_length=63)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Inputs reject unknown keys: a typo in a spec must not silently train with defaults."""


class LossType(enum.StrEnum):
    """TRL's DPO loss types (trl 1.16 accepts every one of these)."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_pair = "aot_pair"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"


class Hyperparameters(Strict):
    beta: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 0.1
    loss_type: LossType = LossType.sigmoid
    label_smoothing: Annotated[float, msgspec.Meta(ge=0.0, lt=0.5)] = 0.0
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 5e-6
    num_epochs: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 1.0
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    gradient_accumulation_steps: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    warmup_ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.1
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    max_grad_norm: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 1.0
    max_length: Annotated[int, msgspec.Meta(ge=16, le=131072)] = 1024
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 42
    gradient_checkpointing: bool = True
    logging_steps: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    eval_steps: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    checkpoint_steps: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 50
    optimizer: Literal["adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = (
        "adamw_torch"
    )
    bf16: bool = False
    """Mixed precision in bf16: needs an Ampere-or-newer GPU; refused on a CPU worker."""

    def __post_init__(self) -> None:
        if self.loss_type == LossType.exo_pair and self.label_smoothing <= 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (e.g. 1e-3)")
        if self.label_smoothing > 0 and self.loss_type not in (
            LossType.sigmoid,
            LossType.exo_pair,
            LossType.robust,
        ):
            raise ValueError(
                f"label_smoothing applies only to loss_type sigmoid, exo_pair or robust, "
                f"not {self.loss_type.value!r}"
            )


class Lora(Strict):
    r: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=4096.0)] = 32.0
    dropout: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.05
    target_modules: (
        Literal["all-linear"]
        | Annotated[
            list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.]{1,64}$")]],
            msgspec.Meta(min_length=1, max_length=64),
        ]
    ) = "all-linear"


class Quantization(Strict):
    bits: Literal[4, 8] | None = 4
    """4 = QLoRA (NF4/FP4), 8 = LLM.int8, null = LoRA on unquantized weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ChatTemplate(Strict):
    apply: bool = True
    system_prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=32_768)] | None = None


class HubDestination(Strict, tag="hub", tag_field="type"):
    repo_id: Annotated[str, msgspec.Meta(pattern=REPO_ID_RE)]
    private: bool = True
    revision: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._/-]{1,128}$")] = "main"
    credentials: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,32}$")] | None = None
    """Name of a token the workers hold (FTUNE_HF_TOKEN_<NAME>); null means HF_TOKEN."""


class S3Destination(Strict, tag="s3", tag_field="type"):
    uri: Annotated[str, msgspec.Meta(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/[^\s]*)?$")]


class StoreDestination(Strict, tag="store", tag_field="type"):
    """The service's own blob store, under the job's prefix."""


Destination = HubDestination | S3Destination | StoreDestination


class Output(Strict):
    artifacts: Literal["adapter", "merged", "both"] = "adapter"
    destination: Destination = msgspec.field(default_factory=StoreDestination)


class JobTemplate(Strict):
    """Everything of a job but its dataset: what a retraining policy runs on each snapshot."""

    base_model: Annotated[str, msgspec.Meta(min_length=3, max_length=512)]
    """`org/name` or `hf://org/name` (Hub), `s3://bucket/prefix/`, or `file:///abs/path`
    inside the workers' models dir."""
    revision: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._/-]{1,128}$")] | None = None
    eval_dataset_id: Annotated[str, msgspec.Meta(pattern=r"^ds_[A-Za-z0-9]{1,64}$")] | None = None
    eval_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.05
    method: Literal["dpo"] = "dpo"
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)
    lora: Lora = msgspec.field(default_factory=Lora)
    quantization: Quantization = msgspec.field(default_factory=Quantization)
    chat_template: ChatTemplate = msgspec.field(default_factory=ChatTemplate)
    output: Output = msgspec.field(default_factory=Output)
    eval_prompts: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]],
        msgspec.Meta(max_length=32),
    ] = msgspec.field(default_factory=list)
    labels: Annotated[
        dict[Annotated[str, msgspec.Meta(pattern=LABEL_KEY_RE)], Label],
        msgspec.Meta(max_length=32),
    ] = msgspec.field(default_factory=dict)
    webhook_url: (
        Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$", max_length=2048)] | None
    ) = None
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    """Length of the before/after generations for `eval_prompts`."""

    def __post_init__(self) -> None:
        if not MODEL_REF_RE.match(self.base_model):
            raise ValueError(
                "base_model must be 'org/name', 'hf://org/name', 's3://bucket/prefix' "
                f"or 'file:///abs/path', got {self.base_model!r}"
            )
        if self.revision is not None and not _is_hub_ref(self.base_model):
            raise ValueError("revision applies only to a Hub base_model")
        quant = self.quantization
        if (
            self.hyperparameters.bf16
            and quant.bits is not None
            and quant.compute_dtype == "float16"
        ):
            # fp16 activations need loss scaling, which bf16 autocast does not do.
            raise ValueError(
                "hyperparameters.bf16 and quantization.compute_dtype 'float16' do not mix: use "
                "compute_dtype 'bfloat16' with bf16, or bf16 false (float16 compute then "
                "trains with fp16 loss scaling)"
            )
        if self.quantization.bits is None and self.quantization.compute_dtype != "float32":
            # Harmless but meaningless; keep the record honest.
            self.quantization = msgspec.structs.replace(self.quantization, compute_dtype="float32")


class JobSpec(JobTemplate, kw_only=True):
    dataset_id: Annotated[str, msgspec.Meta(pattern=r"^ds_[A-Za-z0-9]{1,64}$")]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_dataset_id is not None and self.eval_dataset_id == self.dataset_id:
            raise ValueError("eval_dataset_id must differ from dataset_id")


def _is_hub_ref(ref: str) -> bool:
    return not ref.startswith(("s3://", "file://"))


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Phase(enum.StrEnum):
    preparing = "preparing"
    training = "training"
    evaluating = "evaluating"
    merging = "merging"
    uploading = "uploading"


class Progress(msgspec.Struct, kw_only=True):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    eta_seconds: float | None = None


class Artifact(msgspec.Struct, kw_only=True):
    kind: Literal["adapter", "merged"]
    uri: str
    files: list[str]
    sha256: dict[str, str]
    """sha256 hex per file, as in the manifest.json beside it."""


class JobError(msgspec.Struct, kw_only=True):
    type: str
    message: str
    phase: Phase | None = None


GeneratedBy = Literal["merged", "adapter_on_4bit_base", "adapter_on_8bit_base", "adapter_on_base"]


class Generation(msgspec.Struct, kw_only=True):
    prompt: str
    base: str
    tuned: str
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


class Job(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    status: JobStatus
    spec: JobSpec
    dataset: DatasetRef
    eval_dataset: DatasetRef | None = None
    phase: Phase | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float
    attempt: int = 0
    progress: Progress = msgspec.field(default_factory=Progress)
    latest_metrics: dict[str, float] = msgspec.field(default_factory=dict)
    artifacts: list[Artifact] = msgspec.field(default_factory=list)
    eval_generations: list[Generation] = msgspec.field(default_factory=list)
    rows_dropped: int | None = None
    """Rows of the job's data (training and eval datasets, before the eval split) left out
    because their prompt alone reaches max_length: trained + eval + dropped = rows given."""
    error: JobError | None = None
    cancel_requested: bool = False
    worker: str | None = None


class JobList(msgspec.Struct, kw_only=True):
    items: list[Job]
    next_cursor: str | None = None


class MetricPoint(msgspec.Struct, kw_only=True):
    step: int
    time: float
    values: dict[str, float]
    """TRL's metric names as keys (`loss`, `rewards/accuracies`, `eval_loss`, ...) plus the
    worker's own (`tokens_per_second`, `step_seconds`, `memory_bytes`)."""


class MetricSeries(msgspec.Struct, kw_only=True):
    job_id: str
    points: list[MetricPoint]


def local_model_path(ref: str, models_dir: Path) -> Path:
    """The directory a `file://` base_model names, refused unless it lies inside models_dir.

    Shared by the API (422 at submit) and the worker (checked again where it loads).
    """
    path = Path(ref.removeprefix("file://")).resolve()
    root = models_dir.resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"base_model {ref!r} is outside the workers' models dir ({root})")
    return path
