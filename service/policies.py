"""Retraining policies: when a feedback stream has grown enough, train, then promote if better.

A policy names a feedback stream, a job spec template, a trigger and a promotion gate. A
periodic :func:`tick` (run by every worker, one at a time through a lock) takes each policy one
step further:

1. no run in flight: if the trigger holds, *fire*: snapshot the stream into a dataset, submit
   a job from the template, record the run;
2. a run in flight whose job has ended: *decide*: apply the gate to the job's final metrics;
   a passing run becomes the policy's ``promoted`` model (and, if the template's output
   destination is the Hub or S3, its artifacts are published there); a failing run is kept
   with the reasons.

The held-out pairs. "Better than the promoted model" is only honest on the same pairs, scored
against the same reference. So every run of a policy is evaluated on one fixed eval dataset:
the template's ``eval_dataset_id`` if it names one, else a held-out set the policy draws at its
first firing (``holdout_fraction`` of the pairs gathered then, chosen with the template's seed)
and keeps for good. Held-out pairs, and any later pair identical to one, never go into
training. DPO's eval metrics (``eval_rewards/accuracies``, ``eval_loss``...) are relative to the
reference model, which is the base model with the adapter off; so two runs compare only when
they share the eval dataset, the base model and ``beta``/``loss_type``. When they do not, the
"not worse" check is skipped with a note and the absolute thresholds alone decide.

Triggers. ``min_new_pairs`` alone: fire once that many pairs arrived since the last run.
``cron`` alone: fire at each scheduled time (UTC) if at least one new pair arrived. Both: at a
scheduled time, once ``min_new_pairs`` new pairs are there. A scheduled time that passes while
the policy cannot fire stays pending (several collapse into one). ``min_interval_seconds``
spaces runs; a policy never has two runs in flight. Every firing counts: a run that fails
still uses up the pairs it saw.

Redis: ``ftune:policy:{tenant}:{name}:record`` (the :class:`Policy`, changed only through
WATCH/MULTI in :func:`update_policy`), ``...:status`` (the last evaluation, overwritten each
tick), ``ftune:policies:{tenant}`` (names) and ``ftune:policies`` (every [tenant, name]).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import math
import random
import secrets
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import msgspec
from arq.connections import ArqRedis
from redis.exceptions import WatchError

from service import feedback, queue
from service.blobs import BlobStore
from service.datasets import Limits
from service.settings import Settings
from service.specs import (
    Artifact,
    DatasetRef,
    Destination,
    Job,
    JobSpec,
    JobStatus,
    JobTemplate,
    StoreDestination,
    Strict,
)
from service.store import Conflict, NotFound, P, Store, new_id

__all__ = [
    "POLICY_NAME",
    "Cron",
    "Gate",
    "GateCheck",
    "GateDecision",
    "Holdout",
    "JobTemplate",
    "Policy",
    "PolicyList",
    "PolicyRun",
    "PolicySpec",
    "PolicyStatus",
    "Promoted",
    "Trigger",
    "decide",
    "delete_policy",
    "evaluate_trigger",
    "get_policy",
    "job_spec",
    "list_policies",
    "policy_loop",
    "publish_promoted",
    "put_policy",
    "tick",
    "update_policy",
]

log = logging.getLogger("ftune.policies")

POLICY_NAME = feedback.STREAM_NAME
MAX_RUNS = 100
"""Runs kept in a policy's history (the promoted one is kept apart, so it is never lost)."""
LOCK_SECONDS = 60.0
"""The tick lock's lifetime: a tick that dies leaves it for at most this long."""
FIRE_GRACE_SECONDS = 600.0
"""A firing that has not submitted its job after this long was interrupted (its tick died)."""
MAX_HOLDOUT = 2000
"""Held-out pairs are capped: enough to compare runs, small enough to score quickly."""
DEFAULT_INTERVAL = 5.0
"""Seconds between ticks of :func:`policy_loop`."""
RUN_LABEL = "policy"
"""The label every job of a policy carries, with the policy's name."""

MetricName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_./-]{1,64}$")]


# --------------------------------------------------------------------------- cron


