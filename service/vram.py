"""How much GPU memory a job needs, on paper: arithmetic over the base model's shape, no torch.

The API uses it to refuse at submit a job that cannot fit the workers' GPUs (`check_fits`,
with `FTUNE_WORKER_GPU_MEMORY_GB`); `bench/vram.py` sets it beside published figures.

The shape comes from a built-in table of well-known models, from the config.json of a local
(`file://`) model, or from the size in the name ("7B", "0.5B", "135M") with the proportions of
the known model nearest in size. Anything else (and mixture-of-experts models) is unknown:
no estimate, no check.

What is counted, for TRL 1.16's DPOTrainer training a PEFT LoRA adapter (one GPU):

- base weights: the decoder's linear layers at 4 bits (NF4/FP4: one absmax per block of 64,
  fp32, or with double quantization 8-bit absmaxes plus one fp32 constant per 256 blocks) or
  8 bits (plus an fp32 scale per output row) or unquantized; embeddings, the LM head and the
  norms stay in the compute dtype (bitsandbytes converts only the decoder's linear layers);
- the adapter: r * (in + out) per targeted linear layer, with its gradients and optimizer
  states. TRL casts the adapter of a quantized model to bf16 (2 + 2 bytes, AdamW states in the
  same dtype 2 * 2, 8-bit optimizers 2 * 1); an unquantized model's adapter is fp32 (4 + 4 + 8);
- activations: DPO, ORPO and SimPO run chosen and rejected together, KTO a completion and
  its KL completion, so 2 * batch_size sequences of up to max_length tokens; SFT one
  sequence a row. The reference model (DPO, KTO) is the base with the adapter disabled, run
  without gradients: no second copy of the weights, no activations kept (ORPO, SimPO and SFT
  have none at all). Per token and layer autograd keeps about 7h + 2kv + 4I values (norm
  inputs and outputs, q/k/v/attention output, the SwiGLU gate, up, activation and product;
  SDPA attention, no seq^2 term), plus each targeted layer's dropout copy and mask when
  lora.dropout > 0. With gradient checkpointing only each layer's input is kept, and one layer
  is recomputed at a time. bitsandbytes dequantizes one weight at a time (the largest counts);
- the LM head: TRL computes log-probs in tiles (4096 tokens by 32768 vocabulary entries), so
  the logits are never whole;
- overhead: the CUDA context and library workspaces (0.5 GiB) and the caching allocator's
  slack on short-lived tensors (10% of activations, tiles and transients).

Per GPU of a worker with several (`gpus`, `parallelism`): under DDP every GPU holds all of the
above for its own `batch_size` rows (the batch is per GPU), plus DDP's gradient buckets (one
more copy of the adapter's gradients). Under FSDP the base's weights and the adapter with its
gradients and optimizer states are sharded: each GPU keeps 1/gpus of them, plus one decoder
layer gathered whole while it computes (and one prefetched); activations are not sharded.

The result is an estimate (about +-20%), in GiB, which is what GPU makers call GB.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from service.contract import JobTemplate, local_model_path

GIB = 1024**3

CUDA_CONTEXT_BYTES = GIB // 2
"""CUDA context, cuBLAS/cuDNN workspaces and kernels: about 0.3-0.8 GiB on current drivers."""
ALLOCATOR_SLACK = 0.10
"""PyTorch's caching allocator holds more than is live: a share of the short-lived tensors."""
NF4_BLOCK = 64
"""bitsandbytes' 4-bit block size: one absmax per 64 weights."""
DOUBLE_QUANT_BLOCK = 256
"""Double quantization: the absmaxes in 8 bits, one fp32 constant per 256 of them."""
LM_HEAD_TOKEN_TILE = 4096
LM_HEAD_VOCAB_TILE = 32768
"""TRL 1.16's chunked log-prob LM head works on tiles of this many tokens by vocabulary entries."""

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder layer's linear layers (Llama, Mistral, Qwen2 naming); `all-linear` targets all."""

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder (SwiGLU MLP, grouped-query attention)."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @property
    def kv_size(self) -> int:
        """Width of the key (and value) projection."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        return self.num_key_value_heads * head_dim

    @property
    def q_size(self) -> int:
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        return self.num_attention_heads * head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each linear layer of one decoder layer: name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers: what bitsandbytes quantizes."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return per_layer * self.num_layers

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head unless the two are tied."""
        one = self.vocab_size * self.hidden_size
        return one if self.tie_word_embeddings else 2 * one

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


def _arch(
    name: str, h: int, layers: int, vocab: int, inter: int, heads: int, kv: int, *, tied: bool
) -> Architecture:
    return Architecture(name, h, layers, vocab, inter, heads, kv, tie_word_embeddings=tied)


