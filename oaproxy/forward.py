"""The attempt chain: one client request, tried on upstreams one after another.

Every attempt runs under ``Deferred.addTimeout``; cancelling an attempt aborts
its upstream connection, and a client that goes away cancels the whole chain.

- Non-stream: the deadline covers the response headers and the whole body,
  which is read before anything is written to the client, so an upstream that
  dies mid-body is still failed over.
- Stream: the deadline covers the headers and the first SSE event; the client
  sees nothing until that event (the commit). After it, silence longer than
  ``stream_idle_timeout``, an event over ``max_event_bytes`` or an upstream
  error ends the stream with an SSE ``error`` event. The last candidate waits
  ``max(stream_timeout, timeout)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent, ResponseNeverReceived
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from oaproxy.cache.ticket import CacheTicket
from oaproxy.capture import StreamCapture
from oaproxy.config import Upstream
from oaproxy.credentials import Redactor, token_text, upstream_authorization
from oaproxy.errors import error_body
from oaproxy.headers import UPSTREAM_HEADER, response_headers, upstream_headers
from oaproxy.inspection import Inspected
from oaproxy.largeanswer import MAX_PARSED_ANSWER, USAGE_WINDOW, AnswerEnds
from oaproxy.metrics import ActiveRequest
from oaproxy.record import FailureKind, LimitRefusal, Outcome, upstream_at_fault
from oaproxy.relay import (
    BodyCollector,
    CollectedBody,
    PartsWriter,
    RelayFailure,
    StreamRelay,
    describe,
)
from oaproxy.requestbody import RequestBody
from oaproxy.upstreamclient import NoResponse, retry_on_new_connection
from oaproxy.upstreams import UpstreamClient

if TYPE_CHECKING:
    # It imports this module.
    from oaproxy.traffic.tokens import Reservation

# Statuses worth another upstream: the upstream (its key, its quota, its
# health) is the problem. Other 4xx mean the request itself is wrong.
FAILOVER_STATUSES = frozenset({401, 403, 404, 408, 409, 429})

# A non-stream answer is held whole before it is written (to fail over an
# upstream dying mid-body); past this size an answer is refused, not buffered.
MAX_BUFFERED_RESPONSE = 256 * 1024 * 1024
# An error answer is searched for secrets before it is passed on, on the
# reactor: one longer than this is no error document, and is refused.
MAX_ERROR_RESPONSE = 1024 * 1024


def fails_over(status: int) -> bool:
    return status >= 500 or status in FAILOVER_STATUSES


@frozen
class Call:
    """What the client asked for, parsed once, shared by every attempt."""

    method: bytes
    path: bytes  # as the client sent it, e.g. b"/v1/chat/completions?x=1"
    upstream_path: bytes  # the part after "/v1", appended to each endpoint
    headers: Headers
    inspected: Inspected = field(eq=False)
    authorization: bytes | None  # the client's own header, for ``sk: asis``
    forwarded_for: bytes
    api_path: str  # decoded, e.g. "/v1/chat/completions" (see oaproxy.paths)
    route: str | None = None  # the route prefix, e.g. "/ollama"; None for /v1

    @property
    def model(self) -> str | None:
        return self.inspected.model

    @property
    def stream(self) -> bool:
        return self.inspected.stream

    @property
    def own_token(self) -> str | None:
        """The client's bearer token as text: hidden wherever it is echoed."""
        return token_text(self.authorization)


@frozen
class Answer:
    """A whole upstream response, read before anything reached the client."""

    upstream: Upstream
    status: int
    phrase: bytes
    headers: Headers
    body: CollectedBody


@frozen
class Committed:
    """An upstream response that is being relayed to the client."""

    upstream: Upstream
    status: int
    relay: StreamRelay


class AttemptTimeout(Exception):
    def __init__(self, deadline: float) -> None:
        super().__init__(f"timeout after {deadline:g}s")
        self.deadline = deadline