_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {d.lower(): (i + 1) % 7 for i, d in enumerate(calendar.day_abbr)}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_SEARCH_DAYS = 366 * 8 + 2
"""Far enough to find any date that exists (29 February comes at least every 8 years)."""


class Cron:
    """A standard 5-field cron schedule (minute hour day-of-month month day-of-week) in UTC.

    Fields take ``*``, numbers, ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``,
    month and weekday names (``jan``, ``mon``; 0 and 7 are Sunday), and the macros
    ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``. As in Vixie cron, when both
    day fields are restricted a day matching either one counts.
    """

    def __init__(self, expr: str) -> None:
        self.expr = expr
        text = _MACROS.get(expr.strip().lower(), expr)
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(
                f"cron {expr!r} must have 5 fields (minute hour day-of-month month "
                "day-of-week) or be one of " + ", ".join(sorted(_MACROS))
            )
        sets = [_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        self.minutes, self.hours, self.days, self.months, weekdays = sets
        self.weekdays = {d % 7 for d in weekdays}
        self.any_day = parts[2].startswith("*")
        self.any_weekday = parts[4].startswith("*")
        if self._next_day(datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise ValueError(f"cron {expr!r} never fires (no such date)")

    def _day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return in_week
        if self.any_weekday:
            return in_month
        return in_month or in_week

    def _next_day(self, start: datetime) -> datetime | None:
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        for _ in range(_SEARCH_DAYS):
            if self._day_matches(day):
                return day
            day += timedelta(days=1)
        return None

    def next_after(self, t: float) -> float:
        """The first scheduled time strictly after `t` (seconds since the epoch)."""
        start = datetime.fromtimestamp((math.floor(t / 60) + 1) * 60, UTC)
        day: datetime | None = start
        while day is not None:
            day = self._next_day(day)
            if day is None:
                break
            same_day = day.date() == start.date()
            for hour in sorted(self.hours):
                if same_day and hour < start.hour:
                    continue
                for minute in sorted(self.minutes):
                    if same_day and hour == start.hour and minute < start.minute:
                        continue
                    return day.replace(hour=hour, minute=minute).timestamp()
            day += timedelta(days=1)
        raise ValueError(f"cron {self.expr!r} never fires")


def _parse_field(text: str, what: str, lo: int, hi: int, names: dict[str, int]) -> set[int]:
    def number(token: str) -> int:
        value = names.get(token.lower()) if names else None
        if value is None:
            if not token.isdigit():
                raise ValueError(f"cron {what} {token!r} is not a number")
            value = int(token)
        if not lo <= value <= hi:
            raise ValueError(f"cron {what} {value} is out of range {lo}-{hi}")
        return value

    found: set[int] = set()
    for item in text.split(","):
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron {what} step {step_text!r} must be a positive number")
            step = int(step_text)
        if body == "*":
            first, last = lo, hi
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = number(a), number(b)
            if first > last:
                raise ValueError(f"cron {what} range {body!r} runs backwards")
        else:
            first = number(body)
            last = hi if slash else first
        found.update(range(first, last + 1, step))
    return found


# --------------------------------------------------------------------------- the policy


def job_spec(
    template: JobTemplate,
    dataset_id: str,
    eval_dataset_id: str | None,
    *,
    policy: str | None = None,
) -> JobSpec:
    """The spec of a run's job: the template on a dataset, writing to the service's store.

    Goes through JobSpec's own validation (ValueError / msgspec.ValidationError), so a
    template is checked exactly like a submitted job.
    """
    data = msgspec.to_builtins(template)
    data["dataset_id"] = dataset_id
    data["eval_dataset_id"] = eval_dataset_id
    data["output"]["destination"] = {"type": "store"}
    if policy is not None:
        data["labels"] = {**data["labels"], RUN_LABEL: policy}
    return msgspec.convert(data, JobSpec)


class Trigger(Strict):
    min_new_pairs: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] | None = None
    """Fire once this many pairs arrived since the last run (with `cron`: at a scheduled time,
    once they are there)."""
    cron: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    """5-field cron schedule in UTC, e.g. `0 3 * * *`; fires only with new pairs."""
    min_interval_seconds: Annotated[float, msgspec.Meta(ge=0.0, le=366 * 86400.0)] = 0.0
    """At least this long between two firings."""

    def __post_init__(self) -> None:
        if self.min_new_pairs is None and self.cron is None:
            raise ValueError("a trigger needs min_new_pairs, cron, or both")
        if self.cron is not None:
            Cron(self.cron)


class Gate(Strict):
    """What a run's final metrics must show for it to be promoted. Eval metrics are scored on
    the policy's fixed held-out pairs (TRL's keys with `eval_`)."""

    at_least: Annotated[dict[MetricName, float], msgspec.Meta(max_length=16)] = {}
    """Each metric at least this, e.g. `{"eval_rewards/accuracies": 0.75}`."""
    at_most: Annotated[dict[MetricName, float], msgspec.Meta(max_length=16)] = {}
    """Each metric at most this, e.g. `{"eval_loss": 0.6}`."""
    not_worse_than_promoted: Annotated[
        dict[MetricName, Literal["higher", "lower"]], msgspec.Meta(max_length=16)
    ] = msgspec.field(default_factory=lambda: {"eval_rewards/accuracies": "higher"})
    """Each metric, in the direction that is better, no worse than the promoted run's."""
    tolerance: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    """How much worse than the promoted run still counts as not worse."""


class PolicySpec(Strict):
    stream: Annotated[str, msgspec.Meta(pattern=feedback.STREAM_NAME)]
    template: JobTemplate
    trigger: Trigger
    gate: Gate = msgspec.field(default_factory=Gate)
    holdout_fraction: Annotated[float, msgspec.Meta(gt=0.0, le=0.5)] = 0.1
    """Share of the pairs gathered at the first firing held out as the fixed eval set
    (ignored when the template names an eval_dataset_id)."""
    enabled: bool = True


class GateCheck(msgspec.Struct, kw_only=True):
    rule: Literal["at_least", "at_most", "not_worse_than_promoted", "job"]
    metric: str | None = None
    value: float | None = None
    bound: float | None = None
    passed: bool
    note: str


class GateDecision(msgspec.Struct, kw_only=True):
    promote: bool
    checks: list[GateCheck]
    reason: str


class Holdout(msgspec.Struct, kw_only=True):
    """The pairs held out of training for good, and the dataset made of them."""

    stream: str
    dataset: DatasetRef
    pairs_end: int
    """Drawn from pairs 0 .. pairs_end-1."""
    indices: list[int]
    created_at: float


RunStatus = Literal[
    "starting", "queued", "running", "succeeded", "failed", "cancelled", "not_started", "lost"
]
"""A run mirrors its job's status; `not_started`: its snapshot or job could not be made;
`lost`: its firing was interrupted or its job record vanished."""


class PolicyRun(msgspec.Struct, kw_only=True):
    id: str
    number: int
    fired_at: float
    reason: str
    """Why the policy fired."""
    pairs_end: int
    """The run trains on pairs 0 .. pairs_end-1 of the stream (minus the held-out ones)."""
    new_pairs: int
    job_id: str
    status: RunStatus = "starting"
    dataset: DatasetRef | None = None
    eval_dataset: DatasetRef | None = None
    snapshot_version: int | None = None
    metrics: dict[str, float] = {}
    """The job's final metrics."""
    decision: Literal["promoted", "rejected"] | None = None
    gate: list[GateCheck] = []
    decision_reason: str | None = None
    decided_at: float | None = None
    published: list[str] = []
    """Where the promoted artifacts were published (Hub or S3 URIs)."""
    publish_error: str | None = None


class Promoted(msgspec.Struct, kw_only=True):
    run_id: str
    number: int
    job_id: str
    promoted_at: float
    metrics: dict[str, float]
    eval_dataset: DatasetRef
    base_model: str
    revision: str | None
    beta: float
    loss_type: str
    artifacts: list[Artifact]
    published: list[str] = []


class PolicyStatus(msgspec.Struct, kw_only=True):
    checked_at: float
    message: str
    new_pairs: int | None = None
    next_cron_at: float | None = None


class Policy(msgspec.Struct, kw_only=True):
    name: str
    tenant: str
    spec: PolicySpec
    revision: int = 1
    """Goes up with every PUT."""
    created_at: float
    updated_at: float
    pairs_at_last_run: int = 0
    last_fired_at: float | None = None
    cron_after: float
    """Scheduled times after this one are pending."""
    active_run: str | None = None
    promoted: Promoted | None = None
    holdout: Holdout | None = None
    runs: list[PolicyRun] = []
    """Newest first; the last MAX_RUNS."""
    status: PolicyStatus | None = None
    """The last evaluation by the periodic task (filled in when read)."""


class PolicyList(msgspec.Struct, kw_only=True):
    items: list[Policy]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- pure decisions


def evaluate_trigger(
    trigger: Trigger,
    *,
    new_pairs: int,
    last_fired_at: float | None,
    cron_after: float,
    now: float,
) -> tuple[bool, str, float | None]:
    """(fire?, why or why not, the pending or next scheduled time)."""
    due: float | None = None
    if trigger.cron is not None:
        due = Cron(trigger.cron).next_after(cron_after)
        if due > now:
            stamp = datetime.fromtimestamp(due, UTC).isoformat(timespec="minutes")
            return False, f"waiting for the schedule ({stamp}); {new_pairs} new pairs", due
    need = trigger.min_new_pairs or 1
    if new_pairs < need:
        return False, f"waiting for pairs: {new_pairs} new of {need}", due
    if last_fired_at is not None and now - last_fired_at < trigger.min_interval_seconds:
        wait = trigger.min_interval_seconds - (now - last_fired_at)
        return False, f"{new_pairs} new pairs; the minimum interval ends in {wait:.0f}s", due
    why = f"{new_pairs} new pairs (at least {need})"
    if due is not None:
        why += ", scheduled " + datetime.fromtimestamp(due, UTC).isoformat(timespec="minutes")
    return True, why, due


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
    for metric, better in gate.not_worse_than_promoted.items():
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
    if (hp.beta, hp.loss_type.value) != (promoted.beta, promoted.loss_type):
        return "they use a different beta or loss_type, which scale the rewards differently"
    return ""


# --------------------------------------------------------------------------- Redis


def _key(tenant: str, name: str, part: str) -> str:
    return f"{P}policy:{tenant}:{name}:{part}"


def _index(tenant: str) -> str:
    return f"{P}policies:{tenant}"


ALL = f"{P}policies"
"""Every policy as a JSON [tenant, name], for the periodic task."""

_encoder = msgspec.json.Encoder()
_policy_decoder = msgspec.json.Decoder(Policy)
_status_decoder = msgspec.json.Decoder(PolicyStatus)
_member_decoder = msgspec.json.Decoder(tuple[str, str])


async def get_policy(store: Store, tenant: str, name: str, *, with_status: bool = False) -> Policy:
    raw = await store.redis.get(_key(tenant, name, "record"))
    if raw is None:
        raise NotFound(f"policy {name} does not exist")
    policy = _policy_decoder.decode(raw)
    if with_status:
        status = await store.redis.get(_key(tenant, name, "status"))
        policy.status = _status_decoder.decode(status) if status else None
    return policy


async def list_policies(
    store: Store, tenant: str, *, limit: int, cursor: str | None
) -> tuple[list[Policy], str | None]:
    names, next_cursor = await store.page_by_name(_index(tenant), limit, cursor)
    if not names:
        return [], None
    records = await store.redis.mget([_key(tenant, n, "record") for n in names])
    return [_policy_decoder.decode(r) for r in records if r], next_cursor


async def put_policy(
    store: Store, tenant: str, name: str, spec: PolicySpec, *, now: float | None = None
) -> tuple[Policy, bool]:
    """Create or replace a policy's spec, keeping its history; (policy, created?).

    A new stream starts the count and the held-out set afresh; a new schedule starts from now.
    """
    now = time.time() if now is None else now
    key = _key(tenant, name, "record")
    async with store.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    policy = Policy(
                        name=name,
                        tenant=tenant,
                        spec=spec,
                        created_at=now,
                        updated_at=now,
                        cron_after=now,
                    )
                else:
                    old = _policy_decoder.decode(raw)
                    policy = msgspec.structs.replace(
                        old, spec=spec, revision=old.revision + 1, updated_at=now
                    )
                    if spec.stream != old.spec.stream:
                        policy.pairs_at_last_run = 0
                        policy.holdout = None
                    if spec.trigger.cron != old.spec.trigger.cron:
                        policy.cron_after = now
                pipe.multi()
                pipe.set(key, _encoder.encode(policy))
                pipe.zadd(_index(tenant), {name: 0})
                pipe.zadd(ALL, {_encoder.encode((tenant, name)): 0})
                await pipe.execute()
                return policy, raw is None
            except WatchError:
                continue


async def delete_policy(store: Store, tenant: str, name: str) -> Policy:
    """Forget a policy and its history; a run in flight finishes as a plain job."""
    policy = await get_policy(store, tenant, name)
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.delete(_key(tenant, name, "record"), _key(tenant, name, "status"))
        pipe.zrem(_index(tenant), name)
        pipe.zrem(ALL, _encoder.encode((tenant, name)))
        await pipe.execute()
    return policy


async def update_policy(
    store: Store, tenant: str, name: str, change: Callable[[Policy], Policy]
) -> Policy:
    """Apply `change` atomically (it may raise Conflict to refuse); NotFound if deleted."""
    key = _key(tenant, name, "record")
    async with store.redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    raise NotFound(f"policy {name} does not exist")
                new = change(_policy_decoder.decode(raw))
                pipe.multi()
                pipe.set(key, _encoder.encode(new))
                await pipe.execute()
                return new
            except WatchError:
                continue


async def _set_status(store: Store, policy: Policy, status: PolicyStatus) -> None:
    await store.redis.set(_key(policy.tenant, policy.name, "status"), _encoder.encode(status))


def _with_run(policy: Policy, run_id: str, **fields: Any) -> Policy:
    """The policy with one run's fields changed; Conflict if that run is no longer in flight."""
    if policy.active_run != run_id:
        raise Conflict(f"run {run_id} of policy {policy.name} is no longer in flight")
    runs = [msgspec.structs.replace(r, **fields) if r.id == run_id else r for r in policy.runs]
    return msgspec.structs.replace(policy, runs=runs)


# --------------------------------------------------------------------------- the tick

Publisher = Callable[[Job, Destination, BlobStore, Settings], list[str]]


class _Lock:
    """One tick at a time across workers; released when done, expires if its holder dies."""

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.key, self.token = store, f"{P}lock:{name}", secrets.token_hex(8)

    async def acquire(self, seconds: float) -> bool:
        redis = self.store.redis
        return bool(await redis.set(self.key, self.token, nx=True, px=int(seconds * 1000)))

    async def release(self) -> None:
        async with self.store.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.key)
                if (await pipe.get(self.key)) == self.token.encode():
                    pipe.multi()
                    pipe.delete(self.key)
                    await pipe.execute()
            except WatchError:
                pass