KNOWN: dict[str, Architecture] = {
    a.name: a
    for a in (
        # From each model's config.json (hidden, layers, vocab, intermediate, heads, kv heads).
        _arch("smollm2-135m", 576, 30, 49152, 1536, 9, 3, tied=True),
        _arch("smollm2-360m", 960, 32, 49152, 2560, 15, 5, tied=True),
        _arch("smollm2-1.7b", 2048, 24, 49152, 8192, 32, 32, tied=True),
        _arch("qwen2.5-0.5b", 896, 24, 151936, 4864, 14, 2, tied=True),
        _arch("qwen2.5-1.5b", 1536, 28, 151936, 8960, 12, 2, tied=True),
        _arch("qwen2.5-3b", 2048, 36, 151936, 11008, 16, 2, tied=True),
        _arch("qwen2.5-7b", 3584, 28, 152064, 18944, 28, 4, tied=False),
        _arch("qwen2.5-14b", 5120, 48, 152064, 13824, 40, 8, tied=False),
        _arch("qwen2.5-32b", 5120, 64, 152064, 27648, 40, 8, tied=False),
        _arch("qwen2.5-72b", 8192, 80, 152064, 29568, 64, 8, tied=False),
        _arch("llama-2-7b", 4096, 32, 32000, 11008, 32, 32, tied=False),
        _arch("llama-2-13b", 5120, 40, 32000, 13824, 40, 40, tied=False),
        _arch("llama-2-70b", 8192, 80, 32000, 28672, 64, 8, tied=False),
        _arch("llama-3.2-1b", 2048, 16, 128256, 8192, 32, 8, tied=True),
        _arch("llama-3.2-3b", 3072, 28, 128256, 8192, 24, 8, tied=True),
        _arch("meta-llama-3-8b", 4096, 32, 128256, 14336, 32, 8, tied=False),
        _arch("llama-3.1-8b", 4096, 32, 128256, 14336, 32, 8, tied=False),
        _arch("meta-llama-3-70b", 8192, 80, 128256, 28672, 64, 8, tied=False),
        _arch("llama-3.1-70b", 8192, 80, 128256, 28672, 64, 8, tied=False),
        _arch("llama-3.3-70b", 8192, 80, 128256, 28672, 64, 8, tied=False),
        _arch("mistral-7b", 4096, 32, 32000, 14336, 32, 8, tied=False),
        _arch("breeze-7b", 4096, 32, 61952, 14336, 32, 8, tied=False),  # Mistral, more vocab
        # phi-2 (2.7B) has a two-layer GELU MLP (fc1, fc2: 2560 x 10240): an intermediate of
        # 6827 in the three-matrix SwiGLU shape gives the same weights.
        _arch("phi-2", 2560, 32, 51200, 6827, 32, 32, tied=False),
    )
}
"""Well-known models by the start of their lowercased repo name (`Qwen2.5-14B-Instruct` is
`qwen2.5-14b`): the shape decides the estimate, so fine-tunes of one base share its entry."""

_SIZE_RE = re.compile(r"(?:^|[-_.])(\d+(?:\.\d+)?)([bm])(?=$|[-_.])", re.IGNORECASE)
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _model_name(ref: str) -> str:
    """The last path component of a model reference, lowercased."""
    return ref.removeprefix("hf://").rstrip("/").rsplit("/", 1)[-1].lower()


def _known(name: str) -> Architecture | None:
    best: Architecture | None = None
    for key, arch in KNOWN.items():
        whole = name.startswith(key) and (len(name) == len(key) or name[len(key)] in "-_.")
        if whole and (best is None or len(key) > len(best.name)):
            best = arch
    return best


def size_from_name(name: str) -> int | None:
    """Parameters named in a model name ("7B" -> 7e9, "135M" -> 1.35e8), if any."""
    match = _SIZE_RE.search(name)
    if match is None:
        return None
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def generic_architecture(params: int, name: str = "") -> Architecture:
    """The known model nearest in size, with as many layers as make up `params`."""
    ref = min(KNOWN.values(), key=lambda a: abs(math.log(a.total_params / params)))
    per_layer = (ref.linear_params + ref.norm_params) / ref.num_layers
    layers = max(1, round((params - ref.embedding_params) / per_layer))
    return Architecture(
        name or f"generic-{params}",
        ref.hidden_size,
        layers,
        ref.vocab_size,
        ref.intermediate_size,
        ref.num_attention_heads,
        ref.num_key_value_heads,
        tie_word_embeddings=ref.tie_word_embeddings,
        head_dim=ref.head_dim,
    )


