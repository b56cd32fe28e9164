"""The attempt chain: one client request, tried on upstreams one after another.

The chain is one coroutine per request, which awaits each attempt itself
under one reactor timer (``oaproxy.attempts.Deadline``) that cancels what the
attempt awaits when it passes; cancelling aborts the upstream connection, and
a client that goes away cancels the chain, so the attempt under way.

- Non-stream: the deadline covers the response headers and the whole body,
  which is read before anything is written to the client, so an upstream that
  dies mid-body is still failed over.
- Stream: the deadline covers the headers and the first SSE event; the client
  sees nothing until that event (the commit). After it, a cut, silence longer
  than ``stream_idle_timeout`` or an upstream error event is continued on the
  next candidate that resumes (``oaproxy.resume``), each continuation an
  attempt under the same deadline; with none left, or after an event over
  ``max_event_bytes``, the stream ends with an SSE ``error`` event. The last
  candidate waits ``max(stream_timeout, timeout)``.

Before the next candidate, a busy or broken upstream may be tried again
(``oaproxy.retries``), and a request that met a stale pooled connection is
sent once more on a new one: each sending is an attempt of its own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.web._newclient import RequestNotSent, ResponseNeverReceived
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from oaproxy.attempts import (
    AttemptTimeout,
    Deadline,
    StaleConnection,
    Try,
    attempt_deadline,
    fails_over,
    stale_connection,
)
from oaproxy.config import ResumeMode, Upstream
from oaproxy.credentials import Redactor, upstream_authorization
from oaproxy.errorcodes import CONTEXT_LENGTH_EXCEEDED, error_code
from oaproxy.errors import error_body
from oaproxy.exchange import Answer, AttemptLog, Call, Committed, Exchange
from oaproxy.headers import UPSTREAM_HEADER, response_headers, upstream_headers
from oaproxy.largeanswer import MAX_PARSED_ANSWER, USAGE_WINDOW, AnswerEnds
from oaproxy.record import FailureKind, Outcome
from oaproxy.relay import (
    BodyCollector,
    PartsWriter,
    RelayFailure,
    StreamRelay,
    describe,
)
from oaproxy.requestbody import RequestBody, Splice
from oaproxy.resume import ResumeState, StreamFollower, stream_kind
from oaproxy.resumebody import prefill_splices
from oaproxy.retries import RetryPolicy, retry_reason, spacing
from oaproxy.sse import sse_error_event
from oaproxy.upstreams import UpstreamClient
from oaproxy.web import pass_headers

# A non-stream answer is held whole before it is written (to fail over an
# upstream dying mid-body); past this size an answer is refused, not buffered.
MAX_BUFFERED_RESPONSE = 256 * 1024 * 1024
# An error answer is searched for secrets before it is passed on, on the
# reactor: one longer than this is no error document, and is refused.
MAX_ERROR_RESPONSE = 1024 * 1024


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
        retries: RetryPolicy | None = None,
        failover_codes: Collection[str] = (CONTEXT_LENGTH_EXCEEDED,),
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
        self._retries = retries or RetryPolicy(0.5, 5.0, random.Random(), time.time)
        # The error codes of a 400 that fail over (oaproxy.errorcodes).
        self._failover_codes = frozenset(failover_codes)

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
        # The tries left, the next one last (a list: a deque's first block
        # alone is 600 bytes, held for as long as a stream runs).
        tries = [Try(upstream) for upstream in reversed(candidates)]
        # When each attempt on an upstream started (for its retries).
        starts: dict[str, list[float]] = {}
        # The break of a committed stream that the next candidates continue.
        broke: RelayFailure | None = None
        kind = stream_kind(call.api_path) if call.stream else None

        # Given the state, not closing over the exchange that holds it: an
        # exchange in a cycle would be freed only by the garbage collector.
        def continuable(state: ResumeState) -> bool:
            return any(state.how(t.upstream) is not ResumeMode.OFF for t in tries)

        while tries:
            current = tries.pop()
            if broke is not None and current.how is None:
                continuing = self._continuation(exchange, current)
                if continuing is None:
                    continue
                current = continuing
            elif broke is None and kind is not None:
                # Followed only when some candidate left could continue it:
                # a lone upstream's events are not parsed for nothing. Nor are
                # several choices (n > 1): a continuation's may come on others.
                resumers = call.inspected.fields.numbers.get("n", 1) <= 1 and any(
                    t.upstream.resume is not ResumeMode.OFF for t in tries
                )
                exchange.resume = ResumeState(kind, continuable) if resumers else None
            upstream = current.upstream
            full_deadline = attempt_deadline(upstream, call.stream, not tries)
            now = self._clock.seconds()
            started = starts.setdefault(upstream.name, [])
            # A retry has what is left of its upstream's deadline, not a new one.
            seconds = started[0] + full_deadline - now if current.retried else full_deadline
            started.append(now)
            attempt = AttemptLog(
                upstream.name,
                now,
                client_key_sent=upstream.sk == "asis",
                resent=current.resent,
                resumed=current.how,
                resumed_at=exchange.resume.chars if current.how and exchange.resume else None,
            )
            exchange.attempts.append(attempt)
            if self._on_attempt_started is not None:
                self._on_attempt_started(exchange, attempt)
            status: int | None = None
            error: Exception | None = None
            answer: Answer | None = None
            try:
                deadline = Deadline(self._clock, seconds)
                result = await deadline.run(
                    self._try_upstream(request, exchange, current, attempt, deadline)
                )
            except AttemptTimeout as e:
                # Never retried: a silent upstream is left at once.
                attempt.failed(FailureKind.TIMEOUT, str(e))
                self._end_attempt(exchange, attempt)
                continue
            except Exception as e:  # noqa: BLE001 - any failed attempt means the next upstream
                if exchange.client_gone or isinstance(e, CancelledError):
                    exchange.client_disconnected(attempt)
                    self._end_attempt(exchange, attempt)
                    return exchange
                if isinstance(e, StaleConnection):
                    # (Never the client's cancel, told as a request not sent.)
                    attempt.failed(FailureKind.STALE_CONNECTION, e.reason)
                    self._end_attempt(exchange, attempt)
                    tries.append(evolve(current, resent=e.reason))
                    continue
                attempt.failed(*describe(e, self._words(call)))
                error = e
            else:
                if isinstance(result, Committed):
                    broke = await self._finish_relay(exchange, attempt, result)
                    if broke is None:
                        return exchange
                    continue
                answer = result
                status = attempt.status = result.status
                if status in (429, 503):
                    attempt.retry_after = _header_text(result.headers, b"retry-after")
                if current.how is ResumeMode.PREFILL and status in (400, 422):
                    # Refused the prefill: once more here, as a restart.
                    attempt.failure = FailureKind.STATUS
                    self._end_attempt(exchange, attempt)
                    if not await self._spaced(exchange, starts[upstream.name]):
                        return exchange
                    tries.append(evolve(current, how=ResumeMode.RESTART, splices=()))
                    continue
                if exchange.usage_added and status in (400, 422):
                    # Some OpenAI-compatible servers refuse stream_options: once
                    # more on the same upstream, with the body the client sent.
                    self._end_attempt(exchange, attempt)
                    if not await self._spaced(exchange, starts[upstream.name]):
                        return exchange
                    tries.append(evolve(current, with_usage=False))
                    continue
            wait = self._retry_wait(current, attempt, status, error, starts, full_deadline)
            if wait is not None:
                self._end_attempt(exchange, attempt)
                if not await self._pause(exchange, wait):
                    return exchange
                tries.append(evolve(current, retried=current.retried + 1, resent=None))
                continue
            if answer is None:
                self._end_attempt(exchange, attempt)
                continue
            if broke is not None or fails_over(answer.status) or self._too_long(answer):
                # (A continuation has no status of its own to answer with.)
                attempt.failure = FailureKind.STATUS
                self._end_attempt(exchange, attempt)
                last_answer = answer
                continue
            self._end_attempt(exchange, attempt)
            # Before the answer is written: a client gone meanwhile says so after.
            exchange.outcome = Outcome.OK if answer.status < 400 else Outcome.CLIENT_ERROR
            await self._send(request, exchange, answer)
            return exchange
        if broke is not None:
            self._end_broken(request, exchange, broke)
            return exchange
        await self._exhausted(request, exchange, last_answer)
        return exchange

    def _continuation(self, exchange: Exchange, next_try: Try) -> Try | None:
        """How ``next_try`` continues the broken stream; None: it does not."""
        state = exchange.resume
        assert state is not None
        how = state.how(next_try.upstream)
        if how is ResumeMode.OFF:
            return None
        splices: tuple[Splice, ...] = ()
        if how is ResumeMode.PREFILL:
            made = prefill_splices(
                exchange.call.inspected, state.kind, state.text, next_try.upstream
            )
            if made is None:
                how = ResumeMode.RESTART
            else:
                splices = made
        return evolve(next_try, how=how, splices=splices)

    def _retry_wait(
        self,
        current: Try,
        attempt: AttemptLog,
        status: int | None,
        error: Exception | None,
        starts: dict[str, list[float]],
        deadline: float,
    ) -> float | None:
        """How long to wait before trying ``current``'s upstream again (see
        ``oaproxy.retries``); None to go on to the next candidate."""
        reason = retry_reason(status, error)
        if reason is None:
            return None
        upstream = current.upstream
        now = self._clock.seconds()
        started = starts[upstream.name]
        remaining = started[0] + deadline - now
        header = attempt.retry_after if status is not None else None
        wait = self._retries.wait(upstream, current.retried, header, remaining, started, now)
        if wait is not None:
            attempt.retried = reason
        return wait

    async def _pause(self, exchange: Exchange, wait: float) -> bool:
        """Wait before a retry; False when the client went away meanwhile."""
        try:
            await deferLater(self._clock, wait)
        except CancelledError:
            exchange.client_disconnected()
            return False
        return True

    async def _spaced(self, exchange: Exchange, started: Sequence[float]) -> bool:
        """Wait as ``oaproxy.retries.spacing`` says before another attempt on
        an upstream; False when the client went away meanwhile."""
        wait = spacing(started, self._clock.seconds())
        return wait <= 0 or await self._pause(exchange, wait)

    def _too_long(self, answer: Answer) -> bool:
        """A 400 that another candidate may not give (``failover_codes``:
        a larger context, say); other 400s are the request's fault."""
        return answer.status == 400 and error_code(answer.body.joined()) in self._failover_codes

    def _end_broken(self, request: Request, exchange: Exchange, broke: RelayFailure) -> None:
        """No candidate continued the broken stream: it ends as it would have."""
        error = exchange.resuming_failed(broke.error)
        exchange.outcome = Outcome.STREAM_FAILED
        exchange.error = error
        message = sse_error_event(f"upstream stream failed: {error}")
        exchange.bytes_out += len(message)
        request.write(message)
        request.finish()

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
        pass_headers(request, passed)

    def _end_attempt(self, exchange: Exchange, attempt: AttemptLog) -> None:
        """The attempt is over and says why: time it, tell the observers."""
        attempt.duration = self._clock.seconds() - attempt.started
        if self._on_attempt is not None:
            self._on_attempt(exchange, attempt)

    async def _try_upstream(
        self,
        request: Request,
        exchange: Exchange,
        current: Try,
        attempt: AttemptLog,
        deadline: Deadline,
    ) -> Answer | Committed:
        call = exchange.call
        upstream = current.upstream
        with_usage = current.with_usage
        exchange.usage_added = with_usage and call.inspected.asks_usage_for(upstream)
        sent = call.inspected.body_for(upstream, with_usage=with_usage).edited(*current.splices)
        response = await self._request(upstream, call, sent, current.resent is not None, deadline)
        attempt.ttfb = self._clock.seconds() - attempt.started
        # The upstream answered: its status is the attempt's, even if the
        # answer then fails before it is passed on.
        attempt.status = status = response.code
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if 200 <= status < 300 and content_type.startswith(b"text/event-stream"):
            return await self._relay(request, exchange, current, response, deadline, sse=True)
        if 200 <= status < 300 and not call.stream and not _is_document(content_type):
            # Audio, files, images: large and useless to hold; relay as they come.
            return await self._relay(request, exchange, current, response, deadline, sse=False)
        collector = BodyCollector(MAX_BUFFERED_RESPONSE if status < 400 else MAX_ERROR_RESPONSE)
        response.deliverBody(collector)
        body = await deadline.watch(collector.finished)
        return Answer(upstream, status, response.phrase, response.headers, body)

    async def _request(
        self, upstream: Upstream, call: Call, body: RequestBody, fresh: bool, deadline: Deadline
    ) -> IResponse:
        url = upstream.url(call.upstream_path)
        headers = upstream_headers(
            call.headers,
            keep_header=upstream.keep_header,
            authorization=upstream_authorization(upstream, call.authorization),
            forwarded_for=call.forwarded_for,
        )
        client = self._clients(upstream)
        # After a pooled connection the upstream had closed: on a new one.
        agent = client.fresh_agent if fresh else client.agent
        sent = agent.request(call.method, url, headers, body.producer(self._cooperator))
        try:
            return await deadline.watch(sent)
        except (RequestNotSent, ResponseNeverReceived) as e:
            # On a new connection the failure is the upstream's doing (it
            # may have acted on the request): not sent again as stale.
            if fresh or not stale_connection(e):
                raise
            raise StaleConnection(describe(e, self._words(call))[1]) from e

    async def _relay(
        self,
        request: Request,
        exchange: Exchange,
        current: Try,
        response: IResponse,
        deadline: Deadline,
        *,
        sse: bool,
    ) -> Committed:
        upstream = current.upstream
        state = exchange.resume if sse else None

        def commit() -> None:
            if current.how is not None:
                # The client has the first attempt's status and headers.
                exchange.upstream = upstream.name
                exchange.upstream_model = upstream.upstream_model(exchange.call.model)
                return
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
            on_event=self._observer(exchange, current) if sse else None,
            pace=self._stream_pace(exchange.call.api_path) if sse and self._stream_pace else None,
            follower=StreamFollower(state, current.how) if state is not None else None,
        )
        response.deliverBody(relay)
        await deadline.watch(relay.first_event)
        return Committed(upstream, response.code, relay)

    def _observer(self, exchange: Exchange, current: Try) -> Callable[[bytes], bool] | None:
        """The record's observer of a stream's events: a continuation's is
        the first attempt's, so that the record has one answer."""
        state = exchange.resume
        if current.how is not None and state is not None:
            return state.observer
        observer = self._on_event(exchange, current.upstream) if self._on_event else None
        if state is not None:
            state.observer = observer
        return observer

    async def _finish_relay(
        self, exchange: Exchange, attempt: AttemptLog, committed: Committed
    ) -> RelayFailure | None:
        """Wait for a committed relay to end; its failure when the stream is
        to be continued on the next candidate, else None."""
        attempt.status = committed.status
        relay = committed.relay
        failure: RelayFailure | None
        try:
            failure = await relay.done
        except CancelledError:
            failure = RelayFailure(FailureKind.CANCELLED, "client disconnected")
        exchange.bytes_out += relay.bytes_out
        if failure is not None and relay.left_open:
            attempt.failed(failure.kind, failure.error)
            if relay.follower is not None:
                relay.follower.ended()
            self._end_attempt(exchange, attempt)
            return failure
        if failure is not None and failure.kind.caused_by_client:
            exchange.client_disconnected(attempt, failure.kind, failure.error)
        elif failure is not None:
            exchange.outcome = Outcome.STREAM_FAILED
            exchange.error = failure.error
            attempt.failed(failure.kind, failure.error)
        self._end_attempt(exchange, attempt)
        return None

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
        status, message = exchange.all_failed()
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