async def tick(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    *,
    now: float | None = None,
    publisher: Publisher | None = None,
) -> list[str]:
    """Take every policy one step further; returns what happened, one line per action.

    Guarded by a lock so that only one worker acts at a time; each step is also a
    compare-and-set on the policy record, so a tick that outlives its lock cannot fire twice.
    """
    lock = _Lock(store, "policies")
    if not await lock.acquire(LOCK_SECONDS):
        return []
    done: list[str] = []
    try:
        for raw in await store.redis.zrange(ALL, 0, -1):
            tenant, name = _member_decoder.decode(raw)
            try:
                done += await _advance(
                    store,
                    pool,
                    blobs,
                    settings,
                    tenant,
                    name,
                    now=time.time() if now is None else now,
                    publisher=publisher or publish_promoted,
                )
            except NotFound:
                continue
            except Exception:
                log.exception("policy %s of %s: the step failed", name, tenant)
    finally:
        await lock.release()
    return done


async def policy_loop(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    *,
    interval: float = DEFAULT_INTERVAL,
) -> None:
    """Tick forever; what the worker runs beside training (cancel the task to stop it)."""
    while True:
        try:
            for line in await tick(store, pool, blobs, settings):
                log.info("%s", line)
        except Exception:
            log.exception("policy tick failed")
        await asyncio.sleep(interval)


