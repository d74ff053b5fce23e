"""The contract of jobs: the spec a user submits (and a policy templates), the record they read."""

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
    """The DPO loss types of the installed TRL (1.16), no more and no fewer."""

    # A test reads TRL's own set: a TRL upgrade that adds, renames or removes one fails the
    # tests instead of jobs at step 1.

    sigmoid = "sigmoid"
    sigmoid_norm = "sigmoid_norm"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"


LABEL_SMOOTHING_LOSSES = frozenset(
    {LossType.exo_pair, LossType.robust, LossType.aot, LossType.aot_unpaired}
)
"""The loss types whose TRL formula reads label_smoothing; every other one ignores it."""
BETA_FREE_LOSSES = frozenset({LossType.sft})
"""The loss types whose TRL formula does not read beta."""
DEFAULT_BETA = 0.1
DEFAULT_NUM_EPOCHS = 1.0


class Hyperparameters(Strict):
    """How to train: TRL's DPOConfig settings under their usual names."""

    beta: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=100.0,
            description="DPO's beta: how far the tuned model may move from the base; higher "
            "keeps it closer (typically 0.01-0.5).",
        ),
    ] = DEFAULT_BETA
    loss_type: Annotated[
        LossType,
        msgspec.Meta(description="TRL's DPO loss; `sigmoid` is the original DPO loss."),
    ] = LossType.sigmoid
    label_smoothing: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            lt=0.5,
            description="Assumed share of wrong preference labels (conservative DPO). Read "
            "only by loss_type exo_pair (needs > 0), robust, aot and aot_unpaired; refused with "
            "any other loss type.",
        ),
    ] = 0.0
    learning_rate: Annotated[
        float, msgspec.Meta(gt=0.0, le=1.0, description="Peak learning rate of the LoRA weights.")
    ] = 5e-6
    num_epochs: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=100.0,
            description="Passes over the training rows; fractions stop part-way. max_steps "
            "overrides it, so setting both is refused.",
        ),
    ] = DEFAULT_NUM_EPOCHS
    max_steps: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=1_000_000,
                description="Optimizer steps to train for, overriding num_epochs; null: num_epochs "
                "decides.",
            ),
        ]
        | None
    ) = None
    batch_size: Annotated[
        int,
        msgspec.Meta(ge=1, le=1024, description="Preference pairs per device per forward pass."),
    ] = 1
    gradient_accumulation_steps: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=1024,
            description="Forward passes per optimizer step: the effective batch is batch_size x "
            "this x devices.",
        ),
    ] = 8
    warmup_ratio: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            lt=1.0,
            description="Share of all steps over which the learning rate rises from 0 to its peak.",
        ),
    ] = 0.1
    lr_scheduler: Annotated[
        Literal["linear", "cosine", "constant", "constant_with_warmup"],
        msgspec.Meta(description="How the learning rate goes from its peak after warmup."),
    ] = "linear"
    weight_decay: Annotated[
        float, msgspec.Meta(ge=0.0, le=1.0, description="AdamW weight decay; 0 turns it off.")
    ] = 0.0
    max_grad_norm: Annotated[
        float,
        msgspec.Meta(gt=0.0, le=1000.0, description="Gradients are clipped to this norm."),
    ] = 1.0
    max_length: Annotated[
        int,
        msgspec.Meta(
            ge=16,
            le=131072,
            description="Tokens of prompt plus response per row; longer completions are cut, and "
            "a row whose prompt alone reaches it, whose completions are cut to fewer than 8 "
            "tokens, or whose chosen and rejected become identical once cut is dropped (counted "
            "in the job's `data`).",
        ),
    ] = 1024
    seed: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=2**31 - 1,
            description="Seeds the LoRA initialization, data order and eval split: the same "
            "seed repeats a run.",
        ),
    ] = 42
    gradient_checkpointing: Annotated[
        bool,
        msgspec.Meta(
            description="Recompute activations in the backward pass: much less memory, "
            "slower steps."
        ),
    ] = True
    logging_steps: Annotated[
        int,
        msgspec.Meta(
            ge=1, le=10_000, description="Record a metric point every this many optimizer steps."
        ),
    ] = 1
    eval_steps: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=1_000_000,
                description="Also evaluate every N steps (the eval set is always evaluated at "
                "the end); needs an eval set: eval_fraction > 0 or eval_dataset_id.",
            ),
        ]
        | None
    ) = None
    checkpoint_steps: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=1_000_000,
            description="Save a checkpoint every this many steps; a job re-queued after its "
            "worker was lost resumes from the last one.",
        ),
    ] = 50
    optimizer: Annotated[
        Literal["adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"],
        msgspec.Meta(
            description="The optimizer; the paged and 8-bit ones save GPU memory (a CPU worker "
            "uses adamw_torch)."
        ),
    ] = "adamw_torch"
    bf16: Annotated[
        bool,
        msgspec.Meta(
            description="Mixed precision in bf16: needs an Ampere-or-newer GPU; refused on a CPU "
            "worker."
        ),
    ] = False

    def __post_init__(self) -> None:
        # Each rule refuses a value the trainer would silently ignore, naming what to change.
        loss = self.loss_type.value
        if self.loss_type == LossType.exo_pair and self.label_smoothing <= 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (e.g. 1e-3)")
        if self.label_smoothing > 0 and self.loss_type not in LABEL_SMOOTHING_LOSSES:
            raise ValueError(
                f"label_smoothing has no effect with loss_type {loss!r} (TRL reads it only in "
                "exo_pair, robust, aot and aot_unpaired): set label_smoothing to 0, or use "
                "loss_type 'robust' to train on noisy preference labels"
            )
        if self.beta != DEFAULT_BETA and self.loss_type in BETA_FREE_LOSSES:
            raise ValueError(
                f"beta has no effect with loss_type {loss!r}: leave beta at its default "
                f"({DEFAULT_BETA}) or choose a preference loss such as 'sigmoid'"
            )
        if self.max_steps is not None and self.num_epochs != DEFAULT_NUM_EPOCHS:
            raise ValueError(
                "num_epochs has no effect when max_steps is set (training stops at max_steps "
                "whatever the epoch): set only one of them"
            )


