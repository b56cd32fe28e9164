"""Moving bodies: response bodies to clients (request bodies are
``oaproxy.requestbody``'s), and bytes held in memory to anyone.

``StreamRelay`` is the streaming passthrough: it is the ``Protocol`` given to
an upstream response's ``deliverBody``, writes to the client's twisted.web
``Request`` as bytes arrive, is the client's producer in front of the
upstream transport (a slow client pauses the upstream), and never pretends
that a stream which ended uncleanly finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from oaproxy.credentials import hide_key_shapes
from oaproxy.record import FailureKind
from oaproxy.resume import Diverged, StreamFollower, UpstreamErrorEvent
from oaproxy.sse import EventTooLarge, SSESplitter, event_data, sse_error_event
from oaproxy.traffic.pacing import Pacer


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written in one go (no cooperator round trip);
    its pieces are let go once written."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces = pieces
        self.length = sum(len(piece) for piece in pieces)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        pieces, self._pieces = self._pieces, ()
        for piece in pieces:
            consumer.write(piece)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class UpstreamEndedEarly(Exception):
    """The upstream closed a response before it was complete (or made it too long)."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.UPSTREAM_ENDED_EARLY) -> None:
        super().__init__(message)
        self.kind = kind


@frozen
class CollectedBody:
    """A whole response body, in the pieces it arrived in: joined only where
    that is cheap, as a copy of a 256 MiB answer holds the reactor."""

    parts: tuple[bytes, ...]
    size: int

    def joined(self) -> bytes:
        return b"".join(self.parts)

    def ends(self, size: int) -> tuple[bytes, bytes]:
        """At most ``size`` bytes of the start of the body, and of its end."""
        head = tail = b""
        for part in self.parts:
            if len(head) >= size:
                break
            head += part[: size - len(head)]
        for part in reversed(self.parts):
            if len(tail) >= size:
                break
            tail = part[-(size - len(tail)) :] + tail
        return head, tail


class BodyCollector(Protocol):
    """Reads a whole (non-stream) response body; cancelling aborts the upstream."""

    def __init__(self, limit: int) -> None:
        self.finished: Deferred[CollectedBody] = Deferred(self._cancel)
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._parts.clear()
            _producer(self).stopProducing()
            if not self.finished.called:
                self.finished.errback(
                    Failure(
                        UpstreamEndedEarly(
                            f"response body over {self._limit} bytes", FailureKind.BODY_TOO_LARGE
                        )
                    )
                )
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # (PotentialDataLoss: no Content-Length and no chunking, so the
            # close is the end.)
            self.finished.callback(CollectedBody(tuple(self._parts), self._size))
        else:
            _, error = describe(reason)
            self.finished.errback(Failure(UpstreamEndedEarly(error)))

    def _cancel(self, _: Deferred[CollectedBody]) -> None:
        _producer(self).stopProducing()


def small_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """The whole body of an answer oaproxy reads itself (a models list, a
    Replicate prediction), joined: at most ``limit`` bytes."""
    collector = BodyCollector(limit)
    response.deliverBody(collector)
    return collector.finished.addCallback(CollectedBody.joined)


@implementer(IPushProducer)
class PartsWriter:
    """Writes a body held in memory to the client a piece at a time, as the
    client's connection takes it: twisted's transport would copy one large
    write whole into its buffer. ``done`` fires once the request finished,
    or the client went away."""

    def __init__(self, request: Request, parts: tuple[bytes, ...]) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self.stopProducing())
        self._request = request
        self._parts = parts
        self._next = 0
        self._paused = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        parts = self._parts
        # A write may pause this producer at once, when the buffer is full.
        while not self._paused and self._next < len(parts) and not self.done.called:
            self._next += 1
            self._request.write(parts[self._next - 1])
        if self._next == len(parts) and not self.done.called:
            self._request.unregisterProducer()
            self._request.finish()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        """The client went away (its request tells the forwarder)."""
        if not self.done.called:
            self.done.callback(None)


@frozen
class RelayFailure:
    """Why a committed relay did not end with the whole answer."""

    kind: FailureKind
    error: str