@define
class AttemptLog:
    """One attempt while it runs; the record keeps it as an ``Attempt``."""

    upstream: str
    started: float
    status: int | None = None
    error: str | None = None
    failure: FailureKind | None = None
    ttfb: float | None = None
    duration: float | None = None
    # The Retry-After of a 429 or 503 answer, as the upstream sent it.
    retry_after: str | None = None
    # Why the request went out a second time, on a new connection (the pooled
    # one was stale); not in the record yet (issue 11 makes it an attempt).
    resent: str | None = None
    # With ``sk: asis`` a 401 or 403 refuses the client's key, not the
    # upstream's (and a 429's Retry-After speaks of that key).
    client_key_sent: bool = False

    def failed(self, failure: FailureKind, error: str) -> None:
        self.failure = failure
        self.error = error

    @property
    def upstream_at_fault(self) -> bool:
        """Whether this attempt counts against its upstream (readiness, breakers)."""
        return upstream_at_fault(self.failure, self.status, client_key_sent=self.client_key_sent)


@define(eq=False)
class Exchange:
    """The state of one client request, from which its record is made."""

    call: Call
    started: float  # on the reactor's clock, for durations
    time: float  # wall-clock time the request arrived, for the record
    key_name: str | None
    client_ip: str
    user_agent: str | None = None
    # Whether the current attempt's body asks for usage the client did not.
    usage_added: bool = False
    # Set by the stream observer: what the record says of a streamed answer
    # (or by the forwarder, of one too large to parse).
    capture: StreamCapture | AnswerEnds | None = None
    # The metrics' handle on this request while it is active.
    active: ActiveRequest | None = None
    attempts: list[AttemptLog] = field(factory=list)
    upstream: str | None = None
    # The model name the answering upstream was sent (an alias's target).
    upstream_model: str | None = None
    status: int | None = None
    _outcome: Outcome = field(default=Outcome.OK, alias="outcome")
    ttfb: float | None = None
    finished: float | None = None
    bytes_out: int = 0
    response_body: bytes | None = None  # a non-stream answer, for the record
    error: str | None = None  # why a committed stream ended badly
    client_gone: bool = False
    # The proxy cut the request off at shutdown.
    cut: bool = False
    # Headers for the answer, whatever it is, over the upstream's (see
    # oaproxy.web.ProxyRequest); the pipeline gives the request's own.
    answer_headers: Headers = field(factory=Headers)
    # The tokens and budget a gate reserved, settled when the request is
    # over (oaproxy.traffic.tokens).
    reservation: Reservation | None = None
    # The limit that refused the request, for its record.
    limit: LimitRefusal | None = None
    # What the response cache decided; None when it was not asked.
    cache: CacheTicket | None = None

    @property
    def outcome(self) -> Outcome:
        # After a cut the client's side closes too: that is not why it ended.
        return Outcome.SHUTDOWN if self.cut else self._outcome

    @outcome.setter
    def outcome(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def client_disconnected(
        self,
        attempt: AttemptLog | None = None,
        failure: FailureKind = FailureKind.CANCELLED,
        why: str = "client disconnected",
    ) -> None:
        """The client went away (or was let go): the request ends here, and
        the attempt under way, if any, was cancelled rather than failed."""
        self.client_gone = True
        self.outcome = Outcome.CLIENT_DISCONNECTED
        if attempt is not None:
            attempt.failed(failure, f"cancelled: {why}")

    def cut_at_shutdown(self) -> None:
        """Mark the request as cut off by the proxy (still in flight after
        ``shutdown_timeout``), before its connection is aborted."""
        self.cut = True
        self.error = "cut off when the proxy shut down"


class Forwarder:
    """Runs the attempt chain for one request at a time, for one config."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        clients: Callable[[Upstream], UpstreamClient],
        cooperator: Cooperator,
        *,
        stream_idle_timeout: float,
        max_event_bytes: int,
        redactor: Redactor,
        on_event: Callable[[Exchange, Upstream], Callable[[bytes], bool]] | None = None,
        on_attempt_started: Callable[[Exchange, AttemptLog], None] | None = None,
        on_attempt: Callable[[Exchange, AttemptLog], None] | None = None,
        stream_pace: Callable[[str], float | None] | None = None,
    ) -> None:
        self._clock = clock
        # How each upstream is reached: its type's agent over its way out
        # (direct, or its proxy); see oaproxy.upstreams.
        self._clients = clients
        self._cooperator = cooperator
        self._idle_timeout = stream_idle_timeout
        self._max_event_bytes = max_event_bytes
        self._redactor = redactor
        self._on_event = on_event
        # Told of each attempt as it starts and ends (the pipeline's observers).
        self._on_attempt_started = on_attempt_started
        self._on_attempt = on_attempt
        # Seconds between two content events of a stream, by API path
        # (limits.stream_pace); None: not paced.
        self._stream_pace = stream_pace

    def forward(
        self, request: Request, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Deferred[Exchange]:
        """Answer ``request`` from the first candidate that serves it.

        Cancelling the result (the client went away) aborts the upstream
        request in flight; the Deferred then fires with the exchange all the
        same, marked ``client_gone``.
        """
        return ensureDeferred(self._forward(request, exchange, candidates))

    async def _forward(
        self, request: Request, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Exchange:
        call = exchange.call
        last_answer: Answer | None = None
        # (upstream, whether oaproxy may add stream_options for usage)
        tries = deque((upstream, True) for upstream in candidates)
        while tries:
            upstream, with_usage = tries.popleft()
            deadline = attempt_deadline(upstream, call.stream, not tries)
            attempt = AttemptLog(
                upstream.name, self._clock.seconds(), client_key_sent=upstream.sk == "asis"
            )
            exchange.attempts.append(attempt)
            if self._on_attempt_started is not None:
                self._on_attempt_started(exchange, attempt)
            try:
                result = await self._attempt(
                    request, exchange, upstream, attempt, deadline, with_usage
                )
            except AttemptTimeout as e:
                attempt.failed(FailureKind.TIMEOUT, str(e))
                self._end_attempt(exchange, attempt)
                continue
            except Exception as e:  # noqa: BLE001 - any failed attempt means the next upstream
                if exchange.client_gone or isinstance(e, CancelledError):
                    exchange.client_disconnected(attempt)
                    self._end_attempt(exchange, attempt)
                    return exchange
                attempt.failed(*describe(e, self._words(call)))
                self._end_attempt(exchange, attempt)
                continue
            if isinstance(result, Committed):
                await self._finish_relay(exchange, attempt, result)
                return exchange
            attempt.status = result.status
            if result.status in (429, 503):
                attempt.retry_after = _header_text(result.headers, b"retry-after")
            if exchange.usage_added and result.status in (400, 422):
                # Some OpenAI-compatible servers refuse stream_options: once
                # more on the same upstream, with the body the client sent.
                self._end_attempt(exchange, attempt)
                tries.appendleft((upstream, False))
                continue
            if fails_over(result.status):
                attempt.failure = FailureKind.STATUS
                self._end_attempt(exchange, attempt)
                last_answer = result
                continue
            self._end_attempt(exchange, attempt)
            # Before the answer is written: a client gone meanwhile says so after.
            exchange.outcome = Outcome.OK if result.status < 400 else Outcome.CLIENT_ERROR
            await self._send(request, exchange, result)
            return exchange
        await self._exhausted(request, exchange, last_answer)
        return exchange

    def _words(self, call: Call) -> Callable[[str], str]:
        """What makes texts from outside about this request's failures fit
        to repeat to the client, in its record, alerts and logs: the one
        place they pass (``Redactor.words``), as they come in."""
        own_token = call.own_token
        return lambda text: self._redactor.words(text, own_token)

    def _phrase(self, call: Call, status: int, phrase: bytes) -> bytes:
        """The upstream's reason phrase as the client gets it."""
        if phrase == RESPONSES.get(status):
            return phrase
        # Anything but the standard phrase is the upstream's own text.
        return self._words(call)(phrase.decode("latin-1")).encode("latin-1", "replace")

    def _pass_headers(
        self, request: Request, call: Call, headers: Headers, upstream: Upstream
    ) -> None:
        """The upstream's response headers to the client (``response_headers``),
        but any that carries a secret (an upstream's debug header echoing its
        Authorization): dropped, as a redacted value would mean nothing."""
        passed = list(response_headers(headers, keep_header=upstream.keep_header))
        own_token = call.own_token
        carries = self._redactor.carries
        # One look at all the values: an ordinary answer's carry none.
        if carries(b"\n".join(value for _, values in passed for value in values), own_token):
            passed = [
                (name, values)
                for name, values in passed
                if not any(carries(value, own_token) for value in values)
            ]
        out = request.responseHeaders
        for name, values in passed:
            out.setRawHeaders(name, values)

    def _end_attempt(self, exchange: Exchange, attempt: AttemptLog) -> None:
        """The attempt is over and says why: time it, tell the observers."""
        attempt.duration = self._clock.seconds() - attempt.started
        if self._on_attempt is not None:
            self._on_attempt(exchange, attempt)

    def _attempt(
        self,
        request: Request,
        exchange: Exchange,
        upstream: Upstream,
        attempt: AttemptLog,
        deadline: float,
        with_usage: bool,
    ) -> Deferred[Answer | Committed]:
        d = ensureDeferred(self._try_upstream(request, exchange, upstream, attempt, with_usage))

        def timed_out(result: Any, timeout: float) -> Any:
            raise AttemptTimeout(timeout)

        return d.addTimeout(deadline, self._clock, onTimeoutCancel=timed_out)

    async def _try_upstream(
        self,
        request: Request,
        exchange: Exchange,
        upstream: Upstream,
        attempt: AttemptLog,
        with_usage: bool,
    ) -> Answer | Committed:
        call = exchange.call
        exchange.usage_added = with_usage and call.inspected.asks_usage_for(upstream)
        sent = call.inspected.body_for(upstream, with_usage=with_usage)
        response = await self._request(upstream, call, sent, attempt)
        attempt.ttfb = self._clock.seconds() - attempt.started
        # The upstream answered: its status is the attempt's, even if the
        # answer then fails before it is passed on.
        attempt.status = status = response.code
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if 200 <= status < 300 and content_type.startswith(b"text/event-stream"):
            return await self._relay(request, exchange, upstream, response, sse=True)
        if 200 <= status < 300 and not call.stream and not _is_document(content_type):
            # Audio, files, images: large and useless to hold; relay as they come.
            return await self._relay(request, exchange, upstream, response, sse=False)
        collector = BodyCollector(MAX_BUFFERED_RESPONSE if status < 400 else MAX_ERROR_RESPONSE)
        response.deliverBody(collector)
        body = await collector.finished
        return Answer(upstream, status, response.phrase, response.headers, body)

    async def _request(
        self, upstream: Upstream, call: Call, body: RequestBody, attempt: AttemptLog
    ) -> IResponse:
        url = upstream.url(call.upstream_path)
        headers = upstream_headers(
            call.headers,
            keep_header=upstream.keep_header,
            authorization=upstream_authorization(upstream, call.authorization),
            forwarded_for=call.forwarded_for,
        )
        client = self._clients(upstream)
        sent = client.agent.request(call.method, url, headers, body.producer(self._cooperator))
        try:
            return await sent
        except (RequestNotSent, ResponseNeverReceived) as e:
            # On a new connection the failure is the upstream's doing (it
            # may have acted on the request): fail over, never send it twice.
            if not _stale_connection(e):
                raise
            attempt.resent = describe(e, self._words(call))[1]
        # A pooled connection the upstream had closed: once more, on a new one.
        return await client.fresh_agent.request(
            call.method, url, headers, body.producer(self._cooperator)
        )

    async def _relay(
        self,
        request: Request,
        exchange: Exchange,
        upstream: Upstream,
        response: IResponse,
        *,
        sse: bool,
    ) -> Committed:
        def commit() -> None:
            exchange.ttfb = self._clock.seconds() - exchange.started
            exchange.status = response.code
            request.setResponseCode(
                response.code, self._phrase(exchange.call, response.code, response.phrase)
            )
            self._pass_headers(request, exchange.call, response.headers, upstream)
            _answered_by(request, exchange, upstream)

        relay = StreamRelay(
            request,
            self._clock,
            commit,
            self._idle_timeout,
            sse=sse,
            max_event_bytes=self._max_event_bytes,
            words=self._words(exchange.call),
            on_event=self._on_event(exchange, upstream) if sse and self._on_event else None,
            pace=self._stream_pace(exchange.call.api_path) if sse and self._stream_pace else None,
        )
        response.deliverBody(relay)
        await relay.first_event
        return Committed(upstream, response.code, relay)

    async def _finish_relay(
        self, exchange: Exchange, attempt: AttemptLog, committed: Committed
    ) -> None:
        attempt.status = committed.status
        failure: RelayFailure | None
        try:
            failure = await committed.relay.done
        except CancelledError:
            failure = RelayFailure(FailureKind.CANCELLED, "client disconnected")
        exchange.bytes_out = committed.relay.bytes_out
        if failure is not None and failure.kind.caused_by_client:
            exchange.client_disconnected(attempt, failure.kind, failure.error)
        elif failure is not None:
            exchange.outcome = Outcome.STREAM_FAILED
            exchange.error = failure.error
            attempt.failed(failure.kind, failure.error)
        self._end_attempt(exchange, attempt)

    async def _send(self, request: Request, exchange: Exchange, answer: Answer) -> None:
        exchange.status = answer.status
        call = exchange.call
        request.setResponseCode(answer.status, self._phrase(call, answer.status, answer.phrase))
        self._pass_headers(request, call, answer.headers, answer.upstream)
        _answered_by(request, exchange, answer.upstream)
        length = None
        if request.method == b"HEAD":
            announced = answer.headers.getRawHeaders(b"content-length")
            length = announced[0] if announced else None
        collected = answer.body
        if answer.status < 400 and collected.size > MAX_PARSED_ANSWER:
            # Never joined, parsed or written in one piece: each would hold
            # the reactor (an error answer is never this large).
            exchange.capture = AnswerEnds(*collected.ends(USAGE_WINDOW))
            self._whole_head(request, exchange, collected.size, length)
            writer = PartsWriter(request, collected.parts)
            writer.start()
            await writer.done
            return
        body = collected.joined()
        if answer.status >= 400:
            # Some upstreams quote the key they refused; it is not the client's.
            body = self._redactor.redact_bytes(body, call.own_token)
        exchange.response_body = body
        self._write_whole(request, exchange, body, length)

    def _whole_head(
        self, request: Request, exchange: Exchange, size: int, length: bytes | None
    ) -> None:
        # A HEAD answer has no body but tells the length the GET would have;
        # 204 and 304 have no body and must not say otherwise.
        if request.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", length or b"%d" % size)
        exchange.ttfb = self._clock.seconds() - exchange.started
        exchange.bytes_out = size

    def _write_whole(
        self, request: Request, exchange: Exchange, body: bytes, length: bytes | None = None
    ) -> None:
        self._whole_head(request, exchange, len(body), length)
        request.write(body)
        request.finish()

    async def _exhausted(self, request: Request, exchange: Exchange, last: Answer | None) -> None:
        exchange.outcome = Outcome.EXHAUSTED
        if last is not None:
            # The SDK then raises what the upstream meant (a real 429 or 500).
            await self._send(request, exchange, last)
            return
        timeouts = all(a.failure is FailureKind.TIMEOUT for a in exchange.attempts)
        status = 504 if timeouts else 502
        reasons = "; ".join(f"{a.upstream}: {a.error}" for a in exchange.attempts)
        message = f"All upstreams failed: {reasons}"
        body = error_body(
            message,
            type="upstream_error",
            code="upstream_timeout" if status == 504 else "upstream_unavailable",
        )
        exchange.status = status
        exchange.response_body = body
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        self._write_whole(request, exchange, body)


def attempt_deadline(upstream: Upstream, stream: bool, last: bool) -> float:
    """How long one attempt may take before the next upstream is tried."""
    if not stream:
        return upstream.timeout
    if last:
        # Nothing left to fail over to: waiting longer beats failing early.
        return max(upstream.stream_timeout, upstream.timeout)
    return upstream.stream_timeout


def _stale_connection(error: Exception) -> bool:
    """A pooled connection that was dead before this request, not a cancel."""
    if isinstance(error, NoResponse):
        # Our upstream client says whether the connection had been reused.
        return retry_on_new_connection(error)
    # Another agent cannot tell: any connection may have come from a pool.
    if isinstance(error, RequestNotSent):
        return True
    reasons: list[Failure] = getattr(error, "reasons", [])
    return not any(r.check(CancelledError) for r in reasons)


def _is_document(content_type: bytes) -> bool:
    return (
        not content_type
        or content_type.startswith((b"application/json", b"text/"))
        or content_type.endswith(b"+json")
    )


def _answered_by(request: Request, exchange: Exchange, upstream: Upstream) -> None:
    """The answer is this upstream's: the exchange and the client know which."""
    exchange.upstream = upstream.name
    exchange.upstream_model = upstream.upstream_model(exchange.call.model)
    request.setHeader(UPSTREAM_HEADER, upstream.name.encode("utf-8"))


def _header_text(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
