"""OpenAI's hyperparameters, "auto" resolved to values from the dataset size and the model.

The rules (the README's migration section repeats them):

- `n_epochs`: 3, lowered so that epochs x rows stays at most 25,000 examples and raised so it
  reaches at least 100 (between 1 and 25 epochs): OpenAI's published rule.
- `batch_size`, the examples per optimizer step: 0.2% of the rows (OpenAI's published rule),
  at least 8, at most 256, and never more than the rows.
- how a batch is split on a worker (our `batch_size` x `gradient_accumulation_steps`): the
  largest divisor of the batch up to 8 whose GPU memory estimate (service/vram.py, from the
  model's shape) fits the workers (`FTUNE_WORKER_GPU_MEMORY_GB`); the rest is accumulated.
  An explicit batch_size is split the same way.
- `learning_rate_multiplier`: 1, i.e. our default learning rate for the method (5e-6 for dpo,
  2e-4 for supervised).
- `beta`: 0.1, TRL's and the DPO paper's default.

`rows` is the training file's row count (before any eval split).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from service.contract.openai import (
    BASE_LEARNING_RATES,
    DpoHyperparametersCreate,
    FineTuningJobCreate,
    LegacyHyperparameters,
)

DEFAULT_EPOCHS = 3
MIN_EXAMPLES, MAX_EXAMPLES = 100, 25_000
MAX_AUTO_EPOCHS = 25
BATCH_FRACTION = 0.002
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 8, 256
MAX_MICRO_BATCH = 8
AUTO_BETA = 0.1
AUTO_MULTIPLIER = 1.0

N = TypeVar("N", int, float)


class SpecError(ValueError):
    """A create body that cannot become a job; `param` names the field in OpenAI's terms."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Requested:
    """OpenAI's hyperparameters as asked for (beta: DPO's only); None means auto."""

    beta: float | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    n_epochs: int | None = None


def requested(create: FineTuningJobCreate) -> Requested:
    """The hyperparameters of `method.dpo` or of the older top-level form (not both)."""
    given: LegacyHyperparameters | None = create.hyperparameters
    if create.method is not None:
        if create.hyperparameters is not None:
            raise SpecError(
                "hyperparameters",
                f"give the hyperparameters in method.{create.method.type}.hyperparameters or "
                "at the top level (OpenAI's deprecated form), not both",
            )
        method = create.method
        for other in ("dpo", "supervised"):
            if other != method.type and getattr(method, other) is not None:
                raise SpecError(
                    f"method.{other}",
                    f"method.type is {method.type!r}: give its settings in "
                    f"method.{method.type}, not method.{other} (they would be ignored)",
                )
        if method.type == "supervised":
            given = method.supervised.hyperparameters if method.supervised else None
        else:
            given = method.dpo.hyperparameters if method.dpo else None
    if given is None:
        return Requested()
    beta = given.beta if isinstance(given, DpoHyperparametersCreate) else None
    return Requested(
        beta=_value(beta),
        batch_size=_value(given.batch_size),
        learning_rate_multiplier=_value(given.learning_rate_multiplier),
        n_epochs=_value(given.n_epochs),
    )


def _value(value: N | str | None) -> N | None:
    """None for "auto" or left out."""
    return None if value is None or isinstance(value, str) else value


def auto_epochs(rows: int) -> int:
    rows = max(rows, 1)
    if rows * DEFAULT_EPOCHS < MIN_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_EXAMPLES / rows))
    if rows * DEFAULT_EPOCHS > MAX_EXAMPLES:
        return max(1, MAX_EXAMPLES // rows)
    return DEFAULT_EPOCHS


def auto_batch_size(rows: int) -> int:
    batch = min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, round(rows * BATCH_FRACTION)))
    return max(1, min(batch, rows))


def splits(batch_size: int) -> Iterator[tuple[int, int]]:
    """(per-device batch, accumulation steps) for a batch per optimizer step, the largest
    per-device batch first."""
    for micro in range(min(batch_size, MAX_MICRO_BATCH), 0, -1):
        if batch_size % micro == 0:
            yield micro, batch_size // micro


def resolve(req: Requested, rows: int, kind: str) -> dict[str, float | int]:
    """Our hyperparameter values for OpenAI's four (batch split aside: `batch` is the batch
    per optimizer step, for `splits`), for OpenAI method `kind` (dpo or supervised)."""
    multiplier = req.learning_rate_multiplier or AUTO_MULTIPLIER
    return {
        "beta": req.beta if req.beta is not None else AUTO_BETA,
        "learning_rate": multiplier * BASE_LEARNING_RATES[kind],
        "num_epochs": float(req.n_epochs if req.n_epochs is not None else auto_epochs(rows)),
        "batch": req.batch_size if req.batch_size is not None else auto_batch_size(rows),
    }