class Lora(Strict):
    """The LoRA adapter that is trained (peft's LoraConfig); the base weights stay frozen."""

    r: Annotated[
        int,
        msgspec.Meta(
            ge=1, le=1024, description="Rank of the adapter matrices: its capacity and size."
        ),
    ] = 16
    alpha: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=4096.0,
            description="Scale of the adapter's update (applied as alpha / r); often 2 x r.",
        ),
    ] = 32.0
    dropout: Annotated[
        float, msgspec.Meta(ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    ] = 0.05
    target_modules: Annotated[
        Literal["all-linear"]
        | Annotated[
            list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.]{1,64}$")]],
            msgspec.Meta(min_length=1, max_length=64),
        ],
        msgspec.Meta(
            description="Layers that get an adapter: `all-linear` (every linear layer but the "
            "output head) or module names such as `q_proj`."
        ),
    ] = "all-linear"


class Quantization(Strict):
    """How the frozen base model is loaded (bitsandbytes)."""

    bits: Annotated[
        Literal[4, 8] | None,
        msgspec.Meta(
            description="4 = QLoRA (NF4/FP4), 8 = LLM.int8, null = LoRA on unquantized weights."
        ),
    ] = 4
    quant_type: Annotated[
        Literal["nf4", "fp4"],
        msgspec.Meta(description="The 4-bit data type; NF4 is QLoRA's. Ignored unless bits is 4."),
    ] = "nf4"
    double_quant: Annotated[
        bool,
        msgspec.Meta(
            description="Quantize the quantization constants too: about 0.4 bits per weight "
            "saved. 4-bit only."
        ),
    ] = True
    compute_dtype: Annotated[
        Literal["bfloat16", "float16", "float32"],
        msgspec.Meta(
            description="Precision the quantized weights are computed in; float32 without "
            "quantization (and on a CPU worker)."
        ),
    ] = "bfloat16"