async def _advance(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    tenant: str,
    name: str,
    *,
    now: float,
    publisher: Publisher,
) -> list[str]:
    policy = await get_policy(store, tenant, name)
    if policy.active_run is not None:
        return await _follow(store, pool, blobs, settings, policy, now=now, publisher=publisher)
    if not policy.spec.enabled:
        await _set_status(store, policy, PolicyStatus(checked_at=now, message="disabled"))
        return []
    total = await feedback.pair_count(store, tenant, policy.spec.stream)
    new_pairs = total - policy.pairs_at_last_run
    fire, why, due = evaluate_trigger(
        policy.spec.trigger,
        new_pairs=new_pairs,
        last_fired_at=policy.last_fired_at,
        cron_after=policy.cron_after,
        now=now,
    )
    if not fire:
        status = PolicyStatus(checked_at=now, message=why, new_pairs=new_pairs, next_cron_at=due)
        await _set_status(store, policy, status)
        return []
    return await _fire(store, pool, blobs, settings, policy, total, why, now=now)


async def _fire(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    seen: Policy,
    total: int,
    why: str,
    *,
    now: float,
) -> list[str]:
    tenant, name, spec = seen.tenant, seen.name, seen.spec
    run_id = new_id("run")
    job_id = "job_" + run_id.removeprefix("run_")
    number = (seen.runs[0].number if seen.runs else 0) + 1

    def claim(policy: Policy) -> Policy:
        if policy.active_run is not None or policy.revision != seen.revision:
            raise Conflict("the policy changed while it was evaluated")
        run = PolicyRun(
            id=run_id,
            number=number,
            fired_at=now,
            reason=why,
            pairs_end=total,
            new_pairs=total - policy.pairs_at_last_run,
            job_id=job_id,
        )
        return msgspec.structs.replace(
            policy,
            active_run=run_id,
            runs=[run, *policy.runs][:MAX_RUNS],
            pairs_at_last_run=total,
            last_fired_at=now,
            cron_after=now,
        )

    try:
        policy = await update_policy(store, tenant, name, claim)
    except Conflict:
        return []
    await _set_status(
        store, policy, PolicyStatus(checked_at=now, message=f"fired run {number}: {why}")
    )
    limits = Limits(max_line_bytes=settings.max_line_bytes, max_rows=settings.max_dataset_rows)
    try:
        eval_dataset, held, drawn = await _eval_set(store, blobs, policy, total, limits, now=now)
        select = await _training_filter(store, tenant, held) if held else None
        train = await feedback.snapshot(
            store,
            blobs,
            tenant,
            spec.stream,
            limits=limits,
            end=total,
            select=select,
            selection="train" if select else "all",
            by=f"policy {name} run {number}",
        )
        if eval_dataset.format != train.dataset.format:
            raise ValueError(
                f"the eval dataset {eval_dataset.id} is {eval_dataset.format}, the stream's "
                f"pairs are {train.dataset.format}"
            )
        job = Job(
            id=job_id,
            tenant=tenant,
            status=JobStatus.queued,
            spec=job_spec(spec.template, train.dataset.id, eval_dataset.id, policy=name),
            dataset=train.dataset,
            eval_dataset=eval_dataset,
            created_at=now,
            updated_at=now,
        )
        await store.create_job(job)
    except Exception as exc:
        reason = f"could not start: {type(exc).__name__}: {exc}"
        log.warning("policy %s of %s: run %s %s", name, tenant, number, reason)
        await _close_run(store, tenant, name, run_id, status="not_started", reason=reason, now=now)
        return [f"policy {name} of {tenant}: run {number} {reason}"]

    def started(p: Policy) -> Policy:
        p = _with_run(
            p,
            run_id,
            status="queued",
            dataset=train.dataset,
            eval_dataset=eval_dataset,
            snapshot_version=train.version,
        )
        if drawn and held is not None:
            p = msgspec.structs.replace(p, holdout=held)
        return p

    try:
        await update_policy(store, tenant, name, started)
    except (Conflict, NotFound):
        # Abandoned by another tick (past FIRE_GRACE_SECONDS) or deleted: nobody waits for it.
        await _cancel(store, job_id)
        return []
    await queue.enqueue(pool, job_id, 0, queue_name=settings.queue_name)
    return [f"policy {name} of {tenant}: fired run {number} ({why}) as job {job_id}"]


