"""The request pipeline: what happens to a client request on ``/v1``, in order,
and the named places where behaviour plugs in.

1. **Head gates** (``HeadGate``) run before the body is read or parsed; each
   sees the ``Arrival`` (the request, the authenticated caller, the route
   path) and may refuse it. Built in, in this order: the method (405), the
   IP rules (403, when the config has any), the body cap (413), the body
   budget (503), the path check (400), the content encoding (415), the
   client key (401). Checks that need no body go here (request-rate limits
   after the key check), so that a refused client never makes the reactor
   read its body.
2. **Own answers** (``OwnAnswer``): what oaproxy answers itself instead of
   an upstream (``GET /v1/models``), before the body is read, with no
   routing.
3. **Inspection**: the body is read for what routing needs (the model, the
   stream flag), at once or, for a large one, a step at a time; a body whose
   model cannot be trusted is refused here (``oaproxy.bodyrules``).
4. **Routing**: the router picks the upstreams of the request's route
   prefix that may serve this caller and model (404 or 403 otherwise);
   then each **candidate filter** (``CandidateFilter``) reorders or narrows
   that list, or refuses: the content filter (narrowing to the exempt
   upstreams first, so that what follows orders only those that will be
   tried), a form's model against the deny lists, the balancing policy,
   then the circuit breakers.
5. **Gates** (``Gate``) see the exchange and the candidates and may answer
   themselves (a ``LocalAnswer``): a cache hit first (it costs no tokens),
   then token limits and budgets.
6. **Forwarding**: the forwarder tries the candidates in order.
7. **Observers** (``Observer``) see each forwarded request start, each
   attempt start and end, and every request finish with its record, refused
   ones included: records, metrics, readiness, upstream load, breaker state,
   alerts, cache fill, limiter accounting, the in-flight ledger.

Any stage may add headers to the answer, whoever ends up writing it
(``Arrival.answer_headers``, the same object as ``Exchange.answer_headers``):
the cache's ``X-Oaproxy-Cache``, the limits' ``x-ratelimit-*``.

A head gate, a gate or a candidate filter may answer at once or return a
``Deferred`` (a Redis round trip: limits, the cache, shared breakers): each
stage's checks run synchronously until one returns a Deferred, so a request
whose checks need no I/O pays for no Deferred. A client that goes away
while one waits cancels it, and the request ends there: like every request,
with one record, and each observer's ``request_finished`` once (what a
candidate filter held for it, a breaker's probe, is given back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol, TypeVar, cast

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers

from oaproxy.answers import LocalAnswer, write_answer
from oaproxy.bodyrules import body_refusal
from oaproxy.config import Config, Upstream
from oaproxy.credentials import token_text
from oaproxy.errors import ErrorAnswer, error_body
from oaproxy.exchange import AttemptLog, Call, Exchange
from oaproxy.forward import Forwarder
from oaproxy.headers import forwarded_for
from oaproxy.inspection import WALK_AT_ONCE, Inspected, unread
from oaproxy.paths import RequestPath, request_path
from oaproxy.record import Outcome, Record
from oaproxy.records import RecordMaker
from oaproxy.requestbody import RequestBody
from oaproxy.routing import Caller, Router
from oaproxy.web import IN_MEMORY_BODY, answer_headers, client_ip, declared_size, peer

Verdict = LocalAnswer | None
Candidates = list[Upstream] | ErrorAnswer
_T = TypeVar("_T")


@frozen
class Arrival:
    """A request before its body is read: what head gates decide on."""

    request: server.Request
    caller: Caller
    # The API path as routing sees it (``/v1/…``, under any route prefix);
    # None for one no API has (see ``oaproxy.paths``).
    path: str | None
    config: Config
    # The route prefix ("/ollama"); None for /v1 itself.
    route: str | None
    # As records see it: the peer, or X-Forwarded-For past trusted proxies.
    client_ip: str
    # What a gate adds to the answer, whatever it is (x-ratelimit-*,
    # X-Oaproxy-Cache): the request's own (oaproxy.web.ProxyRequest), the
    # exchange's later.
    answer_headers: Headers


class HeadGate(Protocol):
    """Runs before the body is read; returns an answer to refuse the request."""

    def __call__(self, arrival: Arrival) -> Verdict | Deferred[Verdict]: ...


class OwnAnswer(Protocol):
    """Answers a request itself, instead of any upstream (a reply or an
    error); None lets the request go on to routing."""

    def __call__(self, arrival: Arrival) -> LocalAnswer | Deferred[LocalAnswer] | None: ...


class CandidateFilter(Protocol):
    """Reorders or narrows the upstreams that may serve a request, or refuses it."""

    def __call__(
        self, exchange: Exchange, candidates: list[Upstream]
    ) -> Candidates | Deferred[list[Upstream]] | Deferred[Candidates]: ...


class Gate(Protocol):
    """Runs once the body is parsed and the candidates are known; returns an
    answer to give instead of forwarding."""

    def __call__(
        self, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Verdict | Deferred[Verdict]: ...


class Observer:
    """Sees requests go by; the methods it does not need are left as they are."""

    def request_started(self, exchange: Exchange, request: server.Request) -> None:
        """A request goes to the forwarder (refused requests never start)."""

    def attempt_started(self, exchange: Exchange, attempt: AttemptLog) -> None:
        """One attempt on one upstream begins."""

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        """One attempt on one upstream is over."""

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        """A request is over, forwarded or refused. ``record`` is None only
        when it could not be made (a bug, logged): what counts requests in
        flight must still count this one out."""


class Observers:
    """Every observer of one config, each shielded from the others' bugs."""

    log = Logger()

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)
        # Each event goes to the observers that have it: most leave most of
        # Observer's methods as they are, and calling those does nothing.
        self._started = _having(self._observers, "request_started")
        self._attempting = _having(self._observers, "attempt_started")
        self._attempted = _having(self._observers, "attempt_finished")
        self._finished = _having(self._observers, "request_finished")

    def request_started(self, exchange: Exchange, request: server.Request) -> None:
        for observer in self._started:
            try:
                observer.request_started(exchange, request)
            except Exception:  # noqa: BLE001 - one observer's bug must not stop the others
                self.log.failure("an observer failed on a started request")

    def attempt_started(self, exchange: Exchange, attempt: AttemptLog) -> None:
        for observer in self._attempting:
            try:
                observer.attempt_started(exchange, attempt)
            except Exception:  # noqa: BLE001 - one observer's bug must not stop the others
                self.log.failure("an observer failed on a started attempt")

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        for observer in self._attempted:
            try:
                observer.attempt_finished(exchange, attempt)
            except Exception:  # noqa: BLE001 - one observer's bug must not stop the others
                self.log.failure("an observer failed on a finished attempt")

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        for observer in self._finished:
            try:
                observer.request_finished(exchange, record)
            except Exception:  # noqa: BLE001 - one observer's bug must not stop the others
                self.log.failure("an observer failed on a finished request")


