"""GPU memory on paper: `service/vram.py`'s estimate beside published figures.

The baseline is LLaMA-Factory's hardware-requirement table (README, "Hardware Requirement"):
QLoRA at 4 bits needs about 6 GB for 7B, 12 GB for 14B, 24 GB for 30B and 48 GB for 70B models.
Our estimate is for the job spec's defaults (DPO, batch_size 1, max_length 1024, gradient
checkpointing on, LoRA r=16 on all linear layers, NF4 with double quantization, bf16 compute,
adamw_torch), from each model's real shape. No GPU here, so one part of the estimate is checked
for real on the CPU: the bytes of the 4-bit weights, against what bitsandbytes allocates for a
randomly initialized model of a real shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import msgspec

from bench.common import PY, Figure, Section, run_json, scratch
from service import vram
from service.contract import JobSpec, Quantization

PUBLISHED = (
    # (model, LLaMA-Factory's column, its QLoRA 4-bit figure in GB)
    ("meta-llama/Llama-2-7b-hf", "7B", 6.0),
    ("Qwen/Qwen2.5-14B-Instruct", "14B", 12.0),
    ("Qwen/Qwen2.5-32B-Instruct", "30B", 24.0),
    ("meta-llama/Llama-2-70b-hf", "70B", 48.0),
)


def _spec(base_model: str, **hyperparameters: object) -> JobSpec:
    return msgspec.convert(
        {"base_model": base_model, "dataset_id": "ds_bench", "hyperparameters": hyperparameters},
        JobSpec,
    )


def _measured_weights(section: Section, name: str, full: bool) -> None:
    arch = vram.KNOWN[name]
    with scratch(f"vram-{name}") as root:
        measured = run_json(
            [PY, "-m", "bench.vram_measure", json.dumps(asdict(arch)), str(root), str(full)]
        )
    cpu = msgspec.structs.replace(
        _spec(f"bench/{name}"), quantization=Quantization(compute_dtype="float32")
    )
    variants = (
        (("double_quant", True), ("single_quant", False)) if full else (("double_quant", True),)
    )
    for key, double_quant in variants:
        spec = msgspec.structs.replace(
            cpu, quantization=msgspec.structs.replace(cpu.quantization, double_quant=double_quant)
        )
        section.add(
            Figure(
                f"4-bit weights of a random {name}-shaped model "
                f"({'double' if double_quant else 'single'} quantization, fp32 rest)",
                vram.estimate_for(arch, spec).weights / 1024**2,
                measured[key] / 1024**2,
                "MiB",
                "bytes bitsandbytes allocated (CPU)",
                better="match",
                tolerance=0.02,
                why="the estimate leaves out the quantization code tables (a few KiB a layer)",
            )
        )
    section.facts.append(
        f"{name}: {measured['params']:,} parameters built, "
        f"{arch.total_params:,} in the built-in table"
    )


def run(full: bool) -> Section:
    section = Section(
        "GPU memory on paper: QLoRA 4-bit DPO, the spec's defaults",
        f"python -m bench --{'full' if full else 'quick'} --only vram",
    )
    for model, column, published in PUBLISHED:
        found = vram.estimate(_spec(model))
        assert found is not None
        section.add(
            Figure(
                f"{found.architecture.name} ({found.architecture.total_params / 1e9:.1f}B)",
                found.total_gb,
                published,
                "GB",
                f"LLaMA-Factory, QLoRA 4-bit, {column}",
                better="match",
                why="LLaMA-Factory's figures are rules of thumb rounded to GPU sizes "
                "(6/12/24/48 GB) for SFT at unstated lengths, so a large model gets a wide "
                "margin; ours is the expected peak of a DPO step, most of it the 4-bit weights, "
                "whose bytes the CPU check below confirms to 1%. An estimate too low would let "
                "the API accept a job that runs out of memory: the check compares against the "
                "workers' whole memory, so leave headroom in FTUNE_WORKER_GPU_MEMORY_GB (e.g. "
                "set 44 for a 48 GB card) until estimates are checked against GPU runs",
            )
        )
        no_gc = vram.estimate(_spec(model, gradient_checkpointing=False))
        assert no_gc is not None
        section.facts.append(
            f"{found.architecture.name}: {found.describe()}; without gradient checkpointing "
            f"{no_gc.total_gb:.1f} GB"
        )
    _measured_weights(section, "smollm2-135m", full)
    if full:
        _measured_weights(section, "qwen2.5-0.5b", full)
    return section