def architecture_from_config(config: dict[str, object], name: str) -> Architecture | None:
    """The shape from a transformers config.json; None for MoE or incomplete configs."""
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**config, **text}
    if any(config.get(k) for k in _MOE_KEYS):
        return None

    def num(key: str, default: int | None = None) -> int | None:
        value = config.get(key, default)
        return value if isinstance(value, int) and value > 0 else None

    h, layers, vocab = num("hidden_size"), num("num_hidden_layers"), num("vocab_size")
    inter, heads = num("intermediate_size"), num("num_attention_heads")
    if h is None or layers is None or vocab is None or inter is None or heads is None:
        return None
    return Architecture(
        name,
        h,
        layers,
        vocab,
        inter,
        heads,
        num("num_key_value_heads", heads) or heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=num("head_dim"),
    )


def architecture_for(base_model: str, models_dir: Path | None = None) -> Architecture | None:
    """The base model's shape: its config.json (file://), the table, its name's size, or None."""
    if base_model.startswith("file://"):
        if models_dir is None:
            return None
        try:
            config_path = local_model_path(base_model, models_dir) / "config.json"
            config = json.loads(config_path.read_text())
        except (ValueError, OSError):  # outside the models dir, absent, or not JSON
            return None
        if not isinstance(config, dict):
            return None
        return architecture_from_config(config, _model_name(base_model))
    name = _model_name(base_model)
    known = _known(name)
    if known is not None:
        return known
    if re.search(r"\d+x\d", name):  # "8x7B": a mixture of experts, not a dense shape
        return None
    params = size_from_name(name)
    return generic_architecture(params, name) if params else None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of GPU memory at the peak of a training step, by what holds them."""

    architecture: Architecture
    weights: int
    adapter: int
    """LoRA weights, their gradients and the optimizer's states."""
    activations: int
    """Kept for the backward pass, plus the one dequantized weight in flight."""
    lm_head: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.lm_head + self.overhead

    @property
    def total_gb(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        parts = (
            ("weights", self.weights),
            ("adapter+grads+optimizer", self.adapter),
            ("activations", self.activations),
            ("LM head tiles", self.lm_head),
            ("CUDA context+allocator", self.overhead),
        )
        inner = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts)
        return f"about {self.total_gb:.1f} GB ({inner})"


SEQUENCES_PER_ROW = {"dpo": 2, "kto": 2, "orpo": 2, "simpo": 2, "sft": 1}
"""Sequences one row puts through the model in a training step, per method."""


def _targeted(arch: Architecture, target_modules: str | list[str]) -> dict[str, tuple[int, int]]:
    shapes = arch.linear_shapes()
    if target_modules == "all-linear":
        return shapes
    wanted = {t.rsplit(".", 1)[-1] for t in target_modules}
    return {name: shape for name, shape in shapes.items() if name in wanted}


def _outside_bytes(spec: JobTemplate, dtype_bytes: int) -> int:
    """Bytes per parameter of the weights outside the decoder's linears. orpo and simpo are
    TRL's experimental trainers, which prepare a 4/8-bit base with peft's
    `prepare_model_for_kbit_training`: that casts the embeddings, the LM head and the norms to
    float32 (about 2 GB more for a 7B model with a 150k vocabulary), and only bf16 training
    casts the embeddings and head back."""
    upcast = spec.method in ("orpo", "simpo") and spec.quantization.bits is not None
    return 4 if upcast and not spec.hyperparameters.bf16 else dtype_bytes


def _weights(arch: Architecture, spec: JobTemplate, dtype_bytes: int) -> int:
    quant = spec.quantization
    linear = arch.linear_params
    others = _weights_outside_layers(arch, _outside_bytes(spec, dtype_bytes))
    if quant.bits == 4:
        # bytes of quantization constants per block of 64: an fp32 absmax, or (double
        # quantization) an 8-bit one plus an fp32 constant shared by 256 blocks
        per_block = 1 + 4 / DOUBLE_QUANT_BLOCK if quant.double_quant else 4.0
        return int(linear * (0.5 + per_block / NF4_BLOCK)) + others
    if quant.bits == 8:
        rows = sum(out for _, out in arch.linear_shapes().values()) * arch.num_layers
        return linear + 4 * rows + others
    return linear * dtype_bytes + others


def _adapter(arch: Architecture, spec: JobTemplate, *, ddp_buckets: bool = False) -> int:
    targets = _targeted(arch, spec.lora.target_modules)
    params = spec.lora.r * sum(a + b for a, b in targets.values()) * arch.num_layers
    eight_bit = spec.hyperparameters.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    if spec.quantization.bits is not None:  # TRL casts a quantized model's adapter to bf16
        weight, grad, states = 2, 2, (2 if eight_bit else 4)
    else:
        weight, grad, states = 4, 4, (2 if eight_bit else 8)
    return params * (weight + grad + states + (grad if ddp_buckets else 0))


