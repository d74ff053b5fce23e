"""A policy's rules as pure functions: the cron schedule, the trigger, the promotion gate."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from service.contract import DatasetRef, Gate, Job, JobError, JobSpec, JobStatus, Promoted, Trigger
from service.retraining.gate import decide
from service.retraining.triggers import Cron, evaluate_trigger


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M %a")


# --------------------------------------------------------------------------- cron


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 * * * *", "2024-01-01 00:07:00", "2024-01-01 00:15 Mon"),
        ("*/15 * * * *", "2024-01-01 00:15:00", "2024-01-01 00:30 Mon"),  # strictly after
        ("0 3 * * *", "2024-01-01 03:00:30", "2024-01-02 03:00 Tue"),
        ("30 23 31 12 *", "2024-06-01 00:00:00", "2024-12-31 23:30 Tue"),
        ("0 0 29 2 *", "2024-03-01 00:00:00", "2028-02-29 00:00 Tue"),
        ("0 9 * * mon-fri", "2024-01-05 10:00:00", "2024-01-08 09:00 Mon"),
        ("0 0 * * 7", "2024-01-01 00:00:00", "2024-01-07 00:00 Sun"),  # 7 is Sunday too
        ("0 0 13 * fri", "2024-01-01 00:00:00", "2024-01-05 00:00 Fri"),  # either day field
        ("0 12 1-7 jan,jul *", "2024-01-08 00:00:00", "2024-07-01 12:00 Mon"),
        ("5,35 8-10/2 * * *", "2024-01-01 08:35:00", "2024-01-01 10:05 Mon"),
        ("@daily", "2024-01-01 12:00:00", "2024-01-02 00:00 Tue"),
        ("@hourly", "2024-01-01 12:00:00", "2024-01-01 13:00 Mon"),
    ],
)
def test_cron_next_time(expr: str, after: str, expected: str) -> None:
    assert iso(Cron(expr).next_after(ts(after))) == expected


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("61 * * * *", "out of range"),
        ("* * *", "5 fields"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 * 13 *", "out of range"),
        ("*/0 * * * *", "step"),
        ("x * * * *", "not acceptable"),
        ("0 0 * * * 2030", "5 fields"),  # croniter takes seconds and years; crontab does not
    ],
)
def test_bad_cron_is_refused(expr: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Cron(expr)


def test_a_trigger_needs_a_count_or_a_schedule() -> None:
    with pytest.raises(msgspec.ValidationError, match="min_new_pairs, cron"):
        msgspec.convert({}, Trigger)
    with pytest.raises(msgspec.ValidationError, match="out of range"):
        msgspec.convert({"cron": "0 25 * * *"}, Trigger)


# --------------------------------------------------------------------------- trigger


def fires(trigger: Trigger, **state: Any) -> bool:
    fire, _why, _due = evaluate_trigger(trigger, **state)
    return fire


def test_count_trigger_fires_at_the_threshold_not_before() -> None:
    trigger = Trigger(min_new_pairs=24)
    state = {"last_fired_at": None, "cron_after": 0.0, "now": 100.0}
    assert not fires(trigger, new_pairs=23, **state)
    _, why, _ = evaluate_trigger(
        trigger, new_pairs=23, last_fired_at=None, cron_after=0.0, now=100.0
    )
    assert why == "waiting for pairs: 23 new of 24"
    assert fires(trigger, new_pairs=24, **state)


def test_minimum_interval_spaces_runs() -> None:
    trigger = Trigger(min_new_pairs=1, min_interval_seconds=600)
    assert not fires(trigger, new_pairs=50, last_fired_at=1000.0, cron_after=0.0, now=1599.0)
    assert fires(trigger, new_pairs=50, last_fired_at=1000.0, cron_after=0.0, now=1600.0)


def test_a_passed_schedule_stays_pending_until_pairs_arrive() -> None:
    trigger = Trigger(cron="0 * * * *")
    base = {"last_fired_at": None, "cron_after": ts("2024-01-01 10:05:00")}
    assert not fires(trigger, new_pairs=5, now=ts("2024-01-01 10:59:00"), **base)
    # 11:00 passed, but nothing new: wait, and fire when a pair comes in at 11:40.
    assert not fires(trigger, new_pairs=0, now=ts("2024-01-01 11:00:30"), **base)
    assert fires(trigger, new_pairs=1, now=ts("2024-01-01 11:40:00"), **base)


def test_schedule_and_count_together() -> None:
    trigger = Trigger(cron="0 3 * * *", min_new_pairs=100)
    base = {"last_fired_at": None, "cron_after": ts("2024-01-01 04:00:00")}
    assert not fires(trigger, new_pairs=500, now=ts("2024-01-02 02:59:00"), **base)
    assert not fires(trigger, new_pairs=99, now=ts("2024-01-02 03:00:00"), **base)
    assert fires(trigger, new_pairs=100, now=ts("2024-01-02 03:10:00"), **base)


# --------------------------------------------------------------------------- gate

HELD_OUT = DatasetRef(id="ds_eval", sha256="a" * 64, rows=6, format="standard")


def job(metrics: dict[str, float], status: JobStatus = JobStatus.succeeded, **spec: Any) -> Job:
    now = time.time()
    return Job(
        id="job_x",
        tenant="t",
        status=status,
        spec=msgspec.convert({"base_model": "org/m", "dataset_id": "ds_1", **spec}, JobSpec),
        dataset=DatasetRef(id="ds_1", sha256="b" * 64, rows=18, format="standard"),
        eval_dataset=HELD_OUT,
        created_at=now,
        updated_at=now,
        latest_metrics=metrics,
    )


def promoted(metrics: dict[str, float], eval_dataset: DatasetRef = HELD_OUT) -> Promoted:
    return Promoted(
        run_id="run_1",
        number=1,
        job_id="job_1",
        promoted_at=0.0,
        metrics=metrics,
        eval_dataset=eval_dataset,
        base_model="org/m",
        revision=None,
        beta=0.1,
        loss_type="sigmoid",
        artifacts=[],
    )


GATE = Gate(at_least={"eval_rewards/accuracies": 0.75}, at_most={"eval_loss": 0.69})
GOOD = {"eval_rewards/accuracies": 1.0, "eval_loss": 0.65}


def test_first_run_is_judged_by_the_thresholds_alone() -> None:
    decision = decide(GATE, job(GOOD), HELD_OUT, None)
    assert decision.promote, decision
    notes = [c.note for c in decision.checks]
    assert notes == [
        "eval_rewards/accuracies 1 >= 0.75",
        "eval_loss 0.65 <= 0.69",
        "no promoted model yet",
    ]


def test_worse_than_promoted_is_refused_with_the_reason() -> None:
    decision = decide(
        GATE, job({"eval_rewards/accuracies": 0.8, "eval_loss": 0.6}), HELD_OUT, promoted(GOOD)
    )
    assert not decision.promote
    assert decision.reason == (
        "eval_rewards/accuracies 0.8 is worse than promoted run 1's 1 (higher is better)"
    )
    tolerant = msgspec.structs.replace(GATE, tolerance=0.25)
    assert decide(
        tolerant, job({"eval_rewards/accuracies": 0.8, "eval_loss": 0.6}), HELD_OUT, promoted(GOOD)
    ).promote


def test_thresholds_and_lower_is_better() -> None:
    gate = Gate(not_worse_than_promoted={"eval_loss": "lower"})
    assert decide(gate, job({"eval_loss": 0.60}), HELD_OUT, promoted(GOOD)).promote
    refused = decide(gate, job({"eval_loss": 0.70}), HELD_OUT, promoted(GOOD))
    assert not refused.promote and "lower is better" in refused.reason
    below = decide(GATE, job({"eval_rewards/accuracies": 0.5, "eval_loss": 0.7}), HELD_OUT, None)
    assert below.reason == "eval_rewards/accuracies 0.5 < 0.75; eval_loss 0.7 > 0.69"


def test_a_missing_metric_or_a_failed_job_is_never_promoted() -> None:
    missing = decide(GATE, job({"eval_loss": 0.5}), HELD_OUT, None)
    assert not missing.promote and "reported no eval_rewards/accuracies" in missing.reason
    failed = job(GOOD, JobStatus.failed)
    failed.error = JobError(type="DatasetError", message="boom")
    decision = decide(GATE, failed, HELD_OUT, None)
    assert not decision.promote and decision.reason == "the job failed: DatasetError: boom"


def test_runs_that_cannot_be_compared_are_not_compared() -> None:
    other_eval = DatasetRef(id="ds_other", sha256="c" * 64, rows=6, format="standard")
    worse = {"eval_rewards/accuracies": 0.8, "eval_loss": 0.6}
    for why, candidate, best in [
        ("different held-out pairs", job(worse), promoted(GOOD, other_eval)),
        ("different base models", job(worse, base_model="org/other"), promoted(GOOD)),
        ("different beta", job(worse, hyperparameters={"beta": 0.5}), promoted(GOOD)),
    ]:
        decision = decide(GATE, candidate, HELD_OUT, best)
        assert decision.promote, why
        assert why in decision.checks[-1].note
