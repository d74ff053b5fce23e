"""Cron schedules (UTC) through croniter, held to the standard 5 fields so a policy's schedule
means what every crontab means (croniter would also take seconds and years)."""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterBadDateError, CroniterError, croniter

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class Cron:
    """minute hour day-of-month month day-of-week, or a macro such as ``@daily``.

    Names (``jan``, ``mon``), ranges, steps and lists as in Vixie cron; when both day fields
    are restricted a day matching either one counts.
    """

    def __init__(self, expr: str) -> None:
        self.expr = expr.strip()
        if self.expr.lower() not in MACROS and len(self.expr.split()) != 5:
            raise ValueError(
                f"cron {expr!r} must have 5 fields (minute hour day-of-month month "
                "day-of-week) or be one of " + ", ".join(MACROS)
            )
        try:
            croniter(self.expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(float)
        except CroniterBadDateError:
            raise ValueError(f"cron {expr!r} never fires (no such date)") from None
        except CroniterError as exc:
            raise ValueError(f"cron {expr!r}: {exc}") from None

    def next_after(self, t: float) -> float:
        """The first scheduled time strictly after `t` (seconds since the epoch)."""
        start = datetime.fromtimestamp(t, UTC)
        return float(croniter(self.expr, start).get_next(float))
