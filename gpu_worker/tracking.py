"""Report a job to the experiment trackers its spec names (`integrations`: MLflow, W&B).

Each tracker gets one run per job: the spec's settings as params (config), every metric point
the job records (TRL's keys and ours, at the optimizer step), then the final metrics (as
`final/<key>`) and where each artifact went (`ftune.artifact.<kind>`), and the job's outcome
(`ftune.status`: succeeded, failed, cancelled, or stopped, when a planned stop re-queues the job
and its next attempt carries on with the same run).

Why not transformers' `report_to` callbacks: they take their settings from environment
variables only (experiment, tags, run id), log TrainingArguments rather than the job spec, and
end the run when training ends, before publishing, so the artifact's location and the final
eval metrics could not be added. Addresses and credentials stay in the worker's environment,
read by the libraries themselves (MLFLOW_TRACKING_URI and MLflow's credential variables;
WANDB_API_KEY, WANDB_BASE_URL, WANDB_MODE, WANDB_DIR).

A tracker that cannot be reached when the job starts fails it in `preparing`, before any GPU
time is spent; one that fails later costs a log line, never the training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import msgspec

from gpu_worker.errors import ConfigError
from gpu_worker.reporter import Reporter
from service.contract import Artifact, Job, MlflowTracking, WandbTracking
from service.settings import Settings

MAX_PARAM_CHARS = 500
"""A list (eval_prompts) is logged as JSON, cut to this length."""


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(
        self, status: str, final_metrics: Mapping[str, float], artifacts: list[Artifact]
    ) -> None: ...


class Tracking:
    """The job's trackers; every call after the start is best effort."""

    def __init__(self, trackers: list[Tracker], reporter: Reporter) -> None:
        self.trackers = trackers
        self.reporter = reporter
        self._failed: set[str] = set()

    @classmethod
    def start(cls, job: Job, settings: Settings, reporter: Reporter) -> Tracking:
        integrations = job.spec.integrations
        trackers: list[Tracker] = []
        if integrations.mlflow is not None:
            trackers.append(MlflowTracker.start(integrations.mlflow, job, settings))
        if integrations.wandb is not None:
            trackers.append(WandbTracker.start(integrations.wandb, job))
        for tracker in trackers:
            reporter.log(f"reporting to {tracker.name}")
        return cls(trackers, reporter)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            self._call(tracker, f"step {step}", tracker.log, step, values)

    def finish(
        self,
        status: str,
        final_metrics: Mapping[str, float] | None = None,
        artifacts: list[Artifact] | None = None,
    ) -> None:
        for tracker in self.trackers:
            self._call(
                tracker, "the end", tracker.finish, status, final_metrics or {}, artifacts or []
            )

    def _call(self, tracker: Tracker, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            if tracker.name not in self._failed:  # once per tracker, not per step
                self._failed.add(tracker.name)
                self.reporter.log(f"{tracker.name}: could not record {what}: {exc}")


def params(job: Job) -> dict[str, str]:
    """The spec as flat `a.b.c` params, plus the job's id, attempt and data."""
    flat = dict(_flatten(msgspec.to_builtins(job.spec)))
    flat |= {
        "ftune.job_id": job.id,
        "ftune.attempt": str(job.attempt),
        "ftune.dataset_sha256": job.dataset.sha256,
        "ftune.init_adapter": job.init_adapter or "",
    }
    return flat


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        yield prefix[:-1], json.dumps(value)[:MAX_PARAM_CHARS]
    else:
        yield prefix[:-1], "" if value is None else str(value)


class MlflowTracker:
    """One MLflow run per job, found again by its `ftune.job_id` tag when the job resumes."""

    name = "MLflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, spec: MlflowTracking, job: Job, settings: Settings) -> MlflowTracker:
        if not settings.mlflow_tracking_uri:
            raise ConfigError(
                "integrations.mlflow needs a tracking server: set MLFLOW_TRACKING_URI in the "
                "workers' environment (or remove integrations.mlflow)"
            )
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(_missing("mlflow-skinny", "integrations.mlflow")) from None

        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        try:
            experiment = client.get_experiment_by_name(spec.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(spec.experiment)
            )
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.`ftune.job_id` = '{job.id}'", max_results=1
            )
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {**spec.tags, "ftune.job_id": job.id, "ftune.tenant": job.tenant}
                run = client.create_run(experiment_id, run_name=spec.run_name or job.id, tags=tags)
                run_id = run.info.run_id
                items = [Param(k, v) for k, v in params(job).items()]
                for i in range(0, len(items), 100):  # MLflow's limit per batch
                    client.log_batch(run_id, params=items[i : i + 100])
        except MlflowException as exc:
            raise ConfigError(
                f"integrations.mlflow: the tracking server ({settings.mlflow_tracking_uri}) "
                f"refused the run: {exc.message}"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"integrations.mlflow: the tracking server ({settings.mlflow_tracking_uri}) "
                f"could not be reached: {exc}"
            ) from None
        return cls(client, run_id)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(
        self, status: str, final_metrics: Mapping[str, float], artifacts: list[Artifact]
    ) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(f"final/{k}", v, now, 0) for k, v in final_metrics.items()]
        tags = [RunTag(f"ftune.artifact.{a.kind}", a.uri) for a in artifacts]
        tags.append(RunTag("ftune.status", status))
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        if status != "stopped":  # a planned stop: the next attempt goes on with this run
            mlflow_status = {"succeeded": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED")
            self.client.set_terminated(self.run_id, status=mlflow_status)


class WandbTracker:
    """One W&B run per job (its id is the job's, so a resumed job continues it)."""

    name = "Weights & Biases"

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, spec: WandbTracking, job: Job) -> WandbTracker:
        try:
            import wandb
        except ImportError:
            raise ConfigError(_missing("wandb", "integrations.wandb")) from None
        try:
            run = wandb.init(
                project=spec.project,
                entity=spec.entity,
                name=spec.name or job.id,
                tags=spec.tags,
                config=params(job),
                id=job.id,
                resume="allow",
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # wandb raises UsageError, CommError, ... with clear messages
            raise ConfigError(
                f"integrations.wandb: the run could not be started: {exc}. Check WANDB_API_KEY "
                "(and WANDB_BASE_URL for a self-hosted W&B) in the workers' environment, or "
                "set WANDB_MODE=offline there"
            ) from None
        return cls(run)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(
        self, status: str, final_metrics: Mapping[str, float], artifacts: list[Artifact]
    ) -> None:
        summary: dict[str, Any] = {f"final/{k}": v for k, v in final_metrics.items()}
        summary |= {f"ftune.artifact.{a.kind}": a.uri for a in artifacts}
        summary["ftune.status"] = status
        self.run.summary.update(summary)
        # A stopped job's next attempt resumes this run (same id); its end is final.
        self.run.finish(exit_code=0 if status in ("succeeded", "stopped") else 1)


def _missing(package: str, field: str) -> str:
    return (
        f"{field}: {package} is not installed on this worker (it comes with the `worker` "
        "extra): install it in the worker image, or remove the integration from the spec"
    )
