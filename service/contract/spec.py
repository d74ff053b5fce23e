"""The contract of a job spec: what a user submits (and a policy templates); bounds in types."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from service.contract.base import Strict
from service.contract.init_from import InitFrom
from service.contract.integrations import Integrations

# Patterns end in `(?!\n)$`: Python's `$` also matches before a final newline (a name
# "x\n" would pass), and `\Z` is not a JSON Schema (ECMA-262) regex; this reads alike in both.
REPO_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?!\n)$"
MODEL_REF_RE = re.compile(
    r"^(?:(?:hf://)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
    r"|s3://[a-z0-9][a-z0-9.-]{1,62}(?:/[^\s]*)?"
    r"|file:///[^\s]+)(?!\n)$"
)
LABEL_KEY_RE = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?(?!\n)$"

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Label = Annotated[str, msgspec.Meta(max_length=63)]


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


SORTED_LOSSES = frozenset({LossType.aot, LossType.aot_unpaired})
"""The loss types that sort rewards across a batch's rows: with one row, sigmoid DPO."""


BETA_FREE_LOSSES = frozenset({LossType.sft})
"""The loss types whose TRL formula does not read beta."""


DEFAULT_BETA = 0.1
DEFAULT_BETAS = {"simpo": 2.0}
"""Methods whose default beta is not DEFAULT_BETA."""


DEFAULT_NUM_EPOCHS = 1.0


MAX_LEARNING_RATE = 1.0

DEFAULT_LEARNING_RATES: dict[str, float] = {
    "sft": 2e-4,
    "dpo": 5e-6,
    "kto": 5e-6,
    "orpo": 5e-6,
    "simpo": 5e-6,
}
"""Each method's learning rate when a spec leaves it out: those of the QLoRA recipes of the
alignment handbook (SFT 2e-4, DPO 5e-6). One rate for all was 5e-6, which left a LoRA SFT
adapter nearly where it started."""


Method = Literal["dpo", "sft", "kto", "orpo", "simpo"]
"""The training methods; each is a TRL trainer (gpu_worker/methods.py)."""

PREFERENCE_METHODS = frozenset({"dpo", "orpo", "simpo"})
"""The methods that train on chosen/rejected pairs (kto takes pairs too, unpaired by TRL)."""

METHOD_FIELDS: dict[str, frozenset[str]] = {
    "beta": frozenset({"dpo", "kto", "orpo", "simpo"}),
    "loss_type": frozenset({"dpo"}),
    "label_smoothing": frozenset({"dpo"}),
    "desirable_weight": frozenset({"kto"}),
    "undesirable_weight": frozenset({"kto"}),
    "simpo_gamma": frozenset({"simpo"}),
    "completion_only_loss": frozenset({"sft"}),
    "precompute_ref_log_probs": frozenset({"dpo"}),
    "packing": frozenset({"sft"}),
    "use_liger_kernel": frozenset({"dpo", "sft", "kto"}),
}
"""The hyperparameters that belong to some methods only: set on another, they are refused."""

METHOD_KINDS: dict[str, frozenset[str]] = {
    "dpo": frozenset({"preference"}),
    "orpo": frozenset({"preference"}),
    "simpo": frozenset({"preference"}),
    "kto": frozenset({"unpaired", "preference"}),
    "sft": frozenset({"sft"}),
}
"""The dataset kinds each method trains on (kto unpairs preference pairs, as TRL does)."""


def trained_by(kind: str) -> list[str]:
    """The methods that train on a dataset of `kind`."""
    return [method for method, kinds in METHOD_KINDS.items() if kind in kinds]


def kind_mismatch(method: str, kind: str) -> str | None:
    """Why `method` cannot train on a dataset of `kind`, saying what to do; None if it can."""
    if kind in METHOD_KINDS[method]:
        return None
    if method == "sft" and kind == "preference":
        return (
            "method 'sft' trains on prompt/completion rows, the dataset holds preference pairs: "
            "upload the file again with completion_field=chosen (`ftune datasets upload FILE "
            "--completion-field chosen`) to train on the chosen answers (the rejected ones are "
            "then left out), or use a preference method (dpo, orpo, simpo, kto)"
        )
    if kind == "unpaired":
        return (
            f"method {method!r} needs chosen/rejected pairs, the dataset holds single completions "
            "labelled true or false: use method 'kto'"
        )
    if method == "kto":
        return (
            "method 'kto' needs completions labelled good or bad (or preference pairs), the "
            "dataset holds unlabelled completions: use method 'sft', or upload rows with a "
            "true/false label (label_field)"
        )
    return (
        f"method {method!r} needs chosen/rejected pairs, the dataset holds prompt/completion "
        "rows: use method 'sft'"
    )


