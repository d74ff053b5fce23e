"""Experiment tracking's rules that need no tracker: what it logs as params, and that a tracker
failing during training costs one log line, never the job."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from gpu_worker.errors import ConfigError
from gpu_worker.reporter import ListReporter
from gpu_worker.tracking import Tracking, params
from service.blobs import open_store
from service.contract import Artifact
from service.settings import Settings
from tests.fixtures.tiny_model import stage_job


class Flaky:
    name = "Flaky"

    def __init__(self) -> None:
        self.logged: list[int] = []
        self.finished: list[str] = []

    def log(self, step: int, values: dict[str, float]) -> None:
        if step == 2:
            raise ConnectionError("tracking server went away")
        self.logged.append(step)

    def finish(
        self, status: str, final_metrics: Mapping[str, float], artifacts: list[Artifact]
    ) -> None:
        self.finished.append(status)


def test_a_tracker_failing_mid_run_costs_one_log_line() -> None:
    reporter, tracker = ListReporter(), Flaky()
    tracking = Tracking([tracker], reporter)
    for step in (1, 2, 2, 3):
        tracking.log(step, {"loss": 0.5})
    tracking.finish("succeeded", {"loss": 0.4})
    assert tracker.logged == [1, 3] and tracker.finished == ["succeeded"]
    assert reporter.logs == ["Flaky: could not record step 2: tracking server went away"]


def test_params_are_the_spec_flattened(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        tmp_path / "models" / "m",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}],
        eval_prompts=["x" * 1000],
        labels={"team": "search"},
    )
    flat = params(job)
    assert flat["hyperparameters.max_steps"] == "4" and flat["lora.target_modules"] == "all-linear"
    assert flat["labels.team"] == "search" and flat["revision"] == ""
    assert len(flat["eval_prompts"]) == 500  # a long list is cut
    assert flat["ftune.job_id"] == job.id and flat["ftune.dataset_sha256"] == job.dataset.sha256


def test_mlflow_needs_a_tracking_uri_on_the_worker(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(
        store,
        tmp_path / "m",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}],
        integrations={"mlflow": {}},
    )
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        Tracking.start(job, Settings(), ListReporter())
