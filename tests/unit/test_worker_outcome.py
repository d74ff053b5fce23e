"""The training process sends a job's outcome before it lets go of what the failed run left:
freeing that (a DDP model, when a rank died) can hang in gloo's destructor, and a job whose
outcome never leaves stays `running`."""

from __future__ import annotations

import multiprocessing
import sys
import time
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker import warm
from gpu_worker.errors import JobFailure
from gpu_worker.reporter import QueueReporter
from gpu_worker.supervisor import Outcome
from service.contract import DatasetRef, Job, JobSpec, JobStatus
from service.settings import Settings


def _job() -> bytes:
    now = time.time()
    job = Job(
        id="job_x",
        tenant="t",
        status=JobStatus.running,
        spec=msgspec.convert({"base_model": "org/m", "dataset_id": "ds_1"}, JobSpec),
        dataset=DatasetRef(id="ds_1", sha256="b" * 64, rows=18, format="standard"),
        created_at=now,
        updated_at=now,
    )
    return msgspec.json.encode(job)


def test_a_failed_jobs_outcome_is_sent_before_its_run_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    sent: list[Outcome] = []

    class Model:
        """Stands for the DDP model the failed run's frames hold."""

        def __del__(self) -> None:
            order.append("freed")

    def run(*args: Any, **kwargs: Any) -> None:
        model = Model()  # noqa: F841 - held by this frame, so by the exception's traceback
        raise JobFailure("data-parallel training failed: rank 1 of 2 died (signal 9)")

    monkeypatch.setitem(sys.modules, "gpu_worker.pipeline", types.SimpleNamespace(run=run))
    finish = QueueReporter.finish

    def finishing(self: QueueReporter, outcome: Outcome) -> None:
        order.append("sent")
        sent.append(outcome)
        finish(self, outcome)

    monkeypatch.setattr(QueueReporter, "finish", finishing)
    settings = Settings(store_url=(tmp_path / "store").as_uri(), work_dir=tmp_path / "work")
    events: multiprocessing.Queue[tuple[str, Any]] = multiprocessing.Queue()
    warm._train(_job(), settings, events, multiprocessing.Event(), None, "hello")

    assert order == ["sent", "freed"]
    (outcome,) = sent
    assert outcome.error is not None and outcome.error.type == "JobFailure"
    assert "rank 1 of 2 died" in outcome.error.message
