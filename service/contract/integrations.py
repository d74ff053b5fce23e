"""`integrations` in a job spec: the experiment trackers a job also reports to.

Credentials never appear here: the workers hold them (MLFLOW_TRACKING_URI and MLflow's own
credential variables, WANDB_API_KEY, WANDB_BASE_URL, WANDB_MODE).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from service.contract.base import Strict

TRACKING_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9 ._/:-]{0,127}(?!\n)$"
Tag = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,63}(?!\n)$")]


class MlflowTracking(Strict):
    """An MLflow run per job on the workers' tracking server (MLFLOW_TRACKING_URI)."""

    experiment: Annotated[
        str,
        msgspec.Meta(
            pattern=TRACKING_NAME_RE,
            description="The experiment the run goes into (created if missing).",
        ),
    ] = "ftune"
    run_name: (
        Annotated[
            str,
            msgspec.Meta(pattern=TRACKING_NAME_RE, description="The run's name; null: the job id."),
        ]
        | None
    ) = None
    tags: Annotated[
        dict[Tag, Annotated[str, msgspec.Meta(max_length=256)]],
        msgspec.Meta(
            max_length=32,
            description="Tags set on the run, besides ftune's own (`ftune.job_id`, "
            "`ftune.artifact.<kind>`).",
        ),
    ] = msgspec.field(default_factory=dict)


class WandbTracking(Strict):
    """A Weights & Biases run per job (WANDB_API_KEY, WANDB_BASE_URL, WANDB_MODE on the workers)."""

    project: Annotated[str, msgspec.Meta(pattern=TRACKING_NAME_RE, description="The W&B project.")]
    entity: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=TRACKING_NAME_RE,
                description="The W&B team or user; null: the API key's default entity.",
            ),
        ]
        | None
    ) = None
    name: (
        Annotated[
            str,
            msgspec.Meta(pattern=TRACKING_NAME_RE, description="The run's name; null: the job id."),
        ]
        | None
    ) = None
    tags: Annotated[list[Tag], msgspec.Meta(max_length=32, description="Tags set on the run.")] = (
        msgspec.field(default_factory=list)
    )


class Integrations(Strict):
    """Experiment trackers the worker reports the job to, besides the service's own metrics."""

    mlflow: Annotated[
        MlflowTracking | None,
        msgspec.Meta(
            description="Log params, every metric point, the final metrics and the artifacts' "
            "locations to MLflow; null: no MLflow run."
        ),
    ] = None
    wandb: Annotated[
        WandbTracking | None,
        msgspec.Meta(
            description="Log the same to Weights & Biases (also offline, WANDB_MODE=offline); "
            "null: no W&B run."
        ),
    ] = None