async def _eval_set(
    store: Store, blobs: BlobStore, policy: Policy, total: int, limits: Limits, *, now: float
) -> tuple[DatasetRef, Holdout | None, bool]:
    """The run's eval dataset; the held-out pairs it is made of, if they come from the
    stream; and whether this run drew them (the first run does)."""
    template = policy.spec.template
    if template.eval_dataset_id is not None:
        try:
            ds = await store.get_dataset(template.eval_dataset_id, policy.tenant)
        except NotFound:
            raise ValueError(
                f"the template's eval dataset {template.eval_dataset_id} does not exist"
            ) from None
        return DatasetRef(id=ds.id, sha256=ds.sha256, rows=ds.rows, format=ds.format), None, False
    if policy.holdout is not None and policy.holdout.stream == policy.spec.stream:
        return policy.holdout.dataset, policy.holdout, False
    k = min(MAX_HOLDOUT, max(1, round(total * policy.spec.holdout_fraction)))
    if k >= total:
        raise ValueError(
            f"{total} pairs are too few to hold {k} out for evaluation and train on the rest"
        )
    seed = template.hyperparameters.seed
    indices = sorted(random.Random(seed).sample(range(total), k))
    chosen = set(indices)
    snap = await feedback.snapshot(
        store,
        blobs,
        policy.tenant,
        policy.spec.stream,
        limits=limits,
        end=total,
        select=lambda i, _row: i in chosen,
        selection="held_out",
        by=f"policy {policy.name}",
        name=f"{policy.spec.stream} held out by policy {policy.name}",
    )
    holdout = Holdout(
        stream=policy.spec.stream,
        dataset=snap.dataset,
        pairs_end=total,
        indices=indices,
        created_at=now,
    )
    return snap.dataset, holdout, True


