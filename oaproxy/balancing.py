"""Balancing policies: the candidate filter that orders the upstreams the
router chose, by ``lb_policy`` (the route's own, if ``routes:`` gives one).

The policy orders the upstreams that are not ``backup`` and, after them,
the backups; failover walks the whole list. The circuit breakers' filter
(``oaproxy.breaker``) comes after this one and moves open circuits last.

- ``order``: as configured. ``random``: shuffled by the injected ``Random``.
- ``round_robin``: the first candidate rotates, request by request.
- ``weighted``: smooth weighted round robin by ``weight`` (as nginx does):
  deterministic, and spread out (weights 5, 1, 1 give a a b a c a a, not
  a a a a a b c).
- ``least_latency``: upstreams never timed yet first (in config order),
  then by a moving average of their time to first byte.
- ``least_busy``: fewest attempts in flight first (ties in config order).

Rotation and weights are kept per set of candidates (each model and key
may have its own), and are reset by a reload; what the load-aware policies
read (``UpstreamLoad``) outlives it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from oaproxy.config import Config, LbPolicy, Upstream
from oaproxy.exchange import AttemptLog, Exchange
from oaproxy.pipeline import Observer
from oaproxy.record import FailureKind

# How much a new time to first byte weighs in the moving average: enough to
# follow an upstream that slows down within a few requests.
LATENCY_WEIGHT = 0.3


class UpstreamLoad:
    """Per upstream name: attempts in flight, and the moving average of
    their time to first byte."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._latency: dict[str, float] = {}

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def latency(self, name: str) -> float | None:
        """The moving average, in seconds; None for an upstream never timed."""
        return self._latency.get(name)

    def started(self, name: str) -> None:
        self._in_flight[name] = self._in_flight.get(name, 0) + 1

    def finished(self, name: str, latency: float | None) -> None:
        left = self._in_flight.get(name, 0) - 1
        if left > 0:
            self._in_flight[name] = left
        else:
            self._in_flight.pop(name, None)
        if latency is not None:
            average = self._latency.get(name)
            self._latency[name] = (
                latency if average is None else average + LATENCY_WEIGHT * (latency - average)
            )


class LoadFollowing(Observer):
    """Keeps ``UpstreamLoad`` up to date from the attempts."""

    def __init__(self, load: UpstreamLoad) -> None:
        self._load = load

    def attempt_started(self, exchange: Exchange, attempt: AttemptLog) -> None:
        self._load.started(attempt.upstream)

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        self._load.finished(attempt.upstream, _latency(attempt))


def _latency(attempt: AttemptLog) -> float | None:
    """What an attempt says of its upstream's latency: its time to first
    byte; a deadline that passed counts as that long."""
    if attempt.ttfb is not None:
        return attempt.ttfb
    if attempt.failure is FailureKind.TIMEOUT:
        return attempt.duration
    return None


class Policy(Protocol):
    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        """``group`` in the order to try it (a new list)."""
        ...


class InOrder:
    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        return list(group)


class Shuffled:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        ordered = list(group)
        self._rng.shuffle(ordered)
        return ordered


def _names(group: Sequence[Upstream]) -> tuple[str, ...]:
    return tuple(u.name for u in group)


class RoundRobin:
    def __init__(self) -> None:
        self._next: dict[tuple[str, ...], int] = {}

    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        if len(group) < 2:
            return list(group)
        key = _names(group)
        first = self._next.get(key, 0) % len(group)
        self._next[key] = first + 1
        return [*group[first:], *group[:first]]


class SmoothWeighted:
    """Each pick adds every weight to its upstream's current weight, takes
    the highest, and takes the total off it: over sum(weights) picks each
    upstream leads ``weight`` times, interleaved."""

    def __init__(self) -> None:
        self._current: dict[tuple[str, ...], list[float]] = {}

    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        if len(group) < 2:
            return list(group)
        current = self._current.setdefault(_names(group), [0.0] * len(group))
        for index, upstream in enumerate(group):
            current[index] += upstream.weight
        # Highest current weight first; ties in config order.
        ranked = sorted(range(len(group)), key=lambda index: -current[index])
        current[ranked[0]] -= sum(u.weight for u in group)
        return [group[index] for index in ranked]


class LeastLatency:
    def __init__(self, load: UpstreamLoad) -> None:
        self._load = load

    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        def rank(upstream: Upstream) -> tuple[bool, float]:
            latency = self._load.latency(upstream.name)
            return (latency is not None, latency or 0.0)

        return sorted(group, key=rank)


class LeastBusy:
    def __init__(self, load: UpstreamLoad) -> None:
        self._load = load

    def order(self, group: Sequence[Upstream]) -> list[Upstream]:
        return sorted(group, key=lambda upstream: self._load.in_flight(upstream.name))


def make_policy(policy: LbPolicy, load: UpstreamLoad, rng: random.Random) -> Policy:
    if policy is LbPolicy.RANDOM:
        return Shuffled(rng)
    if policy is LbPolicy.ROUND_ROBIN:
        return RoundRobin()
    if policy is LbPolicy.WEIGHTED:
        return SmoothWeighted()
    if policy is LbPolicy.LEAST_LATENCY:
        return LeastLatency(load)
    if policy is LbPolicy.LEAST_BUSY:
        return LeastBusy(load)
    return InOrder()


class Balancer:
    """The candidate filter: each route's policy, backups last."""

    def __init__(self, config: Config, load: UpstreamLoad, rng: random.Random) -> None:
        routes = {None, *config.route_prefixes}
        # One policy object per route: rotation and weights are a route's own.
        self._policies: Mapping[str | None, Policy] = {
            route: make_policy(config.lb_policy_for(route), load, rng) for route in routes
        }

    def __call__(self, exchange: Exchange, candidates: list[Upstream]) -> list[Upstream]:
        policy = self._policies[exchange.call.route]
        main = [u for u in candidates if not u.backup]
        backups = [u for u in candidates if u.backup]
        return policy.order(main) + policy.order(backups)
