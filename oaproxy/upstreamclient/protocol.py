"""One connection to an upstream: requests written whole, responses parsed by
llhttp (through ``httptools``), one request at a time.

Per request the connection makes one ``Deferred`` (the caller's), one
``UpstreamResponse`` with its ``Headers``, and for a request with a body one
``BodyWriter``; the request head arrives as bytes, built once by the agent.

A connection goes back to its pool only after a final response that was
complete, framed by length or chunks, allowed keep-alive, and was followed by
nothing: any byte after it (an upstream that sends more than its
``Content-Length``, or a second response) closes the connection, and so does
any byte that arrives while it is idle. What no request asked for can never
reach the next request's caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer

from oaproxy.upstreamclient.errors import (
    IncompleteBody,
    NoResponse,
    ResponseHeadTooLarge,
    UnexpectedStatus,
)

if TYPE_CHECKING:
    from oaproxy.upstreamclient.pool import Route, UpstreamPool

from oaproxy.upstreamclient.bodywriter import BodyWriter
from oaproxy.upstreamclient.response import (
    RESPONSE_DONE,
    UpstreamResponse,
    add_header,
    is_chunked,
    make_headers,
)

#: Status line and headers of one response (each 1xx counts on its own).
#: Upstream APIs send a few KiB; nginx refuses more than 8 KiB by default.
MAX_HEAD_BYTES = 64 * 1024


class _Halt(Exception):
    """Raised from a parser callback to stop llhttp where it is."""


# -- the connection --------------------------------------------------------------


class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to an upstream, made and pooled by ``UpstreamPool``."""

    def __init__(self, pool: UpstreamPool, route: Route) -> None:
        self.route = route
        self.idle_since = 0.0
        self._pool = pool
        self._parser = HttpResponseParser(self)
        self._transport: Any = None
        # Whether a request is in flight; never again once ``_dead``.
        self._busy = False
        self._dead = False
        self._lost = False
        self._closed: list[Deferred[None]] = []
        # The request in flight.
        self._deferred: Deferred[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._stopped: UpstreamResponse | None = None
        self._writer: BodyWriter | None = None
        self._reused = False
        self._head_request = False
        self._received = False
        self._complete = False
        self._keep_alive = False
        self._paused = False
        self._until_close = False
        self._body_bytes = 0
        # The response head being parsed (a 1xx, or the final one).
        self._began = False
        self._informational = False
        self._head_bytes = 0
        self._phrase = b""
        self._raw: dict[bytes, list[bytes]] = {}

    def connectionMade(self) -> None:
        transport = self._transport = self.transport
        if ITCPTransport.providedBy(transport):
            # Requests are written whole: no Nagle delay waiting for an ACK.
            transport.setTcpNoDelay(True)

    # -- requests (from the agent) ---------------------------------------------

    def send(
        self,
        deferred: Deferred[UpstreamResponse],
        head: bytes,
        producer: IBodyProducer | None,
        head_request: bool,
        reused: bool,
    ) -> None:
        """Write one request; ``deferred`` fires with its response."""
        self._busy = True
        self._deferred = deferred
        self._reused = reused
        self._head_request = head_request
        self._received = False
        self._complete = False
        self._head_bytes = 0
        self._body_bytes = 0
        if producer is None:
            self._transport.write(head)
            return
        writer = self._writer = BodyWriter(self, self._transport, head, producer)
        writer.start()

    def cancel(self, deferred: Deferred[Any]) -> None:
        """The caller cancelled before the response: abort the connection."""
        if deferred is not self._deferred:
            return
        self._deferred = None
        self._die(abort=True)

    def request_written(self) -> None:
        self._writer = None

    def request_failed(self, failure: Failure) -> None:
        """The body producer failed (or wrote the wrong length)."""
        self._writer = None
        deferred, response = self._deferred, self._response
        self._deferred = self._response = None
        self._die(abort=True)
        if deferred is not None:
            deferred.errback(Failure(RequestGenerationFailed([failure])))
        elif response is not None:
            response._end(Failure(ResponseFailed([failure], response)))

    # -- the body's transport (from the response) ---------------------------------

    def pause_body(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def resume_body(self) -> None:
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()

    def stop_body(self, response: UpstreamResponse) -> None:
        if response is not self._response:
            return
        self._response = None
        # Told how it ended once the connection is gone.
        self._stopped = response
        self._die(abort=True)

    # -- the pool ------------------------------------------------------------------

    def close_idle(self) -> Deferred[None]:
        """Close this idle connection; the result fires when it is closed."""
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
            return d
        self._closed.append(d)
        if not self._dead:
            self._die(abort=False)
        return d

    def _die(self, *, abort: bool) -> None:
        """Never to be used again: close the connection."""
        self._busy = False
        self._dead = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        if abort:
            self._transport.abortConnection()
        else:
            self._transport.loseConnection()

    # -- the wire ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._busy:
            # Idle, or past the end of the response: bytes no request asked for.
            if not self._dead:
                self._pool.discard(self)
                self._die(abort=True)
            return
        self._received = True
        if self._response is None:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(ResponseHeadTooLarge(f"response head over {MAX_HEAD_BYTES} bytes"))
                return
            self._began = False
        error: BaseException | None = None
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, _Halt):
                error = cause if cause is not None else e
        except HttpParserError as e:
            error = e
        if self._complete:
            if error is not None:
                # More after a complete response: the response stands, the
                # connection is not used again.
                self._keep_alive = False
            self._finish_response()
        elif error is not None:
            if self._busy:
                self._fail(error)
        elif self._response is None and self._busy:
            # Still in a head: count it, from where it began if in this data.
            self._head_bytes = 0 if self._began else self._head_bytes + len(data)

    def _finish_response(self) -> None:
        response = self._response
        self._response = None
        self._complete = False
        writer = self._writer
        if writer is not None and writer.all_written:
            # Its producer had yet to say it was done: nothing more will come.
            self._writer = None
            writer.stop()
            writer = None
        if writer is not None or not self._keep_alive:
            # An upstream that answered before reading the whole body (or
            # said close) gets no second request on this connection.
            self._die(abort=False)
        else:
            self._busy = False
            if self._paused:
                self._paused = False
                self._transport.resumeProducing()
            # Pooled before the body protocol hears of the end, so that a
            # request it makes at once can use this connection.
            self._pool.release(self)
        if response is not None:
            response._end(RESPONSE_DONE)

    def _fail(self, error: BaseException) -> None:
        """An upstream that does not speak HTTP/1.1 as it must."""
        deferred, response = self._deferred, self._response
        self._deferred = self._response = None
        self._die(abort=True)
        failure = Failure(error)
        if deferred is not None:
            deferred.errback(Failure(ResponseFailed([failure])))
        elif response is not None:
            response._end(Failure(ResponseFailed([failure], response)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if not self._busy and not self._dead:
            self._pool.discard(self)
        writer = self._writer
        self._writer = None
        self._busy = False
        self._dead = True
        if writer is not None:
            writer.stop()
        deferred, response, stopped = self._deferred, self._response, self._stopped
        self._deferred = self._response = self._stopped = None
        if deferred is not None:
            if self._received:
                error: Exception = ResponseFailed([reason])
            else:
                error = NoResponse([reason], reused=self._reused, request_sent=writer is None)
            deferred.errback(Failure(error))
        elif response is not None:
            if self._until_close:
                # No length and no chunks: the close is the end, as far as
                # anyone can tell.
                response._end(Failure(PotentialDataLoss()))
            else:
                announced = response.length if isinstance(response.length, int) else None
                cut = Failure(IncompleteBody(self._body_bytes, announced))
                response._end(Failure(ResponseFailed([reason, cut], response)))
        elif stopped is not None:
            stopped._end(Failure(ResponseFailed([reason], stopped)))
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete or self._response is not None or not self._busy:
            # A second response to one request (or bytes after the first):
            # the connection is not used again.
            self._keep_alive = False
            raise _Halt()
        self._began = True
        self._phrase = b""
        self._raw = {}

    def on_status(self, phrase: bytes) -> None:
        # A span: may come in pieces when the status line is split.
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None or not self._busy:
            return  # a trailer after a chunked body, or after the caller stopped
        add_header(self._raw, name, value)

    def on_headers_complete(self) -> None:
        code: int = self._parser.get_status_code()
        if code < 200:
            if code == 101:
                raise UnexpectedStatus("101 Switching Protocols to a request that asked for none")
            # 100 Continue, 102 Processing, 103 Early Hints: skipped, quietly.
            self._informational = True
            return
        raw = self._raw
        length: int | object
        if self._head_request or code == 204 or code == 304:
            length = 0
            self._until_close = False
        else:
            coding = raw.get(b"Transfer-Encoding")
            if coding is not None:
                length = UNKNOWN_LENGTH
                self._until_close = not is_chunked(coding)
            else:
                announced = raw.get(b"Content-Length")
                if announced is not None:
                    length = int(announced[0])
                    self._until_close = False
                else:
                    length = UNKNOWN_LENGTH
                    self._until_close = True
        response = UpstreamResponse(
            code,
            self._phrase,
            make_headers(raw),
            length,
            self._parser.get_http_version(),
            self,
        )
        self._response = response
        deferred = self._deferred
        self._deferred = None
        if deferred is not None:
            deferred.callback(response)
        if self._head_request and self._response is response:
            # llhttp cannot be told that a HEAD response has no body, nor
            # where its head ended: the response is complete, and the
            # connection is not used again.
            self._complete = True
            self._keep_alive = False
            raise _Halt()

    def on_body(self, data: bytes) -> None:
        response = self._response
        if response is None:
            return  # a 1xx's body, or after the caller stopped this one
        self._body_bytes += len(data)
        protocol = response._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        else:
            response._buffer.append(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._response is None:
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
