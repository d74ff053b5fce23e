"""The promotion gate: an ended run's metrics against thresholds and the promoted run."""

from __future__ import annotations

import math
from typing import Literal

from service.contract import (
    DEFAULT_NOT_WORSE,
    DatasetRef,
    Gate,
    GateCheck,
    GateDecision,
    Job,
    JobStatus,
    Promoted,
)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def decide(
    gate: Gate,
    job: Job,
    eval_dataset: DatasetRef | None,
    promoted: Promoted | None,
) -> GateDecision:
    """The gate applied to an ended job: promote only a succeeded run that passes every check."""
    if job.status != JobStatus.succeeded:
        why = f"the job {job.status.value}"
        if job.error is not None:
            why += f": {job.error.type}: {job.error.message}"
        return GateDecision(
            promote=False, checks=[GateCheck(rule="job", passed=False, note=why)], reason=why
        )
    metrics = job.latest_metrics
    checks: list[GateCheck] = []

    def present(metric: str) -> float | None:
        value = metrics.get(metric)
        if value is None or math.isnan(value):
            return None
        return value

    thresholds: list[tuple[Literal["at_least", "at_most"], dict[str, float]]] = [
        ("at_least", gate.at_least),
        ("at_most", gate.at_most),
    ]
    for rule, bounds in thresholds:
        for metric, bound in bounds.items():
            value = present(metric)
            if value is None:
                checks.append(
                    GateCheck(
                        rule=rule,
                        metric=metric,
                        bound=bound,
                        passed=False,
                        note=f"the job reported no {metric}",
                    )
                )
                continue
            passed = value >= bound if rule == "at_least" else value <= bound
            sign = (">=" if passed else "<") if rule == "at_least" else ("<=" if passed else ">")
            checks.append(
                GateCheck(
                    rule=rule,
                    metric=metric,
                    value=value,
                    bound=bound,
                    passed=passed,
                    note=f"{metric} {_fmt(value)} {sign} {_fmt(bound)}",
                )
            )
    incomparable = _incomparable(job, eval_dataset, promoted)
    compared = gate.not_worse_than_promoted
    if compared is None:  # a gate outside a policy spec: the job's method's comparison
        compared = DEFAULT_NOT_WORSE[job.spec.method]
    for metric, better in compared.items():
        value = present(metric)
        if promoted is None or incomparable:
            note = (
                "no promoted model yet"
                if promoted is None
                else f"not compared with run {promoted.number}: {incomparable}"
            )
            checks.append(
                GateCheck(
                    rule="not_worse_than_promoted",
                    metric=metric,
                    value=value,
                    passed=True,
                    note=note,
                )
            )
            continue
        best = promoted.metrics.get(metric)
        if value is None or best is None or math.isnan(best):
            missing = "the job" if value is None else f"promoted run {promoted.number}"
            checks.append(
                GateCheck(
                    rule="not_worse_than_promoted",
                    metric=metric,
                    value=value,
                    bound=best,
                    passed=False,
                    note=f"{missing} reported no {metric}",
                )
            )
            continue
        if better == "higher":
            passed = value >= best - gate.tolerance
        else:
            passed = value <= best + gate.tolerance
        verdict = "not worse than" if passed else "worse than"
        checks.append(
            GateCheck(
                rule="not_worse_than_promoted",
                metric=metric,
                value=value,
                bound=best,
                passed=passed,
                note=f"{metric} {_fmt(value)} is {verdict} promoted run {promoted.number}'s "
                f"{_fmt(best)} ({better} is better)",
            )
        )
    failed = [c for c in checks if not c.passed]
    if failed:
        return GateDecision(promote=False, checks=checks, reason="; ".join(c.note for c in failed))
    return GateDecision(
        promote=True,
        checks=checks,
        reason="passed: " + "; ".join(c.note for c in checks) if checks else "no checks",
    )


def _incomparable(job: Job, eval_dataset: DatasetRef | None, promoted: Promoted | None) -> str:
    """Why the job's eval metrics cannot be compared with the promoted run's ("" if they can)."""
    if promoted is None:
        return ""
    spec, hp = job.spec, job.spec.hyperparameters
    if eval_dataset is None or eval_dataset.sha256 != promoted.eval_dataset.sha256:
        return "they were evaluated on different held-out pairs"
    if (spec.base_model, spec.revision) != (promoted.base_model, promoted.revision):
        return "they fine-tune different base models"
    if spec.method != promoted.method:
        return (
            f"they were trained with different methods ({spec.method} and {promoted.method}), "
            "whose metrics measure different things"
        )
    if (hp.beta, hp.loss_type.value) != (promoted.beta, promoted.loss_type):
        return "they use a different beta or loss_type, which scale the rewards differently"
    return ""