def _having(observers: tuple[Observer, ...], event: str) -> tuple[Observer, ...]:
    """The observers whose ``event`` is their own, not Observer's (which does nothing)."""
    nothing = getattr(Observer, event)
    return tuple(
        o for o in observers if getattr(getattr(o, event, None), "__func__", None) is not nothing
    )


class Pipeline:
    """Runs the stages above for each request of one config."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        router: Router,
        forwarder: Forwarder,
        records: RecordMaker,
        *,
        clock: IReactorTime,
        wall_clock: Callable[[], float],
        inspect: Callable[[RequestBody, bytes | None], Inspected | Deferred[Inspected]],
        head_gates: Sequence[HeadGate] = (),
        own_answers: Sequence[OwnAnswer] = (),
        candidate_filters: Sequence[CandidateFilter] = (),
        gates: Sequence[Gate] = (),
        observers: Observers,
    ) -> None:
        self.config = config
        self.router = router
        self.forwarder = forwarder
        self.inspect = inspect
        self._records = records
        self._clock = clock
        self._wall_clock = wall_clock
        self._head_gates = tuple(head_gates)
        self._own_answers = tuple(own_answers)
        self._routes = config.route_prefixes
        self._candidate_filters = tuple(candidate_filters)
        self._gates = tuple(gates)
        self._observers = observers

    # -- the stages ----------------------------------------------------------

    def handle(self, request: server.Request) -> bytes | int:
        """Render a ``/v1`` request: its answer, or ``NOT_DONE_YET``."""
        where = request_path(request.uri, self._routes)
        arrival = Arrival(
            request=request,
            caller=self.router.authenticate(request.getHeader(b"authorization")),
            path=where.api_path if where is not None else None,
            config=self.config,
            route=where.route if where is not None else None,
            client_ip=client_ip(request, self.config.trusted_proxies),
            answer_headers=answer_headers(request),
        )
        verdict = _run(self._head_gates, arrival)
        if isinstance(verdict, Deferred):
            return self._later(
                request,
                verdict,
                lambda v: self._admitted(arrival, where, v),
                self._nothing_read(arrival, where),
            )
        return self._admitted(arrival, where, verdict)

    def _admitted(
        self, arrival: Arrival, where: RequestPath | None, refusal: Verdict
    ) -> bytes | int:
        request = arrival.request
        answer = refusal if refusal is not None else self._own_answer(arrival)
        if answer is not None:
            # Answered before the body is read: a client without a key
            # cannot make the reactor walk 64 MiB of JSON for a 401.
            exchange = self._nothing_read(arrival, where)
            if isinstance(answer, Deferred):
                return self._later(
                    request,
                    answer,
                    lambda given: self._answer_here(request, exchange, given),
                    exchange,
                )
            return self._answer_here(request, exchange, answer)
        # Of a body left in its spool file, the head its record reads (and a
        # byte more: it says the record's text is cut) is kept.
        own_token = token_text(request.getHeader(b"authorization"))
        body = _request_body(cast("IO[bytes]", request.content), self._records.reach(own_token) + 1)
        inspected = self.inspect(body, request.getHeader(b"content-type"))
        if isinstance(inspected, Deferred):
            return self._later(
                request,
                inspected,
                lambda i: self._inspected(arrival, where, i),
                self._nothing_read(arrival, where),
            )
        return self._inspected(arrival, where, inspected)

    def _inspected(
        self, arrival: Arrival, where: RequestPath | None, inspected: Inspected
    ) -> bytes | int:
        request = arrival.request
        exchange = self._exchange(arrival, where, inspected)
        assert arrival.path is not None
        untrusted = body_refusal(request.method, arrival.path, inspected)
        if untrusted is not None:
            return self._answer_here(request, exchange, untrusted)
        candidates = self.router.candidates(
            arrival.caller, exchange.call.model, arrival.path, arrival.route
        )
        filtered = _filter(self._candidate_filters, exchange, candidates)
        if isinstance(filtered, Deferred):
            return self._later(
                request,
                filtered,
                lambda chosen: self._filtered(request, exchange, chosen),
                exchange,
            )
        return self._filtered(request, exchange, filtered)

    def _own_answer(self, arrival: Arrival) -> LocalAnswer | Deferred[LocalAnswer] | None:
        for own_answer in self._own_answers:
            answer = own_answer(arrival)
            if answer is not None:
                return answer
        return None

    def _filtered(
        self, request: server.Request, exchange: Exchange, candidates: Candidates
    ) -> bytes | int:
        if isinstance(candidates, ErrorAnswer):
            return self._answer_here(request, exchange, candidates)
        chosen = candidates
        verdict = _run(self._gates, exchange, chosen)
        if isinstance(verdict, Deferred):
            return self._later(
                request, verdict, lambda v: self._gated(request, exchange, chosen, v), exchange
            )
        return self._gated(request, exchange, chosen, verdict)

    def _gated(
        self,
        request: server.Request,
        exchange: Exchange,
        candidates: list[Upstream],
        answer: Verdict,
    ) -> bytes | int:
        if answer is not None:
            return self._answer_here(request, exchange, answer)
        self._observers.request_started(exchange, request)
        self._forward(request, exchange, candidates)
        return server.NOT_DONE_YET

    def _nothing_read(self, arrival: Arrival, where: RequestPath | None) -> Exchange:
        """The exchange of a request that ends before its body is read."""
        body = unread(RequestBody(size=declared_size(arrival.request), data=None))
        return self._exchange(arrival, where, body)

    def _exchange(
        self, arrival: Arrival, where: RequestPath | None, inspected: Inspected
    ) -> Exchange:
        request = arrival.request
        caller = arrival.caller
        return Exchange(
            call=Call(
                method=request.method,
                path=request.uri,
                # A path no API has is refused: it never reaches an upstream.
                upstream_path=where.upstream_path if where is not None else b"",
                headers=request.requestHeaders,
                inspected=inspected,
                authorization=request.getHeader(b"authorization"),
                forwarded_for=forwarded_for(request.requestHeaders, peer(request)),
                api_path=where.api_path if where is not None else "",
                route=where.route if where is not None else None,
            ),
            started=self._clock.seconds(),
            time=self._wall_clock(),
            key_name=caller.key.name if caller.key is not None else None,
            client_ip=arrival.client_ip,
            user_agent=_text(request.getHeader(b"user-agent")),
            answer_headers=arrival.answer_headers,
        )

    def _answer_here(
        self, request: server.Request, exchange: Exchange, answer: LocalAnswer
    ) -> bytes:
        """Give an answer of oaproxy's own (a refusal, a cache hit, the models
        list); it is recorded like any request, with the outcome the answer
        says."""
        body = write_answer(request, answer)
        recorded = answer.recorded()
        exchange.status = answer.status
        exchange.outcome = answer.outcome
        exchange.limit = answer.limit
        exchange.response_body = body if recorded is None else recorded
        exchange.bytes_out = len(body)
        exchange.finished = self._clock.seconds()
        exchange.ttfb = exchange.finished - exchange.started
        self.finished(exchange, request)
        return body

    def _forward(
        self, request: server.Request, exchange: Exchange, candidates: list[Upstream]
    ) -> None:
        work: list[Deferred[Exchange]] = []

        def client_gone(reason: Failure) -> None:
            exchange.client_disconnected()
            if work:
                work[0].cancel()

        # Subscribed first: a disconnect at any point reaches the upstream.
        request.notifyFinish().addErrback(client_gone)
        d = self.forwarder.forward(request, exchange, candidates)
        work.append(d)

        def done(result: Exchange | Failure) -> None:
            if isinstance(result, Failure) and not exchange.client_gone:
                self.log.failure("forwarding failed", failure=result)
                fail_unfinished(request)
                exchange.outcome = Outcome.ERROR
            exchange.finished = self._clock.seconds()
            self.finished(exchange, request)

        d.addBoth(done).addErrback(
            lambda failure: self.log.failure("finishing a request failed", failure=failure)
        )

    def _later(
        self,
        request: server.Request,
        pending: Deferred[_T],
        then: Callable[[_T], bytes | int],
        exchange: Exchange,
    ) -> int:
        """Go on with ``then`` when a stage's answer comes (a gate's, a
        candidate filter's, a large body's inspection).  A client that goes
        away meanwhile cancels the wait, and the request ends there, as does
        one whose stage failed: ``exchange`` (the request as far as it got)
        makes its record.  Whichever comes first of the three ends the wait."""
        waiting = [pending]

        def client_gone(reason: Failure) -> None:
            if waiting:
                waiting.clear()
                # Cleared first: the cancelled stage's failure is no bug.
                pending.cancel()
                exchange.client_disconnected()
                self._ended(request, exchange)

        request.notifyFinish().addErrback(client_gone)

        def answered(verdict: _T) -> None:
            if not waiting:
                return
            waiting.clear()
            body = then(verdict)
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if not waiting:
                return
            waiting.clear()
            self.log.failure("a request stage failed", failure=failure)
            fail_unfinished(request)
            exchange.status = request.code
            exchange.outcome = Outcome.ERROR
            self._ended(request, exchange)

        pending.addCallbacks(answered, failed).addErrback(
            lambda failure: self.log.failure("finishing a request failed", failure=failure)
        )
        return server.NOT_DONE_YET

    def _ended(self, request: server.Request, exchange: Exchange) -> None:
        exchange.finished = self._clock.seconds()
        self.finished(exchange, request)

    # -- the end -------------------------------------------------------------

    def finished(self, exchange: Exchange, request: server.Request) -> None:
        """Make the request's record and give it to every observer."""
        record = None
        try:
            record = self._records.make(exchange, request)
        except Exception:  # noqa: BLE001 - the client has its answer; only bookkeeping failed
            self.log.failure("recording a finished request failed")
        self._observers.request_finished(exchange, record)


