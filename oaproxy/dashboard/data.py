"""What the dashboard's pages read of the SQL store, each a few indexed
queries run in a database thread (``StoreFollower.query``).

None scans the records table: the Overview and Usage read the sums of
``oaproxy.sinks.rollup`` (a row per minute and upstream; a row per day, key
and model), the Requests page the records' indexes.  Days are UTC.
"""

from __future__ import annotations

import calendar
import time as _time
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from attrs import define, frozen

from oaproxy.admin.queries import all_rows
from oaproxy.config import BudgetPeriod, ClientKey
from oaproxy.sinks.rollup import DAILY_TABLE, MINUTELY_TABLE
from oaproxy.sinks.sql import placeholder

__all__ = [
    "Minute",
    "Period",
    "Totals",
    "UsageReport",
    "budget_used",
    "last_hour",
    "upstreams_day",
    "usage_report",
]

DAY = 86400
MINUTE = 60


class Period(Enum):
    """The spans the Usage page offers: today, the last 7 or 30 days (UTC)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"

    @property
    def days(self) -> int:
        return {Period.DAY: 1, Period.WEEK: 7, Period.MONTH: 30}[self]


@frozen
class Minute:
    start: float
    requests: int
    errors: int  # answered 400 or above


@define
class Totals:
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None

    def add(self, row: Sequence[Any]) -> None:
        """Add a row of (requests, ok, prompt, completion, total, cost)."""
        self.requests += int(row[0])
        self.ok += int(row[1])
        self.prompt_tokens += int(row[2])
        self.completion_tokens += int(row[3])
        self.total_tokens += int(row[4])
        if row[5] is not None:
            self.cost = (self.cost or 0.0) + float(row[5])


@frozen
class UsageReport:
    """A period's usage: by key, by model, by day and name (for the chart)."""

    days: tuple[float, ...]  # each day's start, oldest first
    by_key: dict[str, Totals]
    by_model: dict[str, Totals]
    # (day, key) and (day, model) -> totals; only the one asked for is filled
    day_key: dict[tuple[float, str], Totals]
    day_model: dict[tuple[float, str], Totals]
    total: Totals


def last_hour(connection: Any, dbtype: str, now: float) -> list[Minute]:
    """Requests and errors per minute of the last hour, oldest first (60 of them)."""
    mark = placeholder(dbtype)
    first = now - now % MINUTE - 59 * MINUTE
    rows = all_rows(
        connection,
        f"SELECT minute, SUM(requests), SUM(ok) FROM {MINUTELY_TABLE}"
        f" WHERE minute >= {mark} GROUP BY minute",
        [int(first)],
    )
    counted = {float(start): (int(count), int(count) - int(ok)) for start, count, ok in rows}
    minutes = []
    for index in range(60):
        start = first + index * MINUTE
        count, errors = counted.get(start, (0, 0))
        minutes.append(Minute(start, count, errors))
    return minutes


def upstreams_day(connection: Any, dbtype: str, now: float) -> dict[str, tuple[int, int]]:
    """Each upstream's (requests, ok) of the last 24 hours (from a minute's start)."""
    mark = placeholder(dbtype)
    since = now - DAY
    since -= since % MINUTE
    rows = all_rows(
        connection,
        f"SELECT upstream, SUM(requests), SUM(ok) FROM {MINUTELY_TABLE}"
        f" WHERE minute >= {mark} GROUP BY upstream",
        [int(since)],
    )
    return {name: (int(requests), int(ok)) for name, requests, ok in rows}


def period_days(period: Period, now: float) -> tuple[float, ...]:
    """The UTC days a period covers, oldest first; the last is today."""
    today = now - now % DAY
    return tuple(today - DAY * back for back in reversed(range(period.days)))


_SUMS = "SUM(requests), SUM(ok), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(cost)"


def usage_report(
    connection: Any, dbtype: str, period: Period, now: float, stack: str = "key"
) -> UsageReport:
    """The period's sums by key, by model, and by day and ``stack`` (key or
    model), each summed by the database from the per-day rows."""
    days = period_days(period, now)
    mark = placeholder(dbtype)
    since = [int(days[0])]
    report = UsageReport(days, {}, {}, {}, {}, Totals())
    for column, groups in (("key_name", report.by_key), ("model", report.by_model)):
        for name, *sums in all_rows(
            connection,
            f"SELECT {column}, {_SUMS} FROM {DAILY_TABLE} WHERE day >= {mark} GROUP BY {column}",
            since,
        ):
            groups.setdefault(name, Totals()).add(sums)
    for totals in report.by_key.values():
        report.total.add(
            (
                totals.requests,
                totals.ok,
                totals.prompt_tokens,
                totals.completion_tokens,
                totals.total_tokens,
                totals.cost,
            )
        )
    column, by_day = (
        ("model", report.day_model) if stack == "model" else ("key_name", report.day_key)
    )
    for day, name, *sums in all_rows(
        connection,
        f"SELECT day, {column}, {_SUMS} FROM {DAILY_TABLE} WHERE day >= {mark}"
        f" GROUP BY day, {column}",
        since,
    ):
        by_day.setdefault((float(day), name), Totals()).add(sums)
    return report


def budget_start(period: BudgetPeriod, now: float) -> float:
    """When the budget's current period began (UTC midnight, or the 1st)."""
    if period is BudgetPeriod.DAY:
        return now - now % DAY
    moment = _time.gmtime(now)
    return float(calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0)))


def budget_used(
    connection: Any, dbtype: str, keys: Iterable[ClientKey], now: float
) -> dict[str, tuple[float, int]]:
    """For each key with a budget: (usd, tokens) its records used this period."""
    budgeted = [key for key in keys if key.budget is not None]
    if not budgeted:
        return {}
    mark = placeholder(dbtype)
    since = min(budget_start(BudgetPeriod.MONTH, now), budget_start(BudgetPeriod.DAY, now))
    names = [key.name for key in budgeted]
    rows = all_rows(
        connection,
        f"SELECT key_name, day, SUM(cost), SUM(total_tokens) FROM {DAILY_TABLE}"
        f" WHERE day >= {mark} AND key_name IN ({', '.join([mark] * len(names))})"
        " GROUP BY key_name, day",
        [int(since), *names],
    )
    used: dict[str, tuple[float, int]] = {}
    for key in budgeted:
        assert key.budget is not None
        start = budget_start(key.budget.period, now)
        usd, tokens = 0.0, 0
        for name, day, cost, total in rows:
            if name == key.name and float(day) >= start:
                usd += float(cost or 0)
                tokens += int(total or 0)
        used[key.name] = (usd, tokens)
    return used
