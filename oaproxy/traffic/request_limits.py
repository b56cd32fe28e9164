"""Request limits: a head gate after the client-key gate (the body is not
read yet, so a refused client costs no parsing).

The rates that apply to a request: ``limits.global`` (all requests
together), the key's ``rate_limit`` or else ``limits.per_key`` (per key, or
per client IP for requests without one), and ``limits.routes`` for its
route (per key or IP, on that route). All of them are checked and counted
in one acquisition: a request refused by one of them uses up none.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaproxy.config import Limits, Rate, WindowStrategy
from oaproxy.errors import ErrorAnswer
from oaproxy.pipeline import Arrival, Verdict
from oaproxy.record import LimitKind, LimitRefusal, LimitScope
from oaproxy.traffic.backend import BackendTrouble
from oaproxy.traffic.counters import Admission, Charge, Counters, rate_counter
from oaproxy.traffic.headers import (
    longest_wait,
    most_constrained,
    retry_after,
    set_rate_headers,
    set_retry_after,
)
from oaproxy.traffic.routes import RouteTable, address, key_named


@frozen
class _Check:
    """One rate that applies to a request, and where it counts."""

    key: str
    rate: Rate
    scope: LimitScope
    whose: str  # for the message: "for this key on /v1/chat/completions"


# A request's checks, and their charges when they hold for any time.
_Plan = tuple[tuple[_Check, ...], tuple[Charge, ...] | None]
#: Plans kept (per caller and route) before they are all let go.
PLANS_KEPT = 10_000


class RequestLimits:
    """The head gate of every request rate of one config."""

    def __init__(
        self,
        limits: Limits,
        counters: Counters,
        trouble: BackendTrouble,
        clock: IReactorTime,
    ) -> None:
        self._global = limits.global_
        self._per_key = limits.per_key
        self._routes = RouteTable(limits.routes)
        self._strategy = limits.strategy
        self._counters = counters
        self._trouble = trouble
        self._clock = clock
        self._plans: dict[object, _Plan] = {}

    def __call__(self, arrival: Arrival) -> Verdict | Deferred[Verdict]:
        checks, charges = self._planned(arrival)
        if not checks:
            return None
        if charges is None:
            # Fixed windows: each counter is named by the window it is in.
            now = self._clock.seconds()
            charges = tuple(
                Charge(rate_counter(c.key, c.rate, self._strategy, now), 1) for c in checks
            )
        return self._trouble.checked(
            self._counters.acquire(charges),
            lambda admission: self._decide(arrival, checks, admission),
        )

    def _planned(self, arrival: Arrival) -> _Plan:
        """The checks of a request, and their charges where those do not
        change with time (moving windows): made once per caller and route."""
        key = arrival.caller.key
        route = self._routes.match(arrival.path) if arrival.path is not None else None
        caller = ("key", key.name, key.rate_limit) if key is not None else ("ip", arrival.client_ip)
        memo = (caller, route[0] if route is not None else None)
        plan = self._plans.get(memo)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                # Callers by client IP are without number: start again.
                self._plans.clear()
            checks = tuple(self._checks(arrival, route))
            charges = None
            if self._strategy is WindowStrategy.MOVING:
                charges = tuple(
                    Charge(rate_counter(c.key, c.rate, self._strategy, 0.0), 1) for c in checks
                )
            plan = self._plans[memo] = (checks, charges)
        return plan

    def _checks(self, arrival: Arrival, route: tuple[str, tuple[Rate, ...]] | None) -> list[_Check]:
        checks = [
            _Check("limits:requests:global", rate, LimitScope.GLOBAL, "for all requests")
            for rate in self._global
        ]
        key = arrival.caller.key
        per_key = self._per_key if key is None or key.rate_limit is None else key.rate_limit
        if not per_key and route is None:
            return checks
        if key is not None:
            whom, named = key_named(key.name), "this key"
        else:
            whom = address(arrival.client_ip)
            named = "this client address"
        checks += [
            _Check(f"limits:requests:key:{whom}", rate, LimitScope.KEY, f"for {named}")
            for rate in per_key
        ]
        if route is not None:
            path, rates = route
            checks += [
                _Check(
                    f"limits:requests:route:{path}:{whom}",
                    rate,
                    LimitScope.ROUTE,
                    f"for {named} on {path}",
                )
                for rate in rates
            ]
        return checks

    def _decide(self, arrival: Arrival, checks: Sequence[_Check], admission: Admission) -> Verdict:
        headers = arrival.answer_headers
        if admission.admitted:
            set_rate_headers(headers, "requests", most_constrained(admission.readings))
            return None
        refused = [(c, r) for c, r in zip(checks, admission.readings) if not r.fits]
        reading = longest_wait([r for _, r in refused])
        check = next(c for c, r in refused if r is reading)
        set_rate_headers(headers, "requests", reading)
        set_retry_after(headers, reading.wait)
        assert reading.wait is not None  # one request never exceeds a limit by itself
        return ErrorAnswer(
            429,
            f"Rate limit reached for requests: {check.rate.text} {check.whose}."
            f" Please try again in {retry_after(reading.wait)}s.",
            type="requests",
            code="rate_limit_exceeded",
            limit=LimitRefusal(LimitKind.REQUESTS, check.scope, check.rate.text),
        )
