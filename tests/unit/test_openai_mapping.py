"""OpenAI's objects to and from ours: "auto" rules, batch splits that fit the GPU, the result
CSV and the event texts a migrating team reads."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import msgspec
import pytest

from service import vram
from service.contract import DatasetRef, Job, JobSpec, JobStatus, MetricPoint, Progress
from service.contract.openai import FineTuningJobCreate
from service.openai.events import event_object
from service.openai.files import metrics_csv
from service.openai.hyperparameters import SpecError, auto_batch_size, auto_epochs
from service.openai.jobs import job_object, to_spec


def create(**body: object) -> FineTuningJobCreate:
    return msgspec.convert({"model": "org/m", "training_file": "ds_1", **body}, FineTuningJobCreate)


@pytest.mark.parametrize(
    ("rows", "epochs"), [(1, 25), (10, 10), (40, 3), (8_000, 3), (10_000, 2), (30_000, 1)]
)
def test_auto_epochs_keep_between_100_and_25000_examples(rows: int, epochs: int) -> None:
    assert auto_epochs(rows) == epochs


@pytest.mark.parametrize(
    ("rows", "batch"), [(3, 3), (64, 8), (10_000, 20), (100_000, 200), (1_000_000, 256)]
)
def test_auto_batch_is_a_fifth_of_a_percent_of_the_rows_within_8_and_256(
    rows: int, batch: int
) -> None:
    assert auto_batch_size(rows) == batch


def test_left_out_and_auto_are_the_same() -> None:
    always = lambda spec: True  # noqa: E731
    auto = {"beta": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    with_auto = to_spec(
        create(method={"type": "dpo", "dpo": {"hyperparameters": auto}}), rows=500, fits=always
    )
    assert with_auto == to_spec(create(), rows=500, fits=always)
    hp = with_auto.hyperparameters
    assert (hp.beta, hp.learning_rate, hp.num_epochs) == (0.1, 5e-6, 3)
    assert hp.batch_size * hp.gradient_accumulation_steps == 8


def test_a_batch_is_split_so_that_it_fits_the_workers_gpu(tmp_path: Path) -> None:
    body = create(
        model="Qwen/Qwen2.5-7B-Instruct",
        hyperparameters={"batch_size": 16},
        training={"max_length": 2048},
    )
    splits = {}
    for gpu_gb in (80.0, 20.0, 12.0):

        def fits(spec: JobSpec, gpu_gb: float = gpu_gb) -> bool:
            try:
                vram.check_fits(spec, gpu_gb, tmp_path)
            except ValueError:
                return False
            return True

        hp = to_spec(body, rows=1000, fits=fits).hyperparameters
        assert hp.batch_size * hp.gradient_accumulation_steps == 16
        splits[gpu_gb] = hp.batch_size
    assert splits == {80.0: 8, 20.0: 4, 12.0: 2}


def test_supervised_is_sft_and_reinforcement_and_both_forms_are_refused_by_name() -> None:
    supervised = create(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    )
    spec = to_spec(supervised, rows=10, fits=lambda s: True)
    assert spec.method == "sft" and spec.hyperparameters.num_epochs == 2
    assert spec.hyperparameters.learning_rate == 2e-4  # multiplier 1: our sft default
    with pytest.raises(SpecError) as refused:
        to_spec(create(method={"type": "reinforcement"}), rows=10, fits=lambda s: True)
    assert refused.value.param == "method.type"
    both = create(method={"type": "dpo"}, hyperparameters={"n_epochs": 2})
    with pytest.raises(SpecError) as refused:
        to_spec(both, rows=10, fits=lambda s: True)
    assert refused.value.param == "hyperparameters"


def test_result_csv_has_one_row_per_step_with_train_and_eval_merged() -> None:
    points = [
        MetricPoint(step=1, time=1.0, values={"loss": 0.69, "rewards/accuracies": 0.5}),
        MetricPoint(step=2, time=2.0, values={"loss": 0.5, "rewards/accuracies": 0.75}),
        MetricPoint(step=2, time=2.5, values={"eval_loss": 0.6, "eval_rewards/accuracies": 1.0}),
    ]
    table = list(csv.DictReader(io.StringIO(metrics_csv(points).decode())))
    assert list(table[0])[:3] == ["step", "train_loss", "valid_loss"]
    assert [(r["step"], r["train_loss"], r["valid_loss"]) for r in table] == [
        ("1", "0.69", ""),
        ("2", "0.5", "0.6"),
    ]
    assert table[1]["eval_rewards/accuracies"] == "1.0"


def test_a_failure_reads_as_an_error_event_with_its_cause() -> None:
    data = msgspec.json.encode(
        {"status": "failed", "attempt": 0, "error": {"type": "DatasetError", "message": "no rows"}}
    )
    event = event_object("1700000000123-0", "status", data, total_steps=None)
    assert event.level == "error" and event.created_at == 1_700_000_000
    assert event.message == "Job failed: DatasetError: no rows"
    assert event.id == "ftevent-1700000000123-0"


def test_a_batch_is_divided_among_the_workers_gpus() -> None:
    """Our batch_size is per GPU: OpenAI's batch of 8 on 2 GPUs is 4 on each, so that an
    optimizer step still sees 8 examples."""
    always = lambda spec: True  # noqa: E731
    hp = to_spec(create(hyperparameters={"batch_size": 8}), rows=500, fits=always, gpus=2)
    assert hp.hyperparameters.batch_size * hp.hyperparameters.gradient_accumulation_steps == 4
    auto = to_spec(create(), rows=4_500, fits=always, gpus=2).hyperparameters  # auto: 9
    assert auto.batch_size * auto.gradient_accumulation_steps == 5  # 10 across the two
    odd = create(method={"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 9}}})
    with pytest.raises(SpecError) as refused:
        to_spec(odd, rows=500, fits=always, gpus=2)
    assert refused.value.param == "method.dpo.hyperparameters.batch_size"
    assert "not a multiple of the workers' 2 GPUs" in str(refused.value)
    # More than the file's examples: refused, not reported as a batch it never trained.
    with pytest.raises(SpecError, match="more than the training file's 20 examples") as refused:
        to_spec(create(hyperparameters={"batch_size": 4096}), rows=20, fits=always)
    assert refused.value.param == "hyperparameters.batch_size"


def test_a_running_jobs_estimated_finish_is_never_in_the_past() -> None:
    """The ETA is the last step's (written then): a job read a while after it says "now" at
    the earliest, not a moment that has gone by."""
    now = time.time()
    spec = JobSpec(base_model="org/model", dataset_id="ds_x")
    job = Job(
        id="job_x",
        tenant="alice",
        status=JobStatus.running,
        spec=spec,
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=8, format="standard"),
        created_at=now - 120,
        updated_at=now - 60,
        progress=Progress(step=5, total_steps=10, eta_seconds=30.0),
    )
    finish = job_object(job).estimated_finish
    assert finish is not None and finish >= int(now)
    later = msgspec.structs.replace(job, updated_at=now, progress=Progress(step=5, eta_seconds=90))
    assert job_object(later).estimated_finish == int(now + 90)
