"""What each upstream is doing now, for the admin API (and whatever else
wants to know): its circuit, its attempts in flight, a moving average of its
time to first byte, its attempts of the last five minutes.

``UpstreamActivity`` is a pipeline observer that keeps the facts the
attempts tell; the circuit comes from a ``CircuitView`` (the breakers, when
they exist; until then every circuit is closed).  ``upstream_state`` puts
them together, with ``/readyz``'s opinion of the upstream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from enum import Enum
from typing import Protocol

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oaproxy.forward import AttemptLog, Exchange
from oaproxy.health import Readiness
from oaproxy.pipeline import Observer
from oaproxy.record import Record

#: The span of the attempt counts, in seconds.
RECENT = 300.0
# Attempts are counted in slots of this many seconds: the counts are of the
# last RECENT seconds give or take one slot, at a bounded cost.
_SLOT = 10.0
# Weight of the newest time to first byte in the moving average.
_TTFB_WEIGHT = 0.2


class Circuit(Enum):
    """An upstream's circuit breaker: closed (used), open (skipped until it
    is probed), half-open (one probe let through)."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CircuitView(Protocol):
    """Where an upstream's circuit state is read."""

    def circuit(self, upstream: str) -> Circuit: ...


class NoBreakers:
    """Every circuit closed: what holds while no breaker opens any."""

    def circuit(self, upstream: str) -> Circuit:
        return Circuit.CLOSED


@frozen
class UpstreamState:
    circuit: Circuit
    # /readyz's view: its last few attempts failed.
    failing: bool
    in_flight: int
    ttfb_average: float | None  # seconds; None before a first byte came
    recent_ok: int
    recent_failed: int


@define
class _Slot:
    start: float
    ok: int = 0
    failed: int = 0


class _Counts:
    """Attempts ok and failed per slot of time, the old ones dropped."""

    def __init__(self) -> None:
        self.slots: deque[_Slot] = deque()

    def add(self, now: float, ok: bool) -> None:
        start = now - now % _SLOT
        if not self.slots or self.slots[-1].start != start:
            self.slots.append(_Slot(start))
        if ok:
            self.slots[-1].ok += 1
        else:
            self.slots[-1].failed += 1
        self.forget(now)

    def forget(self, now: float) -> None:
        # A slot is kept while any of it is within the last RECENT seconds.
        while self.slots and self.slots[0].start + _SLOT <= now - RECENT:
            self.slots.popleft()

    def totals(self, now: float) -> tuple[int, int]:
        self.forget(now)
        return sum(s.ok for s in self.slots), sum(s.failed for s in self.slots)


class UpstreamActivity(Observer):
    """Follows every request's attempts (one object per daemon, kept over reloads)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._running: set[Exchange] = set()
        self._counts: dict[str, _Counts] = {}
        self._ttfb: dict[str, float] = {}

    def request_started(self, exchange: Exchange, request: Request) -> None:
        self._running.add(exchange)

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        failure = attempt.failure
        if failure is not None and failure.caused_by_client:
            # The client went away: nothing said of the upstream.
            return
        name = attempt.upstream
        self._counts.setdefault(name, _Counts()).add(self._clock.seconds(), failure is None)
        if attempt.ttfb is not None:
            previous = self._ttfb.get(name)
            self._ttfb[name] = (
                attempt.ttfb
                if previous is None
                else previous + _TTFB_WEIGHT * (attempt.ttfb - previous)
            )

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        self._running.discard(exchange)

    def in_flight(self, upstream: str) -> int:
        """Attempts on ``upstream`` now: the running requests whose current
        attempt (one not yet timed) is on it."""
        return sum(
            1
            for exchange in self._running
            if exchange.attempts
            and exchange.attempts[-1].duration is None
            and exchange.attempts[-1].upstream == upstream
        )

    def ttfb_average(self, upstream: str) -> float | None:
        return self._ttfb.get(upstream)

    def recent(self, upstream: str) -> tuple[int, int]:
        """Attempts (ok, failed) of the last ``RECENT`` seconds."""
        counts = self._counts.get(upstream)
        return (0, 0) if counts is None else counts.totals(self._clock.seconds())

    def keep_only(self, upstreams: Iterable[str]) -> None:
        """Forget upstreams that are gone (a reload, an upstream removed)."""
        kept = set(upstreams)
        for facts in (self._counts, self._ttfb):
            for name in [n for n in facts if n not in kept]:
                del facts[name]


def upstream_state(
    name: str, activity: UpstreamActivity, circuits: CircuitView, readiness: Readiness
) -> UpstreamState:
    ok, failed = activity.recent(name)
    return UpstreamState(
        circuit=circuits.circuit(name),
        failing=readiness.failing(name),
        in_flight=activity.in_flight(name),
        ttfb_average=activity.ttfb_average(name),
        recent_ok=ok,
        recent_failed=failed,
    )