class ChatTemplate(Strict):
    """Whether rows are rendered with the base model's chat template before training."""

    apply: Annotated[
        bool,
        msgspec.Meta(
            description="Render rows with the model's chat template (if it has one); false "
            "trains on standard rows as raw text and refuses conversational ones."
        ),
    ] = True
    system_prompt: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=32_768,
                description="System message added to rows that have none; null adds none.",
            ),
        ]
        | None
    ) = None


class HubDestination(Strict, tag="hub", tag_field="type"):
    """A Hugging Face Hub model repository (created if missing)."""

    repo_id: Annotated[
        str, msgspec.Meta(pattern=REPO_ID_RE, description="The repository, `org/name`.")
    ]
    private: Annotated[
        bool, msgspec.Meta(description="Create the repository private (an existing one is kept).")
    ] = True
    revision: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9._/-]{1,128}$",
            description="Branch to commit to (created if missing).",
        ),
    ] = "main"
    credentials: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^[a-z0-9_-]{1,32}$",
                description="Name of a token the workers hold (FTUNE_HF_TOKEN_<NAME>); null means "
                "HF_TOKEN.",
            ),
        ]
        | None
    ) = None


class S3Destination(Strict, tag="s3", tag_field="type"):
    """An S3 prefix, written with the workers' S3 credentials."""

    uri: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/[^\s]*)?$",
            description="`s3://bucket/prefix/`: the artifacts go under it.",
        ),
    ]


class StoreDestination(Strict, tag="store", tag_field="type"):
    """The service's own blob store, under the job's prefix."""


Destination = HubDestination | S3Destination | StoreDestination


class Output(Strict):
    """What the job produces and where it goes."""

    artifacts: Annotated[
        Literal["adapter", "merged", "both"],
        msgspec.Meta(
            description="`adapter`: the LoRA weights alone (small; load them on the base); "
            "`merged`: the base with the adapter merged in, in 16-bit; `both`."
        ),
    ] = "adapter"
    destination: Annotated[
        Destination,
        msgspec.Meta(
            description="Where the artifacts are published, chosen by `type`: `hub`, `s3`, or "
            "`store` (the service's own blob store, the default)."
        ),
    ] = msgspec.field(default_factory=StoreDestination)


