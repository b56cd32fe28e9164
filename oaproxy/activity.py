"""What each upstream is doing now, for the admin API (and whatever else
wants to know), each fact read where it is kept:

- its circuit: ``oaproxy.circuits.Circuits``, the breakers' own state;
- its attempts in flight and the moving average of its time to first byte:
  ``oaproxy.balancing.UpstreamLoad``, what least_busy and least_latency read;
- whether ``/readyz`` counts it as failing: ``oaproxy.health.Readiness``;
- its attempts ok and failed in the last five minutes: ``RecentAttempts``,
  the pipeline observer of this module (nothing else counts them).

``upstream_state`` puts them together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime

from oaproxy.balancing import UpstreamLoad
from oaproxy.circuits import Circuits, CircuitView
from oaproxy.exchange import AttemptLog, Exchange
from oaproxy.health import Readiness
from oaproxy.pipeline import Observer

#: The span of the attempt counts, in seconds.
RECENT = 300.0
# Attempts are counted in slots of this many seconds: the counts are of the
# last RECENT seconds give or take one slot, at a bounded cost.
_SLOT = 10.0


@frozen
class UpstreamState:
    circuit: CircuitView
    # /readyz's view: its last few attempts failed.
    failing: bool
    in_flight: int
    ttfb_average: float | None  # seconds; None before the upstream was timed
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


class RecentAttempts(Observer):
    """Counts each upstream's attempts of the last ``RECENT`` seconds (give
    or take a slot of ``_SLOT``): ok, one that did not fail (its answer,
    whatever its status, went to the client); failed, one that did (a status
    failed over, a timeout, a connection or a stream broken).  One whose
    client went away is neither: it says nothing of the upstream.  A
    pipeline observer, one per daemon (``generation.Shared``), kept over
    reloads; ``keep_only`` forgets the upstreams a reload removed."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._counts: dict[str, _Counts] = {}

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        failure = attempt.failure
        if failure is not None and failure.caused_by_client:
            # The client went away: nothing said of the upstream.
            return
        counts = self._counts.setdefault(attempt.upstream, _Counts())
        counts.add(self._clock.seconds(), failure is None)

    def recent(self, upstream: str) -> tuple[int, int]:
        """Attempts (ok, failed) of the last ``RECENT`` seconds."""
        counts = self._counts.get(upstream)
        return (0, 0) if counts is None else counts.totals(self._clock.seconds())

    def keep_only(self, upstreams: Iterable[str]) -> None:
        """Forget upstreams that are gone (a reload, an upstream removed)."""
        kept = set(upstreams)
        for name in [n for n in self._counts if n not in kept]:
            del self._counts[name]


def upstream_state(
    name: str,
    *,
    recent: RecentAttempts,
    load: UpstreamLoad,
    circuits: Circuits,
    readiness: Readiness,
) -> UpstreamState:
    ok, failed = recent.recent(name)
    return UpstreamState(
        circuit=circuits.view(name),
        failing=readiness.failing(name),
        in_flight=load.in_flight(name),
        ttfb_average=load.latency(name),
        recent_ok=ok,
        recent_failed=failed,
    )
