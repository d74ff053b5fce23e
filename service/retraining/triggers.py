"""When a policy fires: its trigger evaluated against new pairs, the schedule and the interval.

``min_new_pairs`` alone: fire once that many pairs arrived since the last run. ``cron`` alone:
fire at each scheduled time (UTC) if at least one new pair arrived. Both: at a scheduled time,
once ``min_new_pairs`` new pairs are there. A scheduled time that passes while the policy
cannot fire stays pending (several collapse into one). ``min_interval_seconds`` spaces runs; a
policy never has two runs in flight. Every firing counts: a run that fails still uses up the
pairs it saw.
"""

from __future__ import annotations

from datetime import UTC, datetime

from service.contract import Trigger
from service.contract.cron import Cron


def evaluate_trigger(
    trigger: Trigger,
    *,
    new_pairs: int,
    last_fired_at: float | None,
    cron_after: float,
    now: float,
    what: str = "pairs",
) -> tuple[bool, str, float | None]:
    """(fire?, why or why not, the pending or next scheduled time). `what` the new rows are
    called (`ratings` for a kto policy, which counts them)."""
    due: float | None = None
    if trigger.cron is not None:
        due = Cron(trigger.cron).next_after(cron_after)
        if due > now:
            stamp = datetime.fromtimestamp(due, UTC).isoformat(timespec="minutes")
            return False, f"waiting for the schedule ({stamp}); {new_pairs} new {what}", due
    need = trigger.min_new_pairs or 1
    if new_pairs < need:
        return False, f"waiting for {what}: {new_pairs} new of {need}", due
    if last_fired_at is not None and now - last_fired_at < trigger.min_interval_seconds:
        wait = trigger.min_interval_seconds - (now - last_fired_at)
        return False, f"{new_pairs} new {what}; the minimum interval ends in {wait:.0f}s", due
    why = f"{new_pairs} new {what} (at least {need})"
    if due is not None:
        why += ", scheduled " + datetime.fromtimestamp(due, UTC).isoformat(timespec="minutes")
    return True, why, due