@implementer(IPushProducer)
class StreamRelay(Protocol):
    """Relays an upstream body to the client as it arrives.

    With ``sse`` the body is split into events: the relay commits (writes the
    status and headers to the client) only at the first whole event with
    data, so an upstream that answers 200 and then nothing (or only
    keep-alive comments) can still be failed over; a
    usage-only event the client did not ask for is left out. An event over
    ``max_event_bytes``, or more than that held before the first one, fails
    the stream. Without ``sse`` bytes are passed on untouched and the relay
    commits at once.

    ``first_event`` fires when the relay committed; ``done`` fires when the
    relay ended after committing: with None for a whole answer, else with a
    ``RelayFailure``. Before the commit an upstream failure errbacks
    ``first_event`` (the caller fails over). ``words`` makes the texts of
    upstream failures fit to repeat (``Redactor.words``).

    With a ``follower`` (``oaproxy.resume``) each event passes through it
    first; a failure it ``can_resume`` leaves the client's request open
    (no error event, no finish) for the next attempt to continue, and an
    upstream's error event is such a failure too. Only events with data
    count as the stream's progress: keep-alive comments do not hold off
    ``idle_timeout``.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        commit: Callable[[], None],
        idle_timeout: float,
        *,
        sse: bool,
        max_event_bytes: int,
        words: Callable[[str], str],
        on_event: Callable[[bytes], bool] | None = None,
        pace: float | None = None,
        follower: StreamFollower | None = None,
    ) -> None:
        self.first_event: Deferred[None] = Deferred(self._cancel)
        self.done: Deferred[RelayFailure | None] = Deferred(self._cancel)
        self.bytes_out = 0
        # The relay ended leaving the client's response open, for the next
        # attempt to continue (see ``follower``).
        self.left_open = False
        self._request = request
        self._clock = clock
        self._commit = commit
        self._idle_timeout = idle_timeout
        self._splitter = SSESplitter(max_event_bytes) if sse else None
        self._max_event_bytes = max_event_bytes
        self._words = words
        self._on_event = on_event
        self.follower = follower
        self._committed = False
        self._ended = False
        self._paused = False
        self._saw_done = False
        # Events before the commit, with their data.
        self._held: list[tuple[bytes, bytes | None]] = []
        self._held_bytes = 0
        # One timer per attempt for idleness, pushed back lazily: progress
        # only notes its time, and the timer, when it fires, waits again for
        # whatever is left since then (no timer moved per event).
        self._idle: IDelayedCall | None = None
        self._progress = 0.0
        # The upstream is paused while the client is (_paused) or while the
        # pacer holds events back (_pace_holding).
        self._upstream_paused = False
        self._pace_holding = False
        self._upstream_over = False
        self._pacer = (
            Pacer(clock, pace, self._paced_write, self._pace_hold)
            if pace is not None and sse
            else None
        )

    def connectionMade(self) -> None:
        if self._splitter is None:
            self._start()

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        if self._splitter is None:
            self._progress = self._clock.seconds()
            self._write(data)
            return
        try:
            events = self._splitter.feed(data)
        except EventTooLarge as e:
            self._too_large(str(e))
            return
        self._take(events)

    def _take(self, events: list[bytes]) -> None:
        """Hold, or pass on, whole events just split off the stream."""
        if not events:
            return
        read = []
        carries = False
        for event in events:
            data = event_data(event)
            if data is not None:
                carries = True
            read.append((event, data))
        if not self._committed:
            # Comments and keep-alives (OpenRouter's ": OPENROUTER PROCESSING")
            # carry no data: held until the first real event, so an upstream
            # that only keeps the connection alive can still be failed over.
            self._held.extend(read)
            if not carries:
                self._held_bytes += sum(map(len, events))
                if self._held_bytes > self._max_event_bytes:
                    self._too_large(f"over {self._max_event_bytes} bytes before the first event")
                return
            read, self._held = self._held, []
        elif carries:
            self._progress = self._clock.seconds()
        passed = []
        for event, data in read:
            out = self._pass_on(event, data)
            if self._ended:
                # The follower saw the stream break (or diverge).
                return
            if out is not None:
                passed.append(out)
        if not self._committed:
            self._start()
        self._relay_events(passed)

    def _relay_events(self, events: list[bytes]) -> None:
        if self._pacer is not None:
            self._pacer.feed(events)
        elif events:
            self._write(b"".join(events))

    def _pass_on(self, event: bytes, data: bytes | None) -> bytes | None:
        """The event (whose data is ``data``) as it goes to the client; None:
        left out."""
        if data is None:
            return event
        if data == b"[DONE]":
            if self.follower is not None:
                try:
                    self.follower.done()
                except Diverged as e:
                    self._broke(e)
                    return None
            self._saw_done = True
            if self._on_event is not None:
                # Seen too (the cache stores only streams that end so), and
                # always passed on.
                self._on_event(data)
            return event
        if self.follower is not None:
            try:
                followed = self.follower.rewrite(event, data)
            except (UpstreamErrorEvent, Diverged) as e:
                self._broke(e)
                return None
            if followed is None:
                return None
            event, data = followed
        # on_event captures the event and says whether to pass it on.
        return event if self._on_event is None or self._on_event(data) else None

    def _broke(self, error: UpstreamErrorEvent | Diverged) -> None:
        """The follower says the stream cannot go on as it is."""
        self._abort_upstream()
        kind = FailureKind.DIVERGED if isinstance(error, Diverged) else FailureKind.STREAM_ERROR
        failure = RelayFailure(kind, self._words(str(error)))
        if self._committed or kind is FailureKind.DIVERGED:
            # A continuation's client has its response already: a restart
            # that diverges ends it, whether or not it sent anything new.
            if not self._committed:
                self._start()
            self._end(failure)
            return
        # Before the commit: the attempt failed, the next one is tried.
        self._ended = True
        self.first_event.errback(Failure(UpstreamEndedEarly(failure.error, kind)))

    def _start(self) -> None:
        self._committed = True
        self._commit()
        self._progress = self._clock.seconds()
        self._idle = self._clock.callLater(self._idle_timeout, self._idle_expired)
        # The relay, not the transport, is the client's producer: while the
        # client holds the upstream paused, the silence is not the upstream's.
        self._request.registerProducer(self, True)
        self.first_event.callback(None)

    def pauseProducing(self) -> None:
        # From now on the timer measures the client's silence, not the
        # upstream's: a client that stops reading must not hold it forever.
        self._paused = True
        self._restart_timer()
        self._steer_upstream()

    def resumeProducing(self) -> None:
        self._paused = False
        self._restart_timer()
        self._steer_upstream()

    def _steer_upstream(self) -> None:
        paused = self._paused or self._pace_holding
        if paused != self._upstream_paused:
            self._upstream_paused = paused
            if paused:
                _producer(self).pauseProducing()
            else:
                _producer(self).resumeProducing()

    def _pace_hold(self, holding: bool) -> None:
        self._pace_holding = holding
        if not self._ended and not self._upstream_over:
            self._steer_upstream()

    def _paced_write(self, data: bytes) -> None:
        # The upstream is silent because the pacer holds it: not idle.
        if not self._paused:
            self._progress = self._clock.seconds()
        self._write(data)

    def _restart_timer(self) -> None:
        if self._ended:
            return
        self._progress = self._clock.seconds()
        if self._idle is None:
            self._idle = self._clock.callLater(self._idle_timeout, self._idle_expired)

    def stopProducing(self) -> None:
        self._abort_upstream()

    def _write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upstream_over = True
        if self._ended:
            return
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if clean and self._splitter is not None:
            # An event ending in a bare CR waited for the next byte (the LF of
            # a CRLF?): there is none, so it is whole, and may be "[DONE]".
            self._take(self._splitter.end())
        if not self._committed:
            self._ended = True
            if clean:
                error = "upstream ended the stream before its first event"
            else:
                _, error = describe(reason, self._words)
            self.first_event.errback(Failure(UpstreamEndedEarly(error)))
            return
        # A body without length or chunking ends with the connection: that is
        # a clean end for raw bodies, and for streams only after "[DONE]".
        if reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and (self._splitter is None or self._saw_done)
        ):
            pending = self._splitter.pending() if self._splitter is not None else b""
            if pending:
                # An unterminated tail: passed on as it came, not invented or dropped.
                self._relay_events([pending])
            self._after_paced(None)
        else:
            _, error = describe(reason, self._words)
            self._after_paced(RelayFailure(FailureKind.UPSTREAM_ENDED_EARLY, error))

    def _too_large(self, error: str) -> None:
        """The upstream sent more than one event may hold: before the
        commit the attempt fails (the next upstream is tried), after it the
        stream ends with an error event."""
        self._abort_upstream()
        if self._committed:
            self._end(RelayFailure(FailureKind.EVENT_TOO_LARGE, error))
            return
        self._ended = True
        self.first_event.errback(Failure(UpstreamEndedEarly(error, FailureKind.EVENT_TOO_LARGE)))

    def _after_paced(self, failure: RelayFailure | None) -> None:
        """End once the pacer wrote what it holds (at once without one)."""
        if self._pacer is None:
            self._end(failure)
        else:
            self._pacer.when_drained(lambda: self._end(failure))

    def _idle_expired(self) -> None:
        quiet = self._clock.seconds() - self._progress
        if quiet < self._idle_timeout:
            # There was progress since the timer was set: wait the rest.
            self._idle = self._clock.callLater(self._idle_timeout - quiet, self._idle_expired)
            return
        self._idle = None
        self._abort_upstream()
        if self._paused:
            self._end(
                RelayFailure(
                    FailureKind.CLIENT_STOPPED_READING,
                    f"client stopped reading for more than {self._idle_timeout:g}s",
                )
            )
            self._request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._end(
            RelayFailure(
                FailureKind.STREAM_IDLE, f"stream idle for more than {self._idle_timeout:g}s"
            )
        )

    def _end(self, failure: RelayFailure | None) -> None:
        if self._saw_done and failure is not None and not failure.kind.caused_by_client:
            # After "[DONE]" the answer is whole, however the upstream then ends.
            failure = None
        self._ended = True
        if self._pacer is not None:
            self._pacer.stop()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        request = self._request
        if failure is not None and self.follower is not None and self._resumes(failure):
            # The next attempt continues this response.
            self.left_open = True
            request.unregisterProducer()
        elif failure is None or not failure.kind.caused_by_client:
            request.unregisterProducer()
            if failure is not None and self._splitter is None:
                # A raw body cannot carry an error: closing without the final
                # chunk tells the client it is incomplete.
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
            else:
                if failure is not None:
                    # Clients raise on this instead of taking a cut answer as whole.
                    self._write(sse_error_event(f"upstream stream failed: {failure.error}"))
                request.finish()
        if not self.done.called:
            self.done.callback(failure)

    def _resumes(self, failure: RelayFailure) -> bool:
        assert self.follower is not None
        if failure.kind.caused_by_client or failure.kind is FailureKind.DIVERGED:
            return False
        return self.follower.can_resume

    def _abort_upstream(self) -> None:
        if self.transport is not None:
            _producer(self).stopProducing()

    def _cancel(self, d: Deferred[Any]) -> None:
        """The attempt's deadline passed, or the client went away."""
        if self._ended:
            return
        self._abort_upstream()
        if d is self.done:
            self._end(RelayFailure(FailureKind.CANCELLED, "client disconnected"))
        else:
            self._ended = True


