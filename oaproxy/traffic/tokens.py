"""Token limits and budgets, with reservations.

``TokenLimits`` is a gate (the body is parsed, the model known): for a
request with a JSON body and a model, it estimates the tokens
(``estimate``; a form, such as an audio upload, reserves none and counts
its answer's usage) and, in one acquisition, reserves them against the key's
token rates (its ``token_limit``, else ``limits.tokens_per_key``; per
client IP without a key) and its budget (tokens, or dollars at the model's
price). The estimates of requests in flight together never pass a limit:
only what a request uses beyond its estimate can.

``TokenSettlement`` is an observer: when the request is over it replaces
the reservation by what the request used: the answer's usage; nothing when
no upstream answered it or the answer was an error (refunded); the estimate
itself when an answer came without usage (a stream cut short, an upstream
that reports none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import Enum

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from oaproxy.config import (
    Budget,
    ClientKey,
    Config,
    Price,
    Rate,
    Upstream,
    WindowStrategy,
    all_client_keys,
)
from oaproxy.errors import ErrorAnswer
from oaproxy.exchange import Exchange
from oaproxy.pipeline import Observer, Verdict
from oaproxy.record import LimitKind, LimitRefusal, LimitScope, Record, Usage
from oaproxy.traffic.backend import BackendTrouble
from oaproxy.traffic.budgets import (
    BudgetHistory,
    Period,
    UsageReader,
    budget_counter,
    cost_in_micro_dollars,
    describe_amount,
    describe_budget,
    period_at,
)
from oaproxy.traffic.counters import (
    Admission,
    Charge,
    Counter,
    Counters,
    Held,
    Reading,
    rate_counter,
)
from oaproxy.traffic.estimate import NOTHING, billed, estimate, text_characters
from oaproxy.traffic.headers import (
    longest_wait,
    most_constrained,
    retry_after,
    set_no_retry,
    set_rate_headers,
    set_retry_after,
)
from oaproxy.traffic.routes import who

#: Token rate counters kept (per caller and rates) before they are all let go.
COUNTERS_KEPT = 10_000


class Measure(Enum):
    """What a charge counts."""

    TOKENS = "tokens"
    MICRO_DOLLARS = "micro-dollars"


@frozen
class Reservation:
    """What a request holds until it is over (``Exchange.reservation``)."""

    held: Held
    measures: tuple[Measure, ...]  # one per charge
    price: Price | None  # for a budget in dollars

    def amounts(self, used: Usage) -> list[int]:
        """What the charges become once the request used ``used``."""
        return [
            used.total_tokens if measure is Measure.TOKENS else self._cost(used)
            for measure in self.measures
        ]

    def _cost(self, used: Usage) -> int:
        assert self.price is not None
        return cost_in_micro_dollars(used.prompt_tokens, used.completion_tokens, self.price)


@frozen
class _Plan:
    """The charges of one request, before they are made."""

    rates: tuple[Rate, ...]  # the token rates, first among the charges
    budget: Budget | None  # the budget, the last charge
    key_name: str | None
    charges: tuple[Charge, ...]
    measures: tuple[Measure, ...]
    price: Price | None
    estimate: Usage
    period: Period | None  # the budget's


class TokenLimits:
    """The gate of every token rate and budget of one config."""

    def __init__(
        self,
        config: Config,
        counters: Counters,
        trouble: BackendTrouble,
        clock: IReactorTime,
        wall_clock: Callable[[], float],
        *,
        history: BudgetHistory | None = None,
        read_usage: UsageReader | None = None,
    ) -> None:
        limits = config.limits
        self._keys: Mapping[str, ClientKey] = {k.name: k for k in all_client_keys(config)}
        self._tokens_per_key = limits.tokens_per_key
        self._strategy = limits.strategy
        self._default_max_tokens = limits.default_max_tokens
        self._prices = config.prices
        self._counters = counters
        self._trouble = trouble
        self._clock = clock
        self._wall_clock = wall_clock
        self._history = history
        self._read_usage = read_usage
        self._counters_of: dict[tuple[str, tuple[Rate, ...]], tuple[Counter, ...]] = {}

    def __call__(
        self, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Verdict | Deferred[Verdict]:
        call = exchange.call
        inspected = call.inspected
        # A form (an audio upload) names its model in a text field.
        model = call.model if call.model is not None else inspected.form_model
        if model is None:
            # Not a model's work (listing models, files): nothing to count.
            return None
        key = self._keys.get(exchange.key_name) if exchange.key_name is not None else None
        rates = self._tokens_per_key
        if key is not None and key.token_limit is not None:
            rates = key.token_limit
        budget = key.budget if key is not None else None
        if not rates and budget is None:
            return None
        price = None
        if budget is not None and budget.usd is not None:
            price = self._prices.get(model)
            if price is None:
                return ErrorAnswer(
                    403,
                    f"The model `{model}` has no price, and this key's budget is in"
                    " dollars: it cannot be counted.",
                    type="permission_error",
                    code="model_not_priced",
                    param="model",
                )
        if call.model is None:
            # A form's audio or image is no prompt to estimate: it reserves
            # nothing, and counts the usage its answer reports.
            guess = NOTHING
        else:
            guess = estimate(
                inspected.text_characters(text_characters),
                inspected.fields.numbers,
                call.api_path,
                self._default_max_tokens,
            )
        plan = self._plan(exchange, rates, budget, price, guess)
        waiting = self._history_ready(plan)
        if waiting is not None:
            return waiting.addCallback(lambda _: self._acquire(exchange, plan))
        return self._acquire(exchange, plan)

    def _plan(
        self,
        exchange: Exchange,
        rates: tuple[Rate, ...],
        budget: Budget | None,
        price: Price | None,
        guess: Usage,
    ) -> _Plan:
        counters = self._rate_counters(exchange, rates)
        charges = [Charge(counter, guess.total_tokens) for counter in counters]
        measures = [Measure.TOKENS] * len(rates)
        period = None
        if budget is not None:
            assert exchange.key_name is not None
            wall = self._wall_clock()
            period = period_at(budget.period, wall)
            counter = budget_counter(exchange.key_name, budget, period, wall)
            if price is None:
                charges.append(Charge(counter, guess.total_tokens))
                measures.append(Measure.TOKENS)
            else:
                cost = cost_in_micro_dollars(guess.prompt_tokens, guess.completion_tokens, price)
                charges.append(Charge(counter, cost))
                measures.append(Measure.MICRO_DOLLARS)
        return _Plan(
            rates, budget, exchange.key_name, tuple(charges), tuple(measures), price, guess, period
        )

    def _rate_counters(self, exchange: Exchange, rates: tuple[Rate, ...]) -> tuple[Counter, ...]:
        """The counters of a request's token rates: made once per caller
        and rates for moving windows, which do not change with time."""
        whom = who(exchange.key_name, exchange.client_ip)
        if self._strategy is not WindowStrategy.MOVING:
            # Fixed windows: each counter is named by the window it is in.
            now = self._clock.seconds()
            key = f"limits:tokens:key:{whom}"
            return tuple(rate_counter(key, rate, self._strategy, now) for rate in rates)
        memo = (whom, rates)
        counters = self._counters_of.get(memo)
        if counters is None:
            if len(self._counters_of) >= COUNTERS_KEPT:
                # Callers by client IP are without number: start again.
                self._counters_of.clear()
            key = f"limits:tokens:key:{whom}"
            counters = tuple(rate_counter(key, rate, self._strategy, 0.0) for rate in rates)
            self._counters_of[memo] = counters
        return counters

    def _history_ready(self, plan: _Plan) -> Deferred[None] | None:
        if self._history is None or plan.budget is None or plan.period is None:
            return None
        assert plan.key_name is not None
        counter = plan.charges[-1].counter
        return self._history.ready(
            counter, plan.key_name, plan.budget, plan.period, self._read_usage
        )

    def _acquire(self, exchange: Exchange, plan: _Plan) -> Verdict | Deferred[Verdict]:
        acquired = self._counters.acquire(plan.charges)
        if isinstance(acquired, Deferred):
            acquired = self._refunded_if_abandoned(acquired)
        return self._trouble.checked(
            acquired, lambda admission: self._decide(exchange, plan, admission)
        )

    def _refunded_if_abandoned(self, acquired: Deferred[Admission]) -> Deferred[Admission]:
        """A client gone while Redis answers cancels its wait, not the script
        on the server, which may have made the reservation: that one is given
        back when the answer comes, instead of holding a budget until the
        period ends."""
        abandoned: list[bool] = []
        waiting: Deferred[Admission] = Deferred(lambda _: abandoned.append(True))

        def answered(admission: Admission) -> None:
            if not abandoned:
                waiting.callback(admission)
            elif admission.held is not None:
                refund = [0] * len(admission.held.charges)
                settled = self._counters.settle(admission.held, refund)
                if settled is not None:
                    settled.addErrback(self._trouble.failed, "refunding an abandoned reservation")

        def failed(failure: Failure) -> None:
            if not abandoned:
                waiting.errback(failure)

        acquired.addCallbacks(answered, failed)
        return waiting

    def _decide(self, exchange: Exchange, plan: _Plan, admission: Admission) -> Verdict:
        headers = exchange.answer_headers
        token_readings = admission.readings[: len(plan.rates)]
        if admission.admitted:
            assert admission.held is not None
            exchange.reservation = Reservation(admission.held, plan.measures, plan.price)
        if token_readings:
            set_rate_headers(headers, "tokens", most_constrained(token_readings))
        if admission.admitted:
            return None
        if plan.budget is not None and not admission.readings[-1].fits:
            return self._over_budget(exchange, plan, admission.readings[-1])
        refused = [(rate, r) for rate, r in zip(plan.rates, token_readings) if not r.fits]
        reading = longest_wait([r for _, r in refused])
        rate = next(rate for rate, r in refused if r is reading)
        # The refusing limit, which may not be the one with the least remaining.
        set_rate_headers(headers, "tokens", reading)
        set_retry_after(headers, reading.wait)
        whose = "this key" if exchange.key_name is not None else "this client address"
        if reading.wait is None:
            message = (
                f"Request too large for tokens: about {plan.estimate.total_tokens} tokens"
                f" (prompt and max_tokens), and {whose} may use {rate.text}."
            )
        else:
            message = (
                f"Rate limit reached for tokens: {rate.text} for {whose}; this request needs"
                f" about {plan.estimate.total_tokens}, {reading.remaining} remain."
                f" Please try again in {retry_after(reading.wait)}s."
            )
        return ErrorAnswer(
            429,
            message,
            type="tokens",
            code="rate_limit_exceeded",
            limit=LimitRefusal(LimitKind.TOKENS, LimitScope.KEY, rate.text),
        )

    def _over_budget(self, exchange: Exchange, plan: _Plan, reading: Reading) -> ErrorAnswer:
        budget, period = plan.budget, plan.period
        assert budget is not None and period is not None
        # Told when it resets, and not to retry before: the SDKs would
        # retry at once (they wait at most a minute for a Retry-After).
        set_retry_after(exchange.answer_headers, reading.reset)
        set_no_retry(exchange.answer_headers)
        described = describe_budget(budget)
        if reading.wait is None:
            what = "this request alone (its estimate) is more than the whole budget"
        else:
            what = f"{describe_amount(budget, reading.used)} of it is used"
        return ErrorAnswer(
            429,
            f"Budget exceeded: key {plan.key_name} has a budget of {described};"
            f" {what}. It resets at {period.resets}.",
            type="insufficient_quota",
            code="budget_exceeded",
            limit=LimitRefusal(LimitKind.BUDGET, LimitScope.KEY, described),
        )


class TokenSettlement(Observer):
    """Settles each reservation with what the request used."""

    def __init__(self, counters: Counters, trouble: BackendTrouble) -> None:
        self._counters = counters
        self._trouble = trouble

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        reservation: Reservation | None = exchange.reservation
        if reservation is None:
            return
        exchange.reservation = None
        used = _used(exchange, record)
        if used is None:
            return
        amounts = reservation.amounts(used)
        if amounts == [charge.amount for charge in reservation.held.charges]:
            return
        settled = self._counters.settle(reservation.held, amounts)
        if settled is not None:
            settled.addErrback(self._trouble.failed, "settling a reservation")


def _used(exchange: Exchange, record: Record | None) -> Usage | None:
    """What a finished request used; None when unknown (the estimate stands)."""
    status = exchange.status
    if exchange.upstream is None or status is None or not 200 <= status < 300:
        # No upstream answered, or it refused: nothing was used.
        return NOTHING
    if record is None or record.usage is None:
        return None
    return billed(record.usage)
