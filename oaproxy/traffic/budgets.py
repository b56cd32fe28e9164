"""Budgets: what a client key may spend per UTC day or month, in dollars
(priced by ``prices``, counted in micro-dollars) or in tokens.

A budget is a fixed-window counter named by its period
(``budget:key=alice:usd:2026-05``). In Redis it outlives a restart by
itself; in memory, ``BudgetHistory`` first adds what the SQL store's records
of the period already spent (summed once per key and period, when the
period is first used; cache hits spent nothing), so a restart does not give
a key its budget again.
"""

from __future__ import annotations

import calendar
import math
import os
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.config import SQLITE, Budget, BudgetPeriod, Price
from oaproxy.recordstore import Filters, UsageRow, missing_table, usage_rows
from oaproxy.sinks.sql import open_database
from oaproxy.traffic.counters import Counter, FixedWindow
from oaproxy.traffic.memory import MemoryCounters
from oaproxy.traffic.routes import key_named


@frozen
class Period:
    """One UTC day or month: ``start <= t < end`` (epoch seconds)."""

    label: str  # "2026-05-14" or "2026-05"
    start: float
    end: float

    @property
    def resets(self) -> str:
        """The end, as messages say it: ``2026-06-01T00:00:00Z``."""
        return datetime.fromtimestamp(self.end, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def period_at(period: BudgetPeriod, now: float) -> Period:
    moment = datetime.fromtimestamp(now, timezone.utc)
    if period is BudgetPeriod.DAY:
        start = datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc)
        return Period(start.strftime("%Y-%m-%d"), start.timestamp(), start.timestamp() + 86400)
    start = datetime(moment.year, moment.month, 1, tzinfo=timezone.utc)
    days = calendar.monthrange(moment.year, moment.month)[1]
    return Period(start.strftime("%Y-%m"), start.timestamp(), start.timestamp() + days * 86400)


def in_dollars(budget: Budget) -> bool:
    return budget.usd is not None


def budget_counter(key_name: str, budget: Budget, period: Period, now: float) -> Counter:
    """The counter of ``key_name``'s budget in ``period`` (``now`` on the wall clock)."""
    unit = "usd" if in_dollars(budget) else "tokens"
    limit = micro_dollars(budget.usd) if budget.usd is not None else budget.tokens
    assert limit is not None
    return Counter(
        f"budget:{key_named(key_name)}:{unit}:{period.label}",
        limit,
        FixedWindow(period.end - now),
    )


def micro_dollars(usd: float) -> int:
    return round(usd * 1_000_000)


def cost_in_micro_dollars(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """Prices are per million tokens: a token costs ``price`` micro-dollars."""
    return math.ceil(prompt_tokens * price.input + completion_tokens * price.output)


def describe_budget(budget: Budget) -> str:
    """``50 usd/month``, ``1000000 tokens/day``: for records and messages."""
    if budget.usd is not None:
        return f"{budget.usd:g} usd/{budget.period.value}"
    return f"{budget.tokens} tokens/{budget.period.value}"


def describe_amount(budget: Budget, amount: int) -> str:
    """``$12.50``, ``$0.000364`` (to the micro-dollar), ``900 tokens``."""
    if not in_dollars(budget):
        return f"{amount} tokens"
    whole, micros = divmod(amount, 1_000_000)
    cents = f"{micros:06d}".rstrip("0").ljust(2, "0")
    return f"${whole}.{cents}"


def spent(budget: Budget, row: UsageRow | None) -> int:
    """What the records of ``row`` spent, in the budget's unit."""
    if row is None:
        return 0
    if in_dollars(budget):
        return micro_dollars(row.cost or 0.0)
    return row.total_tokens


#: Reads the usage of one key between two times: the SQL store's records.
UsageReader = Callable[[str, float, float], Deferred[UsageRow | None]]


class BudgetHistory:
    """Adds each budget period's earlier spending to the memory counters,
    once per key and period, before that budget's first check."""

    log = Logger()

    def __init__(self, counters: MemoryCounters) -> None:
        self._counters = counters
        # Counter key -> the checks waiting for its history; absent: not
        # read yet; empty list after the read.
        self._waiting: dict[str, list[Deferred[None]]] = {}
        self._read: set[str] = set()

    def ready(
        self,
        counter: Counter,
        key_name: str,
        budget: Budget,
        period: Period,
        read: UsageReader | None,
    ) -> Deferred[None] | None:
        """None when ``counter`` holds its history; else a Deferred that
        fires once it does (``read`` None: there is no SQL store)."""
        if counter.key in self._read or read is None:
            return None
        waiter: Deferred[None] = Deferred()
        waiting = self._waiting.get(counter.key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._waiting[counter.key] = [waiter]

        def seed(row: UsageRow | None) -> None:
            self._counters.seed(counter, spent(budget, row))

        def unknown(failure: Failure) -> None:
            self.log.failure(
                "reading the records of budget period {period} of key {key} failed;"
                " counting it from now",
                failure=failure,
                period=period.label,
                key=key_name,
            )

        def done(_: object) -> None:
            self._read.add(counter.key)
            for d in self._waiting.pop(counter.key):
                d.callback(None)

        read(key_name, period.start, period.end).addCallbacks(seed, unknown).addBoth(done)
        # A read that needed no I/O (no database file yet) is done already.
        return None if waiter.called else waiter


def sql_usage_reader(reactor: Any, dbtype: str, dbaddr: str) -> UsageReader:
    """A ``UsageReader`` on the SQL store, querying from the reactor's threads."""

    def read(key_name: str, since: float, until: float) -> Deferred[UsageRow | None]:
        if dbtype == SQLITE and not os.path.isfile(dbaddr):
            return succeed(None)
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), period_usage, dbtype, dbaddr, key_name, since, until
        )

    return read


def period_usage(
    dbtype: str, dbaddr: str, key_name: str, since: float, until: float
) -> UsageRow | None:
    """The usage the store's records of ``key_name`` show in ``[since, until)``;
    None when the store has no records table yet."""
    connection = open_database(dbtype, dbaddr)
    try:
        # A cache hit's record carries its original answer's usage, but the
        # hit spent nothing: the budget counts what upstreams answered.
        answered = Filters(since, until, keys=(key_name,), answered=True)
        rows = usage_rows(connection, dbtype, ("key",), answered)
    except Exception as e:
        if missing_table(e):
            return None
        raise
    finally:
        connection.close()
    return rows[0] if rows else None