class Hyperparameters(Strict):
    """How to train: TRL's config settings under their usual names (some per method)."""

    beta: (
        Annotated[
            float,
            msgspec.Meta(
                gt=0.0,
                le=100.0,
                description="dpo, kto: how far the tuned model may move from the base; higher "
                "keeps it closer (typically 0.01-0.5). orpo: the weight of the odds-ratio term "
                "(lambda). simpo: the reward scale (the SimPO paper uses 2-2.5). Not for sft. "
                "Left out: 2.0 for simpo, else 0.1, which the job's record then shows.",
            ),
        ]
        | None
    ) = None
    loss_type: Annotated[
        LossType,
        msgspec.Meta(description="dpo only: TRL's DPO loss; `sigmoid` is the original DPO loss."),
    ] = LossType.sigmoid
    label_smoothing: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            lt=0.5,
            description="dpo only: assumed share of wrong preference labels (conservative "
            "DPO). Read only by loss_type exo_pair (needs > 0), robust, aot and aot_unpaired; "
            "refused with any other loss type.",
        ),
    ] = 0.0
    desirable_weight: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=100.0,
            description="kto only: weight of the losses of desirable (label true) rows; raise "
            "it when they are fewer than the undesirable ones.",
        ),
    ] = 1.0
    undesirable_weight: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            le=100.0,
            description="kto only: weight of the losses of undesirable (label false) rows.",
        ),
    ] = 1.0
    simpo_gamma: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=100.0,
            description="simpo only: the target reward margin between chosen and rejected "
            "(the SimPO paper's gamma).",
        ),
    ] = 0.5
    completion_only_loss: Annotated[
        bool,
        msgspec.Meta(
            description="sft only: train on the completions alone (true) or on the prompts "
            "as well (false)."
        ),
    ] = True
    learning_rate: (
        Annotated[
            float,
            msgspec.Meta(
                gt=0.0,
                le=MAX_LEARNING_RATE,
                description="Peak learning rate of the LoRA weights; left out: the method's "
                "default (2e-4 for sft, 5e-6 for the preference methods), which the job's record "
                "then shows.",
            ),
        ]
        | None
    ) = None
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
        msgspec.Meta(
            ge=1,
            le=1024,
            description="Rows (pairs, for preference methods) per device per forward pass. "
            "kto needs 2 or more: with it, 1 becomes 2 and gradient_accumulation_steps is halved "
            "(when even), the same rows a step.",
        ),
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

    precompute_ref_log_probs: Annotated[
        bool,
        msgspec.Meta(
            description="dpo only: compute the reference log-probs of every row in one pass "
            "before training (and of the eval rows), instead of one extra no-gradient forward "
            "per step. Off by default: with LoRA the reference is the base with the adapter "
            "disabled, so it saves no memory, and a one-epoch job (the default) runs the same "
            "reference forwards either way, only all up front, and again after every resume "
            "(bench/README.md, cost cutters). Worth it for several epochs.",
        ),
    ] = False
    packing: Annotated[
        bool,
        msgspec.Meta(
            description="sft only: pack rows into sequences of max_length tokens without "
            "padding (TRL's best-fit packing, padding-free; a row never attends to another). "
            "Fewer wasted tokens when rows differ in length, but batch_size then counts packed "
            "sequences, not rows: a job makes fewer, larger steps. Off by default for that "
            "reason (the same settings keep meaning the same steps).",
        ),
    ] = False
    use_liger_kernel: Annotated[
        bool,
        msgspec.Meta(
            description="dpo, sft, kto: Liger's Triton kernels for the model's layers (RMSNorm, "
            "RoPE, SwiGLU: less activation memory, somewhat faster). GPU only, and the worker "
            "image must have `liger-kernel` installed: refused otherwise, by the worker. TRL "
            "1.16 already computes the loss through its own chunked LM head, so Liger's fused "
            "linear loss is not used. Checked on paper only (no GPU in CI). Off by default.",
        ),
    ] = False
    torch_compile: Annotated[
        bool,
        msgspec.Meta(
            description="Compile the model with torch.compile before training. Off by "
            "default: compiling takes minutes, which dominates short fine-tuning jobs, and "
            "bitsandbytes' 4-bit layers break the graph into pieces. A CPU worker turns it off "
            "(saying so). Checked on paper only for GPUs.",
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
        if self.beta not in (None, DEFAULT_BETA) and self.loss_type in BETA_FREE_LOSSES:
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
            list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.]{1,64}(?!\n)$")]],
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


class Parallelism(Strict):
    """How a job uses a worker's several GPUs (`FTUNE_WORKER_GPUS`, the chart's
    `worker.gpu.count`); on a one-GPU worker both strategies train in one process."""

    strategy: Annotated[
        Literal["ddp", "fsdp"],
        msgspec.Meta(
            description="`ddp`: one process per GPU, each with a whole copy of the (4-bit) "
            "base, gradients averaged. `fsdp`: the same processes, with the base's weights and "
            "the adapter's optimizer state sharded across the GPUs (FSDP-QLoRA, for a base "
            "whose 4-bit weights do not fit one GPU; GPU workers only, 4-bit or unquantized). "
            "Either way `hyperparameters.batch_size` is per GPU: an optimizer step sees "
            "batch_size * gradient_accumulation_steps * GPUs rows."
        ),
    ] = "ddp"


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
            pattern=r"^[A-Za-z0-9._/-]{1,128}(?!\n)$",
            description="Branch to commit to (created if missing).",
        ),
    ] = "main"
    credentials: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^[a-z0-9_-]{1,32}(?!\n)$",
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
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/[^\s]*)?(?!\n)$",
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
                pattern=r"^[A-Za-z0-9._/-]{1,128}(?!\n)$",
                description="Branch, tag or commit of a Hub base_model; null: its default branch.",
            ),
        ]
        | None
    ) = None
    eval_dataset_id: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^ds_[A-Za-z0-9]{1,64}(?!\n)$",
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
        Method,
        msgspec.Meta(
            description="The training method: `dpo` (preference pairs), `sft` (prompt and "
            "completion, or chat messages), `kto` (completions labelled good or bad; pairs "
            "too), `orpo` and `simpo` (pairs, no reference model)."
        ),
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
    priority: Annotated[
        int,
        msgspec.Meta(
            ge=-100,
            le=100,
            description="Order among your own queued jobs: higher starts first, equal ones in "
            "the order they were submitted. It never moves a job ahead of other tenants' "
            "(tenants take turns; see How fairness works in docs/architecture.md).",
        ),
    ] = 0
    webhook_url: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^https?://[^\s]+(?!\n)$",
                max_length=2048,
                description="Receives a signed POST when the job ends (succeeded, failed or "
                "cancelled); in a policy's template, also one per run the gate decides "
                "(`policy.run.promoted` or `policy.run.rejected`); null: none.",
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
    init_from: Annotated[
        InitFrom | None,
        msgspec.Meta(
            description="Continue training an existing LoRA adapter (an earlier job's, or one "
            "on the Hub or in S3) instead of a fresh one, e.g. DPO after SFT; it keeps its own "
            "LoRA settings, so `lora` must be left out (or, with job_id, equal that job's). "
            "null: a fresh adapter."
        ),
    ] = None
    parallelism: Annotated[
        Parallelism,
        msgspec.Meta(
            description="How the job spans the worker's GPUs (all of them, one process each)."
        ),
    ] = msgspec.field(default_factory=Parallelism)
    integrations: Annotated[
        Integrations,
        msgspec.Meta(
            description="Experiment trackers (MLflow, Weights & Biases) the job also reports "
            "to; the workers hold their addresses and credentials."
        ),
    ] = msgspec.field(default_factory=Integrations)

    def __post_init__(self) -> None:
        _check_init_from(self)
        if not MODEL_REF_RE.match(self.base_model):
            raise ValueError(
                "base_model must be 'org/name', 'hf://org/name', 's3://bucket/prefix' "
                f"or 'file:///abs/path', got {self.base_model!r}"
            )
        if self.revision is not None and not _is_hub_ref(self.base_model):
            raise ValueError("revision applies only to a Hub base_model")
        _check_method_fields(self.method, self.hyperparameters)
        self.hyperparameters = _kto_batch(self.method, self.hyperparameters)
        hp = self.hyperparameters
        if hp.learning_rate is None or hp.beta is None:  # the record shows the values used
            self.hyperparameters = msgspec.structs.replace(
                hp, learning_rate=learning_rate_of(self), beta=beta_of(self)
            )
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
        if self.parallelism.strategy == "fsdp" and quant.bits == 8:
            raise ValueError(
                "parallelism.strategy 'fsdp' shards 4-bit (QLoRA) or unquantized weights, not "
                "LLM.int8: use quantization.bits 4, or strategy 'ddp'"
            )
        if self.quantization.bits is None and self.quantization.compute_dtype != "float32":
            # Harmless but meaningless; keep the record honest.
            self.quantization = msgspec.structs.replace(self.quantization, compute_dtype="float32")


