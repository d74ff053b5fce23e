"""The whole training job on the tiny model: QLoRA (4-bit NF4) DPO on the CPU, for real.

Each test runs `gpu_worker.pipeline.run` with a file:// blob store and a ListReporter, and
checks what a user would see: phases, metric points, progress, cancellation, resume, artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker.errors import DatasetError
from gpu_worker.pipeline import run
from gpu_worker.reporter import JobCancelled, ListReporter
from service.blobs import BlobStore, open_store
from service.contract import Generation, JobSpec, Phase
from service.settings import Settings
from tests.fixtures.tiny_model import stage_job

TRL_KEYS = {
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "epoch",
}
OUR_KEYS = {"tokens_per_second", "step_seconds", "memory_bytes"}


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path / "work", device="cpu")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _long_prompt_rows(n: int) -> list[dict[str, str]]:
    prompt = "Tell me about " + " and ".join(["the weather", "the park", "the city"] * 40)
    return [
        {"prompt": f"{prompt} {i}.", "chosen": "It was great.", "rejected": "It was awful."}
        for i in range(n)
    ]


@pytest.mark.slow
def test_qlora_job_trains_reports_and_publishes_the_adapter(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    base_before = _digests(tiny_model_dir)
    job = stage_job(
        store,
        tiny_model_dir,
        tiny_preference_rows + _long_prompt_rows(3),
        eval_fraction=0.1,
        eval_prompts=["How was the park?", "Describe the coffee in a few words."],
        max_new_tokens=8,
        hyperparameters={
            "max_steps": 10,
            "logging_steps": 2,
            "checkpoint_steps": 4,
            "optimizer": "paged_adamw_8bit",
        },
        quantization={"bits": 4, "quant_type": "nf4", "compute_dtype": "bfloat16"},
        webhook_url="https://ci:hunter2@hooks.example.com/ftune?token=s3cret",
    )
    reporter = ListReporter()

    result = run(job, tmp_path / "work", reporter, settings=settings, store=store)

    assert reporter.phases == [
        Phase.preparing,
        Phase.training,
        Phase.evaluating,
        Phase.uploading,
    ]
    # The CPU worker says what it changed instead of failing or silently differing.
    assert any("compute_dtype bfloat16 -> float32" in line for line in reporter.logs)
    assert any("optimizer paged_adamw_8bit -> adamw_torch" in line for line in reporter.logs)
    # The 3 long prompts are dropped (training or eval side), counted by reason.
    data = reporter.fields["data"]
    assert data.dropped.prompt_too_long + data.eval_dropped.prompt_too_long == 3
    assert reporter.fields["rows_dropped"] == 3
    assert data.train_rows + data.eval_rows + 3 == job.dataset.rows

    train_points = [(s, v) for s, v in reporter.points if "loss" in v]
    eval_points = [(s, v) for s, v in reporter.points if "eval_loss" in v]
    assert [s for s, _ in train_points] == [2, 4, 6, 8, 10]
    for _, values in train_points:
        assert values.keys() >= TRL_KEYS | OUR_KEYS
        assert all(math.isfinite(v) for v in values.values())
        assert values["memory_bytes"] > 10_000_000
        assert values["tokens_per_second"] > 0 and values["step_seconds"] > 0
    assert [s for s, _ in eval_points] == [10]
    assert {"eval_rewards/accuracies", "eval_rewards/margins"} <= eval_points[0][1].keys()
    # The preference is learnable: after 10 steps at lr 1e-3 the chosen answers are preferred.
    last = train_points[-1][1]
    assert last["loss"] < math.log(2) and last["rewards/margins"] > 0
    assert last["rewards/accuracies"] >= 0.75

    assert [p.step for p in reporter.progresses] == list(range(1, 11))
    assert reporter.progresses[-1].total_steps == 10
    assert reporter.progresses[-1].eta_seconds == 0

    generations = reporter.fields["eval_generations"]
    assert [g.prompt for g in generations] == job.spec.eval_prompts
    assert all(isinstance(g, Generation) for g in generations)
    assert {g.generated_by for g in generations} == {"adapter_on_4bit_base"}

    # Only the newest two checkpoints stay in the store.
    checkpoints = {k.split("/")[3] for k in store.list(f"jobs/{job.id}/checkpoints/")}
    assert checkpoints == {"checkpoint-8", "checkpoint-10"}

    (artifact,) = result.artifacts
    assert artifact.kind == "adapter"
    assert artifact.uri.startswith(store.url)
    prefix = f"jobs/{job.id}/artifacts/adapter/"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "spec.json",
        "metrics.jsonl",
        "eval_generations.jsonl",
    ):
        assert name in artifact.files
        assert store.exists(prefix + name)
    assert "training_args.bin" not in artifact.files
    spec_json = store.get_bytes(prefix + "spec.json")
    spec = msgspec.json.decode(spec_json, type=JobSpec)
    # The artifact is published as it is: the webhook's URL (credentials and all) stays out.
    assert spec == msgspec.structs.replace(job.spec, webhook_url=None)
    assert b"hunter2" not in spec_json and b"s3cret" not in spec_json
    metrics_lines = store.get_bytes(prefix + "metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in metrics_lines] == [2, 4, 6, 8, 10, 10]
    saved_generations = store.get_bytes(prefix + "eval_generations.jsonl").splitlines()
    assert [json.loads(line)["prompt"] for line in saved_generations] == job.spec.eval_prompts

    assert result.final_metrics["loss"] == last["loss"]
    assert "eval_loss" in result.final_metrics and "train_loss" in result.final_metrics

    # The adapter moved away from its init (lora_B starts at zero); the base did not change.
    adapter = _adapter_tensors(store, prefix)
    assert adapter and all("lora_" in name for name in adapter)
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    assert _digests(tiny_model_dir) == base_before


@pytest.mark.slow
def test_generations_come_from_the_published_merged_model(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """The "after" text is what the merged artifact says, not the 4-bit training model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [
        "How was the park?",
        "Describe the coffee in a few words.",
        "Tell me about the hotel.",
        "What do you think of the song?",
    ]
    job = stage_job(
        store,
        tiny_model_dir,
        tiny_preference_rows,
        eval_prompts=prompts,
        max_new_tokens=12,
        hyperparameters={"max_steps": 8},
        output={"artifacts": "merged"},
    )
    reporter = ListReporter()

    (artifact,) = run(job, tmp_path / "work", reporter, settings=settings, store=store).artifacts

    assert artifact.kind == "merged" and "eval_generations.jsonl" in artifact.files
    merged_dir = tmp_path / "published"
    store.download_dir(f"jobs/{job.id}/artifacts/merged/", merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)

    def greedy(model_dir: Path) -> list[str]:
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        texts = []
        for prompt in prompts:
            encoded: Any = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = encoded["input_ids"]
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            texts.append(str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
        return texts

    generations = reporter.fields["eval_generations"]
    assert {g.generated_by for g in generations} == {"merged"}
    assert [g.tuned for g in generations] == greedy(merged_dir)
    assert [g.base for g in generations] == greedy(tiny_model_dir)
    saved = store.get_bytes(f"jobs/{job.id}/artifacts/merged/eval_generations.jsonl")
    assert [json.loads(line)["generated_by"] for line in saved.splitlines()] == ["merged"] * 4


def _losses(reporter: ListReporter, upto: int | None = None) -> dict[int, float]:
    """Training loss per step (evaluation points left out)."""
    return {
        step: values["loss"]
        for step, values in reporter.points
        if "loss" in values and (upto is None or step <= upto)
    }


def _adapter_tensors(store: BlobStore, prefix: str) -> dict[str, Any]:
    from safetensors.torch import load

    return load(store.get_bytes(prefix + "adapter_model.safetensors"))


def test_all_rows_too_long_fails_saying_why(
    tiny_model_dir: Path, store: BlobStore, settings: Settings, tmp_path: Path
) -> None:
    job = stage_job(store, tiny_model_dir, _long_prompt_rows(5))
    reporter = ListReporter()

    with pytest.raises(DatasetError, match=r"all 5 training rows.*max_length=128"):
        run(job, tmp_path / "work", reporter, settings=settings, store=store)
    assert reporter.fields["rows_dropped"] == 5
    assert reporter.phases == [Phase.preparing]


@pytest.mark.slow
def test_cancel_stops_within_one_step(
    tiny_model_dir: Path,
    tiny_conversational_rows: list[dict[str, Any]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    job = stage_job(
        store, tiny_model_dir, tiny_conversational_rows, hyperparameters={"max_steps": 20}
    )
    reporter = ListReporter()
    reporter.cancel_after_step = 3

    with pytest.raises(JobCancelled):
        run(job, tmp_path / "work", reporter, settings=settings, store=store)

    assert reporter.phases == [Phase.preparing, Phase.training]
    assert reporter.progresses[-1].step == 3
    assert [s for s, _ in reporter.points] == [1, 2, 3]
    assert not store.list(f"jobs/{job.id}/artifacts/")


@pytest.mark.slow
def test_a_job_resumed_from_its_last_steps_checkpoint_trains_no_step_more(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """Its worker was lost after training (evaluating, publishing): the next attempt publishes
    the adapter of the last step. transformers' own loop would train a step past `max_steps`."""
    job = stage_job(
        store,
        tiny_model_dir,
        tiny_preference_rows,
        hyperparameters={"max_steps": 4, "checkpoint_steps": 4},
    )
    first = ListReporter()
    first_result = run(job, tmp_path / "work-1", first, settings=settings, store=store)
    trained = store.get_bytes(f"jobs/{job.id}/artifacts/adapter/adapter_model.safetensors")

    again = ListReporter()
    again_result = run(job, tmp_path / "work-2", again, settings=settings, store=store)

    assert any("resuming from the checkpoint at step 4" in line for line in again.logs)
    assert any("nothing left to train" in line for line in again.logs)
    assert _losses(again) == {}
    published = store.get_bytes(f"jobs/{job.id}/artifacts/adapter/adapter_model.safetensors")
    assert published == trained
    # With no step trained, its train_loss is still the job's (it was missing, failing a gate).
    assert again_result.final_metrics["train_loss"] == pytest.approx(
        first_result.final_metrics["train_loss"], abs=1e-4
    )


def test_resume_continues_from_the_newest_checkpoint(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    job = stage_job(
        store,
        tiny_model_dir,
        tiny_preference_rows[:56],
        eval_rows=tiny_preference_rows[56:] + _long_prompt_rows(2),
        hyperparameters={"max_steps": 8, "checkpoint_steps": 4, "eval_steps": 4},
    )
    first = ListReporter()
    first.cancel_after_step = 5
    with pytest.raises(JobCancelled):
        run(job, tmp_path / "work-1", first, settings=settings, store=store)
    assert [(s, "eval_loss" in v) for s, v in first.points] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (4, True),  # evaluation during training, on the separate eval dataset
        (5, False),
    ]

    assert first.fields["rows_dropped"] == 2  # the eval dataset's rows count too
    assert "56 training rows, 8 eval rows, device cpu" in first.logs

    # Another worker picks the job up with an empty work dir: only the store carries state.
    second = ListReporter()
    result = run(job, tmp_path / "work-2", second, settings=settings, store=store)

    assert any("resuming from the checkpoint at step 4" in line for line in second.logs)
    train_steps = [s for s, v in second.points if "loss" in v]
    assert train_steps == [5, 6, 7, 8]
    assert second.progresses[0].step == 5 and second.progresses[-1].step == 8
    # The interrupted job trains exactly like one that never stopped: adapter weights, optimizer,
    # scheduler, data order and RNG all continue from checkpoint 4.
    whole = ListReporter()
    uninterrupted = msgspec.structs.replace(job, id="job_whole")
    unbroken = run(uninterrupted, tmp_path / "work-3", whole, settings=settings, store=store)
    resumed = _losses(first, upto=4) | _losses(second)
    assert list(resumed) == list(range(1, 9))
    assert resumed == pytest.approx(_losses(whole), abs=1e-5, rel=0)
    # Its train_loss is the mean over all 8 steps, as the unbroken run's (transformers' own
    # summary covers the 4 steps of the last attempt): a gate on it must not see a better job.
    assert result.final_metrics["train_loss"] == pytest.approx(
        unbroken.final_metrics["train_loss"], abs=1e-4
    )
    # metrics.jsonl holds the whole history once: steps 1-4 from the checkpoint, 5-8 resumed,
    # then the evaluation at step 8 (done by eval_steps, so not repeated after training).
    (artifact,) = result.artifacts
    lines = store.get_bytes(f"jobs/{job.id}/artifacts/adapter/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert "eval_rewards/accuracies" in result.final_metrics
    assert artifact.kind == "adapter"
