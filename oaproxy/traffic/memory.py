"""Counters in this process's memory, on the reactor's clock.

Not the ``limits`` library's ``MemoryStorage``: it reads ``time.time()``
and expires keys from a ``threading.Timer``, so it can neither be driven by
a test's ``Clock`` nor charged one amount and settled with another (a token
reservation replaced by the real usage). Each acquisition here is one
synchronous call, so on the reactor's one thread it is atomic by itself.

Counters that went quiet are dropped by a sweep that acquisitions run at
most once per ``SWEEP_INTERVAL``: keys made per client IP cannot pile up.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from oaproxy.traffic.counters import (
    Admission,
    Charge,
    Counter,
    FixedWindow,
    Held,
    MovingWindow,
    Reading,
)

SWEEP_INTERVAL = 60.0


class _Entry:
    __slots__ = ("amount", "member", "time")

    def __init__(self, time: float, amount: int, member: str) -> None:
        self.time = time
        self.amount = amount
        self.member = member


class _Log:
    """A moving window: the charges made in the last ``seconds``."""

    __slots__ = ("by_member", "entries", "seconds", "total", "uneven")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: deque[_Entry] = deque()
        self.by_member: dict[str, _Entry] = {}
        self.total = 0
        # Entries that do not weigh 1 (tokens, refunds): while there are
        # none the entry to wait for is found by its index.
        self.uneven = 0

    def trim(self, now: float) -> None:
        cutoff = now - self.seconds
        entries = self.entries
        while entries and entries[0].time <= cutoff:
            entry = entries.popleft()
            self.total -= entry.amount
            self.uneven -= entry.amount != 1
            del self.by_member[entry.member]

    def reading(self, now: float, limit: int, amount: int) -> Reading:
        reset = self.entries[-1].time + self.seconds - now if self.entries else 0.0
        return Reading(limit, self.total, reset, self._wait(now, limit, amount))

    def _wait(self, now: float, limit: int, amount: int) -> float | None:
        if amount > limit:
            return None
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        if not self.uneven:
            # Every entry weighs 1 (request counts): the one to wait for is known.
            return self.entries[excess - 1].time + self.seconds - now
        freed = 0
        for entry in self.entries:
            freed += entry.amount
            if freed >= excess:
                return entry.time + self.seconds - now
        raise AssertionError("a moving window's total is the sum of its entries")

    def add(self, now: float, amount: int, member: str) -> None:
        entry = _Entry(now, amount, member)
        self.entries.append(entry)
        self.by_member[member] = entry
        self.total += amount
        self.uneven += amount != 1

    def settle(self, member: str, amount: int) -> None:
        entry = self.by_member.get(member)
        if entry is None:
            return
        self.total += amount - entry.amount
        self.uneven += (amount != 1) - (entry.amount != 1)
        entry.amount = amount


class _Count:
    """A fixed window: one count, until the window ends."""

    __slots__ = ("count", "ends")

    def __init__(self, ends: float) -> None:
        self.count = 0
        self.ends = ends


class MemoryCounters:
    """The ``Counters`` of one process (``limits.backend: memory``)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._counts: dict[str, _Count] = {}
        self._members = itertools.count()
        self._swept = clock.seconds()

    def acquire(self, charges: Sequence[Charge]) -> Admission:
        now = self._clock.seconds()
        if now - self._swept >= SWEEP_INTERVAL:
            self._sweep(now)
        readings = [self._reading(charge, now) for charge in charges]
        for reading in readings:
            if not reading.fits:
                return Admission(False, tuple(readings), None)
        member = str(next(self._members))
        admitted = []
        for charge, reading in zip(charges, readings):
            counter = charge.counter
            window = counter.window
            self._add(counter, charge.amount, member, now)
            # After a charge made now, a moving window is full again one
            # window from now; a fixed one when it ends, as before.
            reset = window.seconds if isinstance(window, MovingWindow) else reading.reset
            admitted.append(Reading(reading.limit, reading.used + charge.amount, reset, 0.0))
        return Admission(True, tuple(admitted), Held(member, tuple(charges)))

    def settle(self, held: Held, amounts: Sequence[int]) -> None:
        now = self._clock.seconds()
        for charge, amount in zip(held.charges, amounts):
            counter = charge.counter
            if isinstance(counter.window, MovingWindow):
                log = self._logs.get(counter.key)
                if log is not None:
                    log.trim(now)
                    log.settle(held.member, amount)
            else:
                count = self._live_count(counter.key, now)
                if count is not None:
                    count.count += amount - charge.amount

    def seed(self, counter: Counter, amount: int) -> None:
        """Count ``amount`` on ``counter`` unchecked: a budget's usage of its
        period from before this process started."""
        self._add(counter, amount, str(next(self._members)), self._clock.seconds())

    def _add(self, counter: Counter, amount: int, member: str, now: float) -> None:
        window = counter.window
        if isinstance(window, MovingWindow):
            log = self._logs.get(counter.key)
            if log is None:
                log = self._logs[counter.key] = _Log(window.seconds)
            log.add(now, amount, member)
            return
        count = self._live_count(counter.key, now)
        if count is None:
            count = self._counts[counter.key] = _Count(now + window.ends_in)
        count.count += amount

    def _reading(self, charge: Charge, now: float) -> Reading:
        counter = charge.counter
        window = counter.window
        if isinstance(window, MovingWindow):
            log = self._logs.get(counter.key)
            if log is None:
                log = self._logs[counter.key] = _Log(window.seconds)
            log.trim(now)
            return log.reading(now, counter.limit, charge.amount)
        count = self._live_count(counter.key, now)
        used = count.count if count is not None else 0
        return Reading(counter.limit, used, window.ends_in, _fixed_wait(counter, used, charge))

    def _live_count(self, key: str, now: float) -> _Count | None:
        count = self._counts.get(key)
        if count is not None and count.ends <= now:
            del self._counts[key]
            return None
        return count

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key, log in list(self._logs.items()):
            log.trim(now)
            if not log.entries:
                del self._logs[key]
        for key, count in list(self._counts.items()):
            if count.ends <= now:
                del self._counts[key]

    def __len__(self) -> int:
        """How many counters are held (for tests of the sweep)."""
        return len(self._logs) + len(self._counts)


def _fixed_wait(counter: Counter, used: int, charge: Charge) -> float | None:
    if charge.amount > counter.limit:
        return None
    if used + charge.amount <= counter.limit:
        return 0.0
    assert isinstance(counter.window, FixedWindow)
    return counter.window.ends_in