class JobTemplate(Strict):
    """Everything of a job but its dataset: what a retraining policy runs on each snapshot."""

    base_model: Annotated[
        str,
        msgspec.Meta(
            min_length=3,
            max_length=512,
            description="`org/name` or `hf://org/name` (Hub), `s3://bucket/prefix/`, or "
            "`file:///abs/path` inside the workers' models dir.",
        ),
    ]
    revision: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^[A-Za-z0-9._/-]{1,128}$",
                description="Branch, tag or commit of a Hub base_model; null: its default branch.",
            ),
        ]
        | None
    ) = None
    eval_dataset_id: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^ds_[A-Za-z0-9]{1,64}$",
                description="A dataset of the same format to evaluate on; null: eval_fraction of "
                "the training rows is held out instead.",
            ),
        ]
        | None
    ) = None
    eval_fraction: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=0.5,
            description="Share of the training rows held out for evaluation (seeded) when no "
            "eval_dataset_id is given; 0 evaluates nothing.",
        ),
    ] = 0.05
    method: Annotated[
        Literal["dpo"], msgspec.Meta(description="The training method: DPO on preference pairs.")
    ] = "dpo"
    hyperparameters: Annotated[
        Hyperparameters, msgspec.Meta(description="How to train; every field has a default.")
    ] = msgspec.field(default_factory=Hyperparameters)
    lora: Annotated[Lora, msgspec.Meta(description="The adapter that is trained.")] = msgspec.field(
        default_factory=Lora
    )
    quantization: Annotated[
        Quantization, msgspec.Meta(description="How the frozen base model is loaded.")
    ] = msgspec.field(default_factory=Quantization)
    chat_template: Annotated[
        ChatTemplate, msgspec.Meta(description="How rows are rendered into the model's text.")
    ] = msgspec.field(default_factory=ChatTemplate)
    output: Annotated[
        Output, msgspec.Meta(description="What the job produces and where it is published.")
    ] = msgspec.field(default_factory=Output)
    eval_prompts: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]],
        msgspec.Meta(
            max_length=32,
            description="Prompts answered by the base and the tuned model after training, "
            "side by side in the job's eval_generations.",
        ),
    ] = msgspec.field(default_factory=list)
    labels: Annotated[
        dict[Annotated[str, msgspec.Meta(pattern=LABEL_KEY_RE)], Label],
        msgspec.Meta(
            max_length=32,
            description="Your own key/value tags (e.g. `team`); filter jobs by them with "
            "`?label=key=value`.",
        ),
    ] = msgspec.field(default_factory=dict)
    webhook_url: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^https?://[^\s]+$",
                max_length=2048,
                description="Receives a signed POST when the job ends (succeeded, failed or "
                "cancelled); null: none.",
            ),
        ]
        | None
    ) = None
    webhook_format: Annotated[
        Literal["ftune", "openai"],
        msgspec.Meta(
            description="The body of the job's webhook: ftune's event (`job.succeeded`, ... "
            "with the record's outcome) or OpenAI's (`fine_tuning.job.succeeded`, ... with the "
            "job id), which the OpenAI-compatible API sets."
        ),
    ] = "ftune"
    max_new_tokens: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=4096,
            description="Length in tokens of the before/after generations for `eval_prompts`.",
        ),
    ] = 64

    def __post_init__(self) -> None:
        if not MODEL_REF_RE.match(self.base_model):
            raise ValueError(
                "base_model must be 'org/name', 'hf://org/name', 's3://bucket/prefix' "
                f"or 'file:///abs/path', got {self.base_model!r}"
            )
        if self.revision is not None and not _is_hub_ref(self.base_model):
            raise ValueError("revision applies only to a Hub base_model")
        no_eval_set = self.eval_dataset_id is None and self.eval_fraction == 0
        if self.hyperparameters.eval_steps is not None and no_eval_set:
            raise ValueError(
                "hyperparameters.eval_steps has no effect without an eval set: set eval_fraction "
                "> 0 or eval_dataset_id, or remove eval_steps"
            )
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
    """A fine-tuning job: a template and the dataset to train on."""

    dataset_id: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^ds_[A-Za-z0-9]{1,64}$",
            description="The training dataset, as returned by `POST /v1/datasets`.",
        ),
    ]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_dataset_id is not None and self.eval_dataset_id == self.dataset_id:
            raise ValueError("eval_dataset_id must differ from dataset_id")


def _is_hub_ref(ref: str) -> bool:
    return not ref.startswith(("s3://", "file://"))


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


class Artifact(msgspec.Struct, kw_only=True):
    """A published result: its files and their checksums."""

    kind: Annotated[
        Literal["adapter", "merged"],
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
            "job whose worker was lost goes back to queued."
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
            description="0 for the first run; +1 each time a lost worker's job is re-queued "
            "(it resumes from its last checkpoint)."
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


def local_model_path(ref: str, models_dir: Path) -> Path:
    """The directory a `file://` base_model names, refused unless it lies inside models_dir.

    Shared by the API (422 at submit) and the worker (checked again where it loads).
    """
    path = Path(ref.removeprefix("file://")).resolve()
    root = models_dir.resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"base_model {ref!r} is outside the workers' models dir ({root})")
    return path