def _producer(protocol: Protocol) -> IPushProducer:
    """A body protocol's transport: the upstream connection, as a producer."""
    return cast(IPushProducer, protocol.transport)


def describe(
    reason: Failure | BaseException, words: Callable[[str], str] = hide_key_shapes
) -> tuple[FailureKind, str]:
    """The kind of an attempt's failure, and a short text for it without
    tracebacks, made fit to repeat by ``words``: an exception's text is
    from outside (an upstream's garbage, a host name, an echoed header)."""
    exc = reason.value if isinstance(reason, Failure) else reason
    inner = getattr(exc, "reasons", None)
    if inner:
        described = [describe(r, words) for r in inner]
        # The first reason is what went wrong; the others followed from it.
        return described[0][0], "; ".join(text for _, text in described)
    if isinstance(exc, CancelledError):
        return FailureKind.CANCELLED, "cancelled"
    if isinstance(exc, PotentialDataLoss):
        return FailureKind.OTHER, "the upstream closed the connection before the end of its answer"
    text = words(str(exc).strip())
    if isinstance(exc, UpstreamEndedEarly):
        # Its words are oaproxy's own, and say it all.
        return exc.kind, text
    name = type(exc).__name__
    kind = _connect_failure(exc)
    if kind is not None:
        return kind, f"connect error: {name}: {text}".rstrip(": ")
    return FailureKind.OTHER, f"{name}: {text}" if text else name


def _connect_failure(exc: object) -> FailureKind | None:
    """How reaching the upstream failed, if that is what ``exc`` says."""
    # DNSLookupError, what HostnameEndpoint fails with, is no ConnectError.
    if isinstance(exc, DNSLookupError):
        return FailureKind.DNS_ERROR
    if isinstance(exc, ConnectError):
        return FailureKind.CONNECT_ERROR
    if type(exc).__module__.startswith("OpenSSL"):
        return FailureKind.TLS_ERROR
    return None