class JobSpec(JobTemplate, kw_only=True):
    """A fine-tuning job: a template and the dataset to train on."""

    dataset_id: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^ds_[A-Za-z0-9]{1,64}(?!\n)$",
            description="The training dataset, as returned by `POST /v1/datasets`.",
        ),
    ]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_dataset_id is not None and self.eval_dataset_id == self.dataset_id:
            raise ValueError("eval_dataset_id must differ from dataset_id")


def _check_init_from(template: JobTemplate) -> None:
    # An adapter's rank and targets are fixed when it is made; `lora` would silently do nothing.
    # (With job_id the API compares `lora` with that job's, which it can read.)
    init = template.init_from
    if init is not None and init.adapter is not None and template.lora != Lora():
        raise ValueError(
            "lora has no effect with init_from.adapter (the adapter keeps its own r, alpha and "
            "target modules): leave lora out"
        )


_HYPERPARAMETER_DEFAULTS = Hyperparameters()


def _check_method_fields(method: str, hp: Hyperparameters) -> None:
    """Refuse a hyperparameter set away from its default on a method that never reads it."""
    for field, methods in METHOD_FIELDS.items():
        value = getattr(hp, field)
        if field == "beta" and value == DEFAULT_BETA:
            continue  # every record holds a beta: sft's is the default, never read
        if method not in methods and value != getattr(_HYPERPARAMETER_DEFAULTS, field):
            users = ", ".join(sorted(methods))
            raise ValueError(
                f"hyperparameters.{field} does not apply to method {method!r} (only to "
                f"{users}): remove it, or choose one of those methods"
            )


