"""Find the base model, load it (4-bit NF4 by default) and describe the LoRA adapter to train.

Only the training child process imports this module, so the heavy libraries are imported at the
top of the functions that need them (keeping `import gpu_worker.model` cheap for tests and tools).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import ConfigError, ModelLoadError
from service.contract import JobSpec, local_model_path
from service.settings import Settings

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

HUB_IGNORE_PATTERNS = ["*.onnx", "*.h5", "*.msgpack", "*.gguf", "*.ot", "onnx/*", "original/*"]
"""Weights in formats transformers does not load here; a Hub repo often carries several."""


def resolve_model(ref: str, revision: str | None, *, settings: Settings, workdir: Path) -> Path:
    """The local folder holding `ref` (`org/name`, `hf://org/name`, `s3://...` or `file://...`).

    Hub models go to the Hub cache (under settings.hf_home), S3 models to `workdir/base-model`,
    local ones are used in place. Every failure is a ModelLoadError (or ConfigError for a
    `file://` path outside the models dir) that says what to check.
    """
    if ref.startswith("file://"):
        path = _local_model(ref, settings)
    elif ref.startswith("s3://"):
        path = download_s3(ref, settings, workdir / "base-model")
    else:
        path = download_hub(ref.removeprefix("hf://"), revision, settings)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"base model {ref!r} is not a transformers model folder (no config.json in it): "
            "point base_model at the folder that save_pretrained wrote"
        )
    return path


def _local_model(ref: str, settings: Settings) -> Path:
    try:
        path = local_model_path(ref, settings.models_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not path.is_dir():
        raise ModelLoadError(
            f"base model {ref!r} does not exist on this worker: copy the model folder to {path} "
            f"(inside the workers' models dir {settings.models_dir}) or use a Hub id"
        )
    return path


def download_s3(ref: str, settings: Settings, dest: Path, *, what: str = "base model") -> Path:
    from service.blobs import BlobNotFound, open_store

    try:
        store = open_store(ref.rstrip("/"), endpoint_url=settings.s3_endpoint_url)
        try:
            store.download_dir("", dest)
        finally:
            store.close()
    except BlobNotFound:
        raise ModelLoadError(
            f"{what} {ref!r}: nothing is stored under that S3 prefix; check the bucket and "
            "prefix (it must hold the files save_pretrained wrote)"
        ) from None
    except Exception as exc:  # boto3 raises many types: credentials, access, endpoint
        raise ModelLoadError(
            f"{what} {ref!r} could not be downloaded from S3 "
            f"(endpoint {settings.s3_endpoint_url or 'AWS'}): {exc}. Check the uri and that the "
            "worker's S3 credentials can read it"
        ) from exc
    return dest


def download_hub(
    repo_id: str,
    revision: str | None,
    settings: Settings,
    *,
    what: str = "base model",
    subfolder: str = "",
) -> Path:
    """A snapshot of the repo (only `subfolder` of it, if given) in the Hub cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = settings.hf_endpoint or constants.ENDPOINT
    where = f"on the Hub ({endpoint})"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            endpoint=settings.hf_endpoint,
            token=settings.hf_tokens.get("") or False,
            cache_dir=settings.hf_home / "hub" if settings.hf_home else None,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            allow_patterns=f"{subfolder}/*" if subfolder else None,
        )
    except GatedRepoError:
        raise ModelLoadError(
            f"{what} {repo_id!r} is gated {where}: accept its terms with the account whose "
            "token the workers hold (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{what} {repo_id!r} was not found {where}: check the id, and that the worker's "
            "HF token can read it if it is private"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"revision {revision!r} of {what} {repo_id!r} was not found {where}: check the "
            "branch, tag or commit"
        ) from None
    except (LocalEntryNotFoundError, OSError) as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ModelLoadError(
            f"{what} {repo_id!r} could not be downloaded from the Hub ({endpoint}): {cause}. "
            "Check the worker's network access to the Hub (HF_ENDPOINT)"
        ) from exc
    return Path(folder) / subfolder if subfolder else Path(folder)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def build_quantization_config(spec: JobSpec, *, sharded: bool = False) -> BitsAndBytesConfig | None:
    """bitsandbytes settings from the spec: NF4/FP4 4-bit, LLM.int8, or None for plain LoRA.

    `sharded` (FSDP): the packed 4-bit weights are stored in the compute dtype instead of
    uint8, because FSDP shards only float tensors (FSDP-QLoRA; checked on paper only).
    """
    from transformers import BitsAndBytesConfig

    quant = spec.quantization
    if quant.bits == 4:
        extra = {"bnb_4bit_quant_storage": torch_dtype(quant.compute_dtype)} if sharded else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
            **extra,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def build_lora_config(spec: JobSpec) -> LoraConfig:
    from peft import LoraConfig

    lora = spec.lora
    alpha: float = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return LoraConfig(
        r=lora.r,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (the eos one if it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"the base model's tokenizer could not be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the base model's tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: Path, spec: JobSpec, device: str, *, local_rank: int = 0, sharded: bool = False
) -> PreTrainedModel:
    """Load the base for training on `device` ("cpu" or "cuda"), quantized as the spec says.

    `spec` must already be adapted to the device (see `trainer.adapt_to_device`). Under data
    parallelism each process loads a whole copy on its own GPU (`local_rank`); under FSDP
    (`sharded`) without a device map, so that accelerate loads it on rank 0 and shards it.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.quantization.compute_dtype)}
    if not sharded:
        kwargs["device_map"] = {"": "cpu" if device == "cpu" else local_rank}
    quantization_config = build_quantization_config(spec, sharded=sharded)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"the base model could not be loaded as a causal LM: {exc}") from exc
    disable_bnb_cpu_repacking(model)
    return model


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from silently breaking gradients on CPUs with AVX512-BF16.

    On such CPUs a 4-bit layer's first eval-mode forward without gradients (evaluation,
    reference log-probs, generation) repacks its weight into an inference-only layout, after
    which no gradient flows through it, even back in train mode. Returns the layers changed.
    """
    from bitsandbytes.nn.modules import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
