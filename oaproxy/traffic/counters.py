"""The counters every limit is made of, whatever stores them.

A ``Counter`` is one rate of one limit for one scope (``10/minute`` of key
alice), or one budget period (alice's dollars of 2026-05). A request asks a
store to ``acquire`` ``Charge``s on several counters at once: either every
charge fits and all are counted, or none is counted and the request is
refused. That one step is atomic (a Lua script in Redis, one synchronous
call in memory), which is what keeps concurrent requests from overspending
together. A ``Held`` acquisition is later ``settle``d with the amounts the
request really used (its real tokens; 0 when it got no answer).

Windows:

- moving: a log of charges, each counted for ``seconds`` after it was made;
- fixed: a count for one window, named in the counter's key (the window's
  index for a rate, the calendar period for a budget) and dropped when the
  window ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred

from oaproxy.config import Rate, WindowStrategy


@frozen
class MovingWindow:
    seconds: float


@frozen
class FixedWindow:
    ends_in: float  # seconds from now until this window ends


@frozen
class Counter:
    key: str  # the store's key, without redis_prefix; a fixed window's name is in it
    limit: int
    window: MovingWindow | FixedWindow


@frozen
class Charge:
    counter: Counter
    amount: int


@frozen
class Reading:
    """One counter as an acquisition found it."""

    limit: int
    # After this charge when admitted; before it (not counted) when refused.
    used: int
    # Seconds until the counter is back to its full limit.
    reset: float
    # Seconds until this charge would fit: 0 when it does now, None when it
    # never can (it is larger than the limit).
    wait: float | None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def fits(self) -> bool:
        return self.wait == 0


@frozen
class Held:
    """What an admitted request counted, to settle when it is over."""

    member: str  # its entry in moving windows
    charges: tuple[Charge, ...]


@frozen
class Admission:
    admitted: bool
    readings: tuple[Reading, ...]  # one per charge, in order
    held: Held | None  # None when refused: nothing was counted


class Counters(Protocol):
    """A store of counters: in memory, or in Redis (a ``Deferred`` each)."""

    def acquire(self, charges: Sequence[Charge]) -> Admission | Deferred[Admission]:
        """Count every charge, or none of them when one does not fit."""

    def settle(self, held: Held, amounts: Sequence[int]) -> Deferred[None] | None:
        """Replace what ``held`` counted by ``amounts`` (one per charge);
        counters whose window has passed meanwhile are left alone."""


def rate_counter(key: str, rate: Rate, strategy: WindowStrategy, now: float) -> Counter:
    """The counter of ``rate`` under ``key`` (scope and who), at ``now``."""
    base = f"{key}:{rate.name}"
    if strategy is WindowStrategy.MOVING:
        return Counter(base, rate.amount, MovingWindow(rate.seconds))
    index = math.floor(now / rate.seconds)
    return Counter(f"{base}:{index}", rate.amount, FixedWindow((index + 1) * rate.seconds - now))
