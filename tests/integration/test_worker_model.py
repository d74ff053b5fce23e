"""Finding the base model (local dir, Hub, S3) and the configs built from the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker.errors import ConfigError, ModelLoadError
from gpu_worker.model import build_lora_config, build_quantization_config, resolve_model
from service.blobs import open_store
from service.contract import JobSpec
from service.settings import Settings
from tests.fixtures.hub import HubServer
from tests.fixtures.s3 import S3Server


def _spec(**fields: Any) -> JobSpec:
    return msgspec.convert({"base_model": "org/tiny", "dataset_id": "ds_x", **fields}, JobSpec)


def test_file_model_outside_the_models_dir_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path / "models")

    with pytest.raises(ConfigError, match="outside the workers' models dir"):
        resolve_model(tiny_model_dir.as_uri(), None, settings=settings, workdir=tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        ref = f"file://{tmp_path}/models/../elsewhere"
        resolve_model(ref, None, settings=settings, workdir=tmp_path)


def test_file_model_inside_the_models_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=tiny_model_dir.parent)
    ref = tiny_model_dir.as_uri()

    assert resolve_model(ref, None, settings=settings, workdir=tmp_path) == tiny_model_dir

    with pytest.raises(ModelLoadError, match=r"does not exist on this worker: copy the model"):
        resolve_model(ref + "-missing", None, settings=settings, workdir=tmp_path)
    empty = tiny_model_dir.parent / "empty-model"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ModelLoadError, match=r"not a transformers model folder \(no config.json"):
        resolve_model(empty.as_uri(), None, settings=settings, workdir=tmp_path)


def test_hub_model_is_downloaded_into_hf_home(
    tiny_model_dir: Path, hub_server: HubServer, hub_repo_id: str, tmp_path: Path
) -> None:
    hub_server.seed(hub_repo_id, tiny_model_dir)
    settings = Settings(hf_endpoint=hub_server.endpoint, hf_home=tmp_path / "hf")

    path = resolve_model(f"hf://{hub_repo_id}", None, settings=settings, workdir=tmp_path)

    assert path.is_relative_to(tmp_path / "hf" / "hub")
    assert (path / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model(hub_repo_id, "main", settings=settings, workdir=tmp_path) == path


def test_hub_failures_say_what_to_check(
    tiny_model_dir: Path, hub_server: HubServer, hub_repo_id: str, tmp_path: Path
) -> None:
    settings = Settings(hf_endpoint=hub_server.endpoint, hf_home=tmp_path / "hf")

    with pytest.raises(ModelLoadError) as missing:
        resolve_model("org/nope", None, settings=settings, workdir=tmp_path)
    assert str(missing.value) == (
        f"base model 'org/nope' was not found on the Hub ({hub_server.endpoint}): check the id, "
        "and that the worker's HF token can read it if it is private"
    )

    hub_server.seed(hub_repo_id, tiny_model_dir)
    with pytest.raises(ModelLoadError, match=r"revision 'v9' of base model .* was not found"):
        resolve_model(hub_repo_id, "v9", settings=settings, workdir=tmp_path)

    offline = Settings(hf_endpoint="http://127.0.0.1:9", hf_home=tmp_path / "hf2")
    with pytest.raises(ModelLoadError, match=r"could not be downloaded .* network access"):
        resolve_model("org/other", None, settings=offline, workdir=tmp_path)


def test_s3_model_is_downloaded_into_the_workdir(
    tiny_model_dir: Path, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    store = open_store(uri, endpoint_url=s3_server.endpoint_url)
    store.upload_dir("", tiny_model_dir)
    settings = Settings(s3_endpoint_url=s3_server.endpoint_url)

    path = resolve_model(uri + "/", None, settings=settings, workdir=tmp_path)

    assert path == tmp_path / "base-model"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        p.name for p in tiny_model_dir.iterdir()
    )
    with pytest.raises(ModelLoadError, match="nothing is stored under that S3 prefix"):
        resolve_model(f"s3://{s3_bucket}/nope", None, settings=settings, workdir=tmp_path / "x")


def test_quantization_config_follows_the_spec() -> None:
    import torch

    nf4 = build_quantization_config(_spec())
    assert nf4 is not None and nf4.load_in_4bit
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16

    fp4 = build_quantization_config(
        _spec(quantization={"quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"})
    )
    assert fp4 is not None and fp4.bnb_4bit_quant_type == "fp4"
    assert not fp4.bnb_4bit_use_double_quant and fp4.bnb_4bit_compute_dtype == torch.float32

    int8 = build_quantization_config(_spec(quantization={"bits": 8}))
    assert int8 is not None and int8.load_in_8bit
    assert build_quantization_config(_spec(quantization={"bits": None})) is None


def test_lora_config_follows_the_spec() -> None:
    config = build_lora_config(
        _spec(lora={"r": 4, "alpha": 12, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    )

    assert config.r == 4 and config.lora_alpha == 12 and config.lora_dropout == 0.1
    assert config.target_modules is not None
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM" and config.bias == "none"
    assert build_lora_config(_spec()).target_modules == "all-linear"