def _activations(arch: Architecture, spec: JobTemplate, d: int) -> tuple[int, int]:
    """(kept for backward + the largest dequantized weight, the LM head's tiles)."""
    hp = spec.hyperparameters
    tokens = SEQUENCES_PER_ROW[spec.method] * hp.batch_size * hp.max_length
    h, kv, inter = arch.hidden_size, arch.kv_size, arch.intermediate_size
    per_token_layer = (7 * h + 2 * kv + 4 * inter) * d
    targets = _targeted(arch, spec.lora.target_modules)
    per_token_layer += spec.lora.r * len(targets) * d  # LoRA A outputs, kept for B's gradient
    if spec.lora.dropout > 0:  # each targeted layer gets its own dropped-out input and mask
        per_token_layer += sum(a for a, _ in targets.values()) * (d + 1)
    one_layer = tokens * per_token_layer
    if hp.gradient_checkpointing:
        kept = arch.num_layers * tokens * h * d + one_layer
    else:
        kept = arch.num_layers * one_layer
    kept += 2 * tokens * h * d  # final norm input and output
    dequantized = 0
    if spec.quantization.bits is not None:
        dequantized = max(a * b for a, b in arch.linear_shapes().values()) * d
    tile = min(tokens, LM_HEAD_TOKEN_TILE) * min(arch.vocab_size, LM_HEAD_VOCAB_TILE) * (d + 4)
    return kept + dequantized, tile


def estimate(
    spec: JobTemplate, models_dir: Path | None = None, *, gpus: int = 1
) -> MemoryEstimate | None:
    """The GPU memory `spec` needs at its peak on each of `gpus` GPUs, or None when the base
    model's shape is unknown."""
    arch = architecture_for(spec.base_model, models_dir)
    if arch is None:
        return None
    return estimate_for(arch, spec, gpus=gpus)


def estimate_for(arch: Architecture, spec: JobTemplate, *, gpus: int = 1) -> MemoryEstimate:
    """The GPU memory `spec` needs on each of `gpus` GPUs when its base model has the shape
    `arch` (see the module's docstring for what DDP and FSDP change)."""
    d = _DTYPE_BYTES[spec.quantization.compute_dtype]
    activations, lm_head = _activations(arch, spec, d)
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * (activations + lm_head))
    weights = _weights(arch, spec, d)
    adapter = _adapter(arch, spec, ddp_buckets=gpus > 1 and spec.parallelism.strategy == "ddp")
    if gpus > 1 and spec.parallelism.strategy == "fsdp":
        gathered = (
            2
            * (weights - _weights_outside_layers(arch, _outside_bytes(spec, d)))
            // arch.num_layers
        )
        weights = weights // gpus + gathered
        adapter = adapter // gpus
    return MemoryEstimate(
        architecture=arch,
        weights=weights,
        adapter=adapter,
        activations=activations,
        lm_head=lm_head,
        overhead=overhead,
    )


def _weights_outside_layers(arch: Architecture, dtype_bytes: int) -> int:
    """The embeddings, LM head and norms: what `_weights` counts besides the decoder's linears
    (the norms inside layers are counted here too; they are a rounding error)."""
    return (arch.embedding_params + arch.norm_params) * dtype_bytes


def check_fits(
    spec: JobTemplate, gpu_memory_gb: float | None, models_dir: Path | None, *, gpus: int = 1
) -> None:
    """Raise ValueError saying what the job needs when it cannot fit the workers' GPUs.

    No limit configured (CPU workers, or the operator chose not to check) or a base model of
    unknown shape: no check.
    """
    if gpu_memory_gb is None:
        return
    found = estimate(spec, models_dir, gpus=gpus)
    if found is None or found.total_gb <= gpu_memory_gb:
        return
    fsdp_hint = (
        f", set parallelism.strategy 'fsdp' to shard the weights across the worker's {gpus} GPUs"
        if gpus > 1 and spec.parallelism.strategy == "ddp"
        else ""
    )
    per_gpu = f" per GPU ({gpus} GPUs)" if gpus > 1 else ""
    raise ValueError(
        f"this job needs {found.describe()} of GPU memory{per_gpu} for "
        f"{found.architecture.name}, more than the workers' {gpu_memory_gb:g} GB: lower "
        "hyperparameters.max_length or batch_size, turn on "
        f"hyperparameters.gradient_checkpointing, use 4-bit quantization{fsdp_hint}, or choose "
        "a smaller base_model"
    )
