"""Data parallelism on the CPU: the job trains in 2 gloo processes exactly as in one.

A 2-process run with batch_size 2 sees the same 4 rows per optimizer step as a 1-process run
with batch_size 4 (the same seeded shuffle, dealt out in turn to the ranks), and DDP averages
the ranks' gradients, so the per-step losses agree up to float summation order.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker import distributed
from gpu_worker.callbacks import CheckpointStore
from gpu_worker.pipeline import run
from gpu_worker.reporter import JobStopped, ListReporter
from service.blobs import open_store
from service.settings import Settings
from tests.fixtures.tiny_model import preference_rows, stage_job

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-5
"""Relative: the 2-process loss is the mean of the ranks' means (float32 sums in another
order, and 4-bit matmuls over 2 rows instead of 4): measured at most 3.5e-7."""


def train(
    tmp_path: Path, model_dir: Path, *, processes: int, batch_size: int, **spec: Any
) -> tuple[ListReporter, Any]:
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        model_dir,
        preference_rows(32),
        hyperparameters={
            "batch_size": batch_size,
            "max_steps": 6,
            "logging_steps": 1,
            "checkpoint_steps": 100,
        },
        **spec,
    )
    settings = Settings(
        models_dir=model_dir.parent,
        work_dir=tmp_path / "work",
        device="cpu",
        worker_gpus=processes,
    )
    reporter = ListReporter()
    result = run(job, tmp_path / "work", reporter, settings=settings, store=store)
    return reporter, result


def losses(reporter: ListReporter) -> list[float]:
    return [values["loss"] for _, values in reporter.points if "loss" in values]


def test_two_processes_match_one_with_the_same_global_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    one, _ = train(tmp_path / "one", tiny_model_dir, processes=1, batch_size=4)
    two, result = train(tmp_path / "two", tiny_model_dir, processes=2, batch_size=2)

    assert len(losses(two)) == len(losses(one)) == 6
    for a, b in zip(losses(one), losses(two), strict=True):
        assert b == pytest.approx(a, rel=LOSS_TOLERANCE)
    # The loss moved: the comparison is between two runs that trained, not two constants.
    assert losses(one)[-1] < losses(one)[0]
    summary = [line for line in two.logs if line.startswith("data parallel across")]
    assert summary == [
        "data parallel across 2 processes: rank 0 trained 6 steps, rank 1 trained 6 steps; "
        "adapters identical on every rank"
    ]
    assert any("batch_size 2 x gradient_accumulation_steps 1 x 2 = 4 rows" in x for x in two.logs)
    assert [a.kind for a in result.artifacts] == ["adapter"]


def test_a_planned_stop_checkpoints_every_rank_and_two_processes_resume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        tiny_model_dir,
        preference_rows(32),
        hyperparameters={"batch_size": 2, "max_steps": 6, "logging_steps": 1},
        lora={"r": 8, "alpha": 16, "dropout": 0.2},
    )
    settings = Settings(
        models_dir=tiny_model_dir.parent, work_dir=tmp_path / "work", device="cpu", worker_gpus=2
    )
    stopped = ListReporter()
    stopped.stop_after_step = 3
    with pytest.raises(JobStopped, match="stopped at step 3"):
        run(job, tmp_path / "work", stopped, settings=settings, store=store)
    assert CheckpointStore(store, job.id).steps() == [3]

    resumed = ListReporter()
    run(job, tmp_path / "work", resumed, settings=settings, store=store)
    assert "resuming from the checkpoint at step 3" in resumed.logs
    assert [step for step, values in resumed.points if "loss" in values] == [4, 5, 6]
    # Every rank's RNG state was in the checkpoint: with LoRA dropout on, the resumed steps
    # are those of an uninterrupted run (rank 1 used to start from a fresh RNG).
    assert job.spec.lora.dropout > 0
    whole = ListReporter()
    again = msgspec.structs.replace(job, id=job.id + "0")
    run(again, tmp_path / "work", whole, settings=settings, store=store)
    assert losses(resumed) == pytest.approx(losses(whole)[3:], abs=1e-6)
    assert (
        "data parallel across 2 processes: rank 0 trained 3 steps, rank 1 trained 3 steps; "
        "adapters identical on every rank"
    ) in resumed.logs


def test_a_rank_that_dies_while_rank_0_is_stuck_abandons_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 stuck (here: sleeping where a collective would wait on a dead rank's connection)
    does not hang the job: the watch kills the other ranks and abandons the job, naming the
    rank that died."""
    monkeypatch.setattr(distributed, "STUCK_SECONDS", 0.5)
    reporter = ListReporter()
    with (
        pytest.raises(distributed.DistributedError, match="rank 1 of 3 died"),
        distributed.launch(3, tmp_path / "ranks", reporter.abandon) as group,
    ):
        group.joining = True  # as `begin` marks it: rank 0 would now wait in the rendezvous
        group.procs[1].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while reporter.abandoned is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group.procs[2].poll() is not None, "the other rank is killed too"
    assert reporter.abandoned is not None
    assert "rank 1 of 3 died (signal 9)" in str(reporter.abandoned)


def test_a_job_stuck_after_a_collectives_error_on_a_dead_rank_is_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gloo's error in a collective ends training the ordinary way, but what follows can still
    wait on the dead rank (measured: freeing the failed run's DDP model, after `launch` had
    raised): the watch stays on after `launch` and abandons the job."""
    monkeypatch.setattr(distributed, "STUCK_SECONDS", 0.5)
    reporter = ListReporter()
    with (
        pytest.raises(distributed.DistributedError, match="rank 1 of 2 died"),
        distributed.launch(2, tmp_path / "ranks", reporter.abandon) as group,
    ):
        group.joining = group.joined = True  # as `begin` marks them
        group.procs[1].send_signal(signal.SIGKILL)
        group.procs[1].wait()
        raise RuntimeError("[gloo] Connection closed by peer")  # the collective's error
    deadline = time.monotonic() + 30
    while reporter.abandoned is None and time.monotonic() < deadline:
        time.sleep(0.1)  # rank 0 stuck after `launch`, as in gloo's destructor
    assert "rank 1 of 2 died (signal 9)" in str(reporter.abandoned)


def test_a_rank_that_dies_before_rank_0_joins_is_not_abandoned_by_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 still fetching data or loading the model is not stuck: the watch leaves the job
    to end the ordinary way (its tracking runs closed, the error told as it is), not by
    `os._exit` in the middle of a download."""
    monkeypatch.setattr(distributed, "STUCK_SECONDS", 0.5)
    reporter = ListReporter()
    with (
        pytest.raises(distributed.DistributedError, match="rank 1 of 2 died"),
        distributed.launch(2, tmp_path / "ranks", reporter.abandon) as group,
    ):
        group.procs[1].send_signal(signal.SIGKILL)
        group.procs[1].wait()
        time.sleep(2.5)  # five times the watch's patience
        meanwhile = reporter.abandoned  # (an assert here would be re-raised as the rank's error)
    assert meanwhile is None