async def _training_filter(
    store: Store, tenant: str, holdout: Holdout
) -> Callable[[int, bytes], bool]:
    """Keeps every pair but the held-out ones and any later copy of one."""
    chosen = set(holdout.indices)
    pairs = await feedback.read_pairs_at(store, tenant, holdout.stream, holdout.indices)
    rows = {_encoder.encode(pair.row) for pair in pairs}
    return lambda i, row: i not in chosen and row not in rows


async def _follow(
    store: Store,
    pool: ArqRedis,
    blobs: BlobStore,
    settings: Settings,
    policy: Policy,
    *,
    now: float,
    publisher: Publisher,
) -> list[str]:
    """A run is in flight: watch its job; when it has ended, apply the gate."""
    tenant, name = policy.tenant, policy.name
    run = next(r for r in policy.runs if r.id == policy.active_run)
    label = f"policy {name} of {tenant}: run {run.number}"
    try:
        job = await store.get_job(run.job_id, None)
    except NotFound:
        if run.status == "starting" and now - run.fired_at < FIRE_GRACE_SECONDS:
            return []  # the firing tick is still at work
        reason = (
            "the firing was interrupted before its job was submitted"
            if run.status == "starting"
            else f"its job {run.job_id} no longer exists"
        )
        await _close_run(store, tenant, name, run.id, status="lost", reason=reason, now=now)
        return [f"{label} lost: {reason}"]
    if run.status == "starting":
        if now - run.fired_at < FIRE_GRACE_SECONDS:
            return []
        # The firing tick died after submitting: adopt the job, make sure it is queued.
        if job.status == JobStatus.queued:
            await queue.enqueue(pool, job.id, job.attempt, queue_name=settings.queue_name)
        await update_policy(
            store,
            tenant,
            name,
            lambda p: _with_run(
                p,
                run.id,
                status=job.status.value,
                dataset=job.dataset,
                eval_dataset=job.eval_dataset,
            ),
        )
        return [f"{label} adopted job {job.id}"]
    if not job.status.terminal:
        if run.status != job.status.value:
            await update_policy(
                store, tenant, name, lambda p: _with_run(p, run.id, status=job.status.value)
            )
        step = job.progress.step
        total = job.progress.total_steps
        await _set_status(
            store,
            policy,
            PolicyStatus(
                checked_at=now,
                message=f"run {run.number}: job {job.id} is {job.status.value} "
                f"(step {step}" + (f" of {total})" if total else ")"),
            ),
        )
        return []

    decision = decide(policy.spec.gate, job, run.eval_dataset, policy.promoted)
    published: list[str] = []
    publish_error = None
    destination = policy.spec.template.output.destination
    if decision.promote and not isinstance(destination, StoreDestination):
        try:
            published = await anyio.to_thread.run_sync(publisher, job, destination, blobs, settings)
        except Exception as exc:
            publish_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: publishing failed: %s", label, publish_error)

    def finish(p: Policy) -> Policy:
        p = _with_run(
            p,
            run.id,
            status=job.status.value,
            metrics=dict(job.latest_metrics),
            decision="promoted" if decision.promote else "rejected",
            gate=decision.checks,
            decision_reason=decision.reason,
            decided_at=now,
            published=published,
            publish_error=publish_error,
        )
        promoted = p.promoted
        if decision.promote and run.eval_dataset is not None:
            hp = job.spec.hyperparameters
            promoted = Promoted(
                run_id=run.id,
                number=run.number,
                job_id=job.id,
                promoted_at=now,
                metrics=dict(job.latest_metrics),
                eval_dataset=run.eval_dataset,
                base_model=job.spec.base_model,
                revision=job.spec.revision,
                beta=hp.beta,
                loss_type=hp.loss_type.value,
                artifacts=job.artifacts,
                published=published,
            )
        return msgspec.structs.replace(p, active_run=None, promoted=promoted)

    try:
        await update_policy(store, tenant, name, finish)
    except Conflict:
        return []
    verdict = "promoted" if decision.promote else "rejected"
    await _set_status(
        store,
        policy,
        PolicyStatus(checked_at=now, message=f"run {run.number} {verdict}: {decision.reason}"),
    )
    return [f"{label} {verdict}: {decision.reason}"]


