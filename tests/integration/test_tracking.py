"""Experiment tracking on the tiny model: a job reports to a real MLflow server and to W&B
(offline), and what they hold matches what the job recorded."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.pipeline import run
from gpu_worker.reporter import ListReporter
from service.blobs import BlobStore, open_store
from service.settings import Settings
from tests.fixtures.tiny_model import stage_job


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path / "work", device="cpu")


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file: a 7-byte header, then LevelDB-log blocks of
    32 KiB whose records (7-byte header: crc, length, type) carry protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


@pytest.mark.slow
def test_a_job_reports_to_mlflow_and_wandb(
    tiny_model_dir: Path,
    tiny_preference_rows: list[dict[str, str]],
    store: BlobStore,
    settings: Settings,
    tmp_path: Path,
    mlflow_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    job = stage_job(
        store,
        tiny_model_dir,
        tiny_preference_rows[:32],
        job_id="job_tracked",
        integrations={
            "mlflow": {"experiment": "dpo-runs", "tags": {"team": "search"}},
            "wandb": {"project": "ftune-tests", "name": "tracked", "tags": ["tiny"]},
        },
    )
    reporter = ListReporter()
    result = run(
        job,
        tmp_path / "w",
        reporter,
        settings=replace(settings, mlflow_tracking_uri=mlflow_url),
        store=store,
    )
    losses = {step: values["loss"] for step, values in reporter.points if "loss" in values}
    assert list(losses) == [1, 2, 3, 4]
    (artifact,) = result.artifacts

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("dpo-runs")
    assert experiment is not None
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "job_tracked" and mlrun.info.status == "FINISHED"
    tags = mlrun.data.tags
    assert tags["team"] == "search" and tags["ftune.job_id"] == "job_tracked"
    assert tags["ftune.artifact.adapter"] == artifact.uri and tags["ftune.status"] == "succeeded"
    assert mlrun.data.params["hyperparameters.beta"] == "0.1"
    assert mlrun.data.params["lora.r"] == "8"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses, abs=1e-6)
    for key in ("rewards/accuracies", "tokens_per_second"):
        logged = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        assert logged == pytest.approx({s: v[key] for s, v in reporter.points}, abs=1e-6)
    finals = {
        k.removeprefix("final/"): v for k, v in mlrun.data.metrics.items() if k.startswith("final/")
    }
    assert finals == pytest.approx(result.final_metrics, abs=1e-6)

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*-job_tracked/run-job_tracked.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (wbrun,) = [r.run for r, k in zip(records, kinds, strict=True) if k == "run"]
    assert (wbrun.project, wbrun.display_name, list(wbrun.tags)) == (
        "ftune-tests",
        "tracked",
        ["tiny"],
    )
    history_rows = [
        _items(r.history.item) for r, k in zip(records, kinds, strict=True) if k == "history"
    ]
    assert {row["_step"]: row["loss"] for row in history_rows} == pytest.approx(losses, abs=1e-6)
    summary: dict[str, Any] = {}
    for r, k in zip(records, kinds, strict=True):
        if k == "summary":
            summary |= _items(r.summary.update)
    assert summary["ftune.artifact.adapter"] == artifact.uri
    assert summary["final/train_loss"] == pytest.approx(result.final_metrics["train_loss"])
    config = _items(wbrun.config.update)
    assert config["hyperparameters.beta"] == "0.1" and config["ftune.job_id"] == "job_tracked"