def _run(checks: Sequence[Callable[..., Verdict | Deferred[Verdict]]], *args: Any) -> Any:
    """The first refusal of ``checks`` called in order, or None; a Deferred of
    it from the first check that answers later."""
    for position, check in enumerate(checks):
        verdict = check(*args)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(_then, checks[position + 1 :], args)
        if verdict is not None:
            return verdict
    return None


def _then(verdict: Verdict, rest: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> Any:
    return verdict if verdict is not None else _run(rest, *args)


def _then_filter(
    candidates: Candidates, rest: Sequence[CandidateFilter], exchange: Exchange
) -> Candidates | Deferred[Candidates]:
    return _filter(rest, exchange, candidates)


def _filter(
    filters: Sequence[CandidateFilter], exchange: Exchange, candidates: Candidates
) -> Candidates | Deferred[Candidates]:
    """``candidates`` through ``filters`` in order, until one refuses; a
    Deferred of the result from the first filter that answers later."""
    for position, candidate_filter in enumerate(filters):
        if isinstance(candidates, ErrorAnswer):
            break
        result = candidate_filter(exchange, candidates)
        if isinstance(result, Deferred):
            return result.addCallback(_then_filter, filters[position + 1 :], exchange)
        candidates = result
    return candidates


def fail_unfinished(request: server.Request) -> None:
    """A bug must still answer the client, never leave it hanging."""
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        request.channel.transport.abortConnection()  # type: ignore[union-attr]
        return
    body = error_body("Internal proxy error.", type="server_error", code="internal_error")
    request.setResponseCode(500)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _request_body(content: IO[bytes], head_bytes: int) -> RequestBody:
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    if size <= IN_MEMORY_BODY:
        return RequestBody(size=size, data=content.read())
    # Read where it is, JSON too (oaproxy.inspection): never a copy in memory
    # but the head a record may keep.
    head = content.read(max(head_bytes, WALK_AT_ONCE))
    return RequestBody(size=size, data=None, file=content, head=head)


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None