async def _close_run(
    store: Store, tenant: str, name: str, run_id: str, *, status: RunStatus, reason: str, now: float
) -> None:
    def close(p: Policy) -> Policy:
        p = _with_run(
            p,
            run_id,
            status=status,
            decision="rejected",
            gate=[GateCheck(rule="job", passed=False, note=reason)],
            decision_reason=reason,
            decided_at=now,
        )
        return msgspec.structs.replace(p, active_run=None)

    with contextlib.suppress(Conflict, NotFound):
        await update_policy(store, tenant, name, close)


async def _cancel(store: Store, job_id: str) -> None:
    def cancel(job: Job) -> Job:
        if job.status.terminal:
            raise Conflict(job.status.value)
        return msgspec.structs.replace(
            job, status=JobStatus.cancelled, cancel_requested=True, finished_at=time.time()
        )

    with contextlib.suppress(Conflict, NotFound):
        await store.update_job(job_id, cancel)


# --------------------------------------------------------------------------- publishing


def publish_promoted(
    job: Job, destination: Destination, blobs: BlobStore, settings: Settings
) -> list[str]:
    """Copy a promoted run's artifacts from the service's store to the template's destination.

    Runs in the worker (which holds the Hub token and S3 credentials) and uses the worker's
    own publisher, imported here so the API never loads it. Returns the published URIs.
    """
    from gpu_worker.publish import publish

    final = msgspec.structs.replace(
        job,
        spec=msgspec.structs.replace(
            job.spec, output=msgspec.structs.replace(job.spec.output, destination=destination)
        ),
    )
    uris = []
    base = blobs.url + "/"
    with tempfile.TemporaryDirectory(prefix="ftune-promote-") as tmp:
        for artifact in job.artifacts:
            if not artifact.uri.startswith(base):
                raise ValueError(f"artifact {artifact.uri} is not in the service's store")
            folder = Path(tmp) / artifact.kind
            blobs.download_dir(artifact.uri.removeprefix(base), folder)
            uris.append(
                publish(
                    folder,
                    kind=artifact.kind,
                    job=final,
                    settings=settings,
                    store=blobs,
                    final_metrics=job.latest_metrics,
                ).uri
            )
    return uris
