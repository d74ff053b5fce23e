"""The trainer callback and the checkpoint store, driven the way the Trainer drives them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from gpu_worker.callbacks import (
    MANIFEST,
    METRICS_FILE,
    CheckpointStore,
    ReporterCallback,
    read_points,
)
from gpu_worker.reporter import JobCancelled, ListReporter
from service.blobs import BlobStore, open_store
from service.contract import MetricPoint


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


def _checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * step)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def test_checkpoints_are_uploaded_with_a_manifest_and_only_the_newest_two_kept(
    store: BlobStore, tmp_path: Path
) -> None:
    checkpoints = CheckpointStore(store, "job1")
    for step in (4, 8, 12):
        checkpoints.upload(_checkpoint(tmp_path / "out", step), step)

    assert checkpoints.steps() == [8, 12]
    assert store.list("jobs/job1/checkpoints/checkpoint-4") == []
    assert store.exists(f"jobs/job1/checkpoints/checkpoint-12/{MANIFEST}")

    # An upload cut short (no manifest) is never resumed from.
    store.put_bytes("jobs/job1/checkpoints/checkpoint-16/adapter_model.safetensors", b"partial")
    assert checkpoints.newest() == 12

    folder = checkpoints.download(12, tmp_path / "elsewhere")
    assert folder == tmp_path / "elsewhere" / "checkpoint-12"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_model.safetensors",
        "trainer_state.json",
    ]
    assert (folder / "adapter_model.safetensors").read_bytes() == b"w" * 12
    assert CheckpointStore(store, "job2").newest() is None


def _drive(
    callback: ReporterCallback, args: TrainingArguments, state: TrainerState, steps: int
) -> TrainerControl:
    control = TrainerControl()
    for _ in range(steps):
        callback.on_step_begin(args, state, control)
        state.global_step += 1
        state.epoch = state.global_step / state.max_steps
        callback.on_step_end(args, state, control)
        callback.on_log(
            args,
            state,
            control,
            logs={"loss": 0.7, "rewards/accuracies": 0.5, "num_tokens": 100.0 * state.global_step},
        )
    return control


def test_train_logs_pass_through_with_our_keys_and_progress(tmp_path: Path) -> None:
    reporter = ListReporter()
    callback = ReporterCallback(reporter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=4)

    _drive(callback, args, state, 2)
    callback.on_log(args, state, TrainerControl(), logs={"eval_loss": 0.6, "epoch": 0.5})
    callback.on_log(args, state, TrainerControl(), logs={"train_runtime": 3.0, "train_loss": 0.7})

    assert [step for step, _ in reporter.points] == [1, 2, 2]
    first = reporter.points[0][1]
    assert first["loss"] == 0.7 and first["rewards/accuracies"] == 0.5
    assert first["memory_bytes"] > 0 and first["step_seconds"] > 0
    assert first["tokens_per_second"] == pytest.approx(100.0 / first["step_seconds"])
    assert reporter.points[2][1] == {"eval_loss": 0.6, "epoch": 0.5}
    assert callback.summary == {"train_runtime": 3.0, "train_loss": 0.7}
    assert [(p.step, p.total_steps, p.epoch) for p in reporter.progresses] == [
        (1, 4, 0.25),
        (2, 4, 0.5),
    ]
    assert reporter.progresses[-1].eta_seconds is not None
    assert [p.step for p in callback.points] == [1, 2, 2]


def test_nan_and_infinite_values_are_left_out_and_said_once(tmp_path: Path) -> None:
    """A diverged loss or an overflowed gradient norm: JSON has no NaN, so stored it read
    back as null and the job's record could no longer be read (every GET and list a 500)."""
    reporter = ListReporter()
    callback = ReporterCallback(reporter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=4, global_step=1)
    control = TrainerControl()
    callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": float("nan")})
    state.global_step = 2
    callback.on_log(args, state, control, logs={"loss": float("inf"), "grad_norm": float("nan")})
    callback.on_log(args, state, control, logs={"train_runtime": 3.0, "train_loss": float("nan")})
    callback.add_point(2, {"eval_rouge": float("-inf")})
    [(step, values)] = reporter.points  # step 2 had no number left
    assert step == 1 and values["loss"] == 0.7 and "grad_norm" not in values
    assert callback.summary == {"train_runtime": 3.0}
    assert [line.split(";")[0] for line in reporter.logs] == [
        "step 1: grad_norm is nan",
        "step 2: loss is inf",
        "step 2: train_loss is nan",
        "step 2: eval_rouge is -inf",
    ]


def test_cancel_stops_after_the_step_is_logged(tmp_path: Path) -> None:
    reporter = ListReporter()
    reporter.cancel_after_step = 2
    callback = ReporterCallback(reporter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=10)

    control = _drive(callback, args, state, 2)

    assert control.should_training_stop
    assert [step for step, _ in reporter.points] == [1, 2]
    with pytest.raises(JobCancelled, match="step 2"):
        callback.on_epoch_end(args, state, control)


def test_planned_stop_checkpoints_the_step_reached_and_ends_training(tmp_path: Path) -> None:
    reporter = ListReporter()
    reporter.stop_after_step = 3
    callback = ReporterCallback(reporter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=10)

    control = _drive(callback, args, state, 3)

    # The Trainer saves on should_save right after this step (on_save uploads it), then leaves.
    assert control.should_save and control.should_training_stop
    assert callback.stopped_at == 3
    callback.on_epoch_end(args, state, control)  # not a cancel: nothing raised here


def test_planned_stop_on_the_last_step_lets_the_job_finish(tmp_path: Path) -> None:
    reporter = ListReporter()
    reporter.stop_after_step = 1
    callback = ReporterCallback(reporter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=4, global_step=3)

    control = _drive(callback, args, state, 1)

    assert callback.stopped_at is None and not control.should_save


def test_on_save_uploads_the_checkpoint_with_the_metric_history(
    store: BlobStore, tmp_path: Path
) -> None:
    reporter = ListReporter()
    earlier = [MetricPoint(step=1, time=1.0, values={"loss": 0.69})]
    callback = ReporterCallback(
        reporter, checkpoints=CheckpointStore(store, "job1"), history=earlier
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=4, global_step=1)
    _drive(callback, args, state, 1)
    _checkpoint(tmp_path / "out", 2)

    callback.on_save(args, state, TrainerControl())

    assert CheckpointStore(store, "job1").steps() == [2]
    saved = tmp_path / "saved.jsonl"
    store.get_file(f"jobs/job1/checkpoints/checkpoint-2/{METRICS_FILE}", saved)
    assert [p.step for p in read_points(saved)] == [1, 2]
    assert reporter.logs[-1].startswith("checkpoint saved to file://")