def _kto_batch(method: str, hp: Hyperparameters) -> Hyperparameters:
    """kto estimates its KL term from the other rows of a batch, so TRL refuses batch_size 1:
    the default (1 row x 8 accumulation steps) becomes 2 x 4, the same rows a step."""
    if method != "kto" or hp.batch_size > 1 or hp.gradient_accumulation_steps % 2:
        return hp
    steps = hp.gradient_accumulation_steps // 2
    return msgspec.structs.replace(hp, batch_size=2, gradient_accumulation_steps=steps)


class Untrainable(ValueError):
    """A spec TRL would refuse only once the model is loaded, or train as something else;
    `field` is its path in the spec (e.g. `hyperparameters.batch_size`)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field


def check_trainable(spec: JobTemplate, processes: int) -> None:
    """Untrainable for what would fail or change meaning in `processes` training processes
    (a worker's GPUs). Checked when a job or a policy's template is submitted and by the
    worker before it downloads anything, never when a stored record is read: a record made
    before a rule existed must still load."""
    hp, method = spec.hyperparameters, spec.method
    if method == "kto" and hp.batch_size < 2:
        raise Untrainable(
            "hyperparameters.batch_size",
            "method 'kto' needs hyperparameters.batch_size 2 or more: TRL estimates its KL term "
            "from the other rows of a batch (with an even gradient_accumulation_steps, batch_size "
            "1 becomes 2 and the steps are halved; with an odd one, set batch_size yourself)",
        )
    if method == "dpo" and hp.loss_type in SORTED_LOSSES and hp.batch_size < 2:
        raise Untrainable(
            "hyperparameters.batch_size",
            f"loss_type {hp.loss_type.value!r} sorts the rewards across the rows of a batch: "
            "with batch_size 1 it is plain sigmoid DPO; set hyperparameters.batch_size to 2 or "
            "more (larger is closer to the paper)",
        )
    if method in ("dpo", "kto") and "lm_head" in list(spec.lora.target_modules):
        raise Untrainable(
            "lora.target_modules",
            f"lora.target_modules: method {method!r} computes its log-probabilities from the "
            "output head's own weights, so an adapter on 'lm_head' would never train (TRL "
            "refuses it); remove 'lm_head'",
        )
    if processes > 1 and hp.precompute_ref_log_probs:
        raise Untrainable(
            "hyperparameters.precompute_ref_log_probs",
            "hyperparameters.precompute_ref_log_probs cannot train on workers of several GPUs "
            "yet: TRL writes the reference log-probs to a cache file only rank 0 can find. "
            "Turn it off (each step then runs the reference forward)",
        )


def beta_of(spec: JobTemplate) -> float:
    """The spec's beta: its own, else its method's default (SimPO's paper uses 2-2.5: at 0.1
    its loss moved about 25 times less)."""
    hp = spec.hyperparameters
    return hp.beta if hp.beta is not None else DEFAULT_BETAS.get(spec.method, DEFAULT_BETA)


def learning_rate_of(spec: JobTemplate) -> float:
    """The spec's learning rate: its own, else its method's default."""
    return spec.hyperparameters.learning_rate or DEFAULT_LEARNING_RATES[spec.method]


def _is_hub_ref(ref: str) -> bool:
    return not ref.startswith(("s3://", "file://"))


def local_model_path(ref: str, models_dir: Path) -> Path:
    """The directory a `file://` base_model names, refused unless it lies inside models_dir.

    Shared by the API (422 at submit) and the worker (checked again where it loads).
    """
    path = Path(ref.removeprefix("file://")).resolve()
    root = models_dir.resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"base_model {ref!r} is outside the workers' models dir ({root})")
    return path
