"""TRL's ORPO and CPO (SimPO) trainers, which TRL 1.16 keeps in `trl.experimental`.

The one place that names their import paths: when TRL moves or renames them, this module is
what changes. Importing `trl.experimental` warns; the warning is for people reading a script,
and a job's log would repeat it on every run, so it is silenced here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments


def _silence() -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# Both trainers' collators need the raw columns; they set remove_unused_columns=False
# themselves, with a warning in every job's log, unless the config already says so.


def orpo_config(**kwargs: Any) -> TrainingArguments:
    """TRL's ORPOConfig (beta is the paper's lambda)."""
    _silence()
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(remove_unused_columns=False, **kwargs)


def simpo_config(*, simpo_gamma: float, **kwargs: Any) -> TrainingArguments:
    """TRL's CPOConfig set for SimPO: loss_type simpo and no behaviour-cloning term
    (cpo_alpha 0), as TRL's documentation gives it for plain SimPO."""
    _silence()
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        remove_unused_columns=False,
        **kwargs,
    )


def orpo_trainer(**kwargs: Any) -> Trainer:
    _silence()
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(**kwargs)


def simpo_trainer(**kwargs: Any) -> Trainer:
    _silence()
    from trl.experimental.cpo import CPOTrainer

    return CPOTrainer(**kwargs)
