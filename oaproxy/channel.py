"""One client connection: twisted.web's ``HTTPChannel`` whose requests are
read by llhttp (``oaproxy.requestparser``), with deadlines a slow client
cannot stretch, saying what it does through the site's rate-limited log
(``oaproxy.logthrottle``).

Twisted's idle timer restarts on every byte, so a client sending its request
head one byte a second holds its connection (and a descriptor) for ever; a
few hundred such clients exhaust the process. Here:

- a request head must arrive whole within ``header_timeout`` seconds: of the
  connection's start for the first, of its first byte for the next ones (a
  keep-alive connection may idle between requests for the site's
  ``timeOut``, as before);
- a body must average ``body_min_rate`` bytes a second over each
  ``body_rate_window`` seconds until it is whole.

Either way the client gets ``408`` and the connection is closed (aborted if
it is still open ``abortTimeout`` seconds later). Twisted would also write
one log line per idle connection it times out.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http

from oaproxy.errors import error_body
from oaproxy.requestparser import RequestParser
from oaproxy.upstreamclient.response import make_headers


class ClientClose(Enum):
    """Why oaproxy closed a client connection itself."""

    IDLE = "idle"  # no byte for the site's timeOut
    SLOW_HEAD = "slow_head"  # the request head took longer than header_timeout
    SLOW_BODY = "slow_body"  # the body came slower than body_min_rate


_LOG_LINES = {
    ClientClose.IDLE: "closing client connections idle too long, such as {peer}",
    ClientClose.SLOW_HEAD: (
        "closing client connections whose request head took over {seconds:g}s, such as {peer}"
    ),
    ClientClose.SLOW_BODY: (
        "closing client connections whose body came slower than {rate} bytes/s"
        " over {seconds:g}s, such as {peer}"
    ),
}

_TIMEOUT_BODY = error_body(
    "The request was not received in time.", type="invalid_request_error", code="request_timeout"
)
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TIMEOUT_BODY)
) + _TIMEOUT_BODY


class ProxyChannel(http.HTTPChannel):
    """An HTTP/1.1 client connection of a ``ProxySite``."""

    site: Any  # the ProxySite, set by Site.buildProtocol
    _abort_later: IDelayedCall | None = None
    _head_due: IDelayedCall | None = None
    _rate_check: IDelayedCall | None = None
    # Between requests: the next byte starts a head, and its deadline.
    _awaiting_head = True
    # Body bytes in the current rate window.
    _window_bytes = 0
    # A body has begun, and its rate check is yet to start (dataReceived).
    _body_started = False
    # Bytes the client sent while a request of it was being answered.
    _sent_meanwhile = 0

    # The connection's two addresses, asked of the transport once (twisted.web
    # asks for both on every request; the local one is a getsockname call).
    _host_address: IAddress | None = None
    _peer_address: IAddress | None = None

    def getHost(self) -> IAddress:
        if self._host_address is None:
            self._host_address = self.transport.getHost()  # type: ignore[union-attr]
        return self._host_address

    def getPeer(self) -> IAddress:
        if self._peer_address is None:
            self._peer_address = self.transport.getPeer()  # type: ignore[union-attr]
        return self._peer_address

    def connectionMade(self) -> None:
        super().connectionMade()
        self._reading = RequestParser(
            self, max_head_bytes=self.totalHeadersSize, max_headers=self.maxHeaders
        )
        self.site.connection_opened()
        self._head_due = self.callLater(self.site.config.header_timeout, self._slow_head)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._handlingRequest:
            self._sent_meanwhile += len(data)
            if (
                self._sent_meanwhile > self._optimisticEagerReadSize
                and not self._waitingForTransport
            ):
                # As twisted.web: a client sending requests while one is
                # being answered is read no further, past a little.
                self._networkProducer.pauseProducing()
        self._reading.feed(data)
        self._start_deadlines()

    def _start_deadlines(self) -> None:
        """The deadlines of what was read and left unfinished, started once it
        is read (in the same reactor turn as it came): most heads and bodies
        come whole in one read, and need no timer."""
        if not self.connected:
            return
        config = self.site.config
        if self._awaiting_head and self._head_due is None:
            self._head_due = self.callLater(config.header_timeout, self._slow_head)
        if self._body_started:
            self._body_started = False
            self._rate_check = self.callLater(config.body_rate_window, self._body_rate)

    # -- what the parser read (oaproxy.requestparser) ------------------------

    def request_began(self) -> None:
        self.requests.append(self.requestFactory(self))

    def head_read(
        self, method: bytes, path: bytes, version: bytes, headers: dict[bytes, list[bytes]]
    ) -> None:
        self.requests[-1].requestHeaders = make_headers(headers)
        chunked = headers.get(b"Transfer-Encoding")
        length = headers.get(b"Content-Length")
        if chunked is not None:
            # twisted.web's rule: one Transfer-Encoding, chunked.
            if len(chunked) != 1 or chunked[0].lower() != b"chunked":
                self.unreadable()
                return
            self.length = None
        else:
            # llhttp checked it: digits, once, and not with Transfer-Encoding.
            self.length = int(length[0]) if length is not None else 0
        self._command, self._path, self._version = method, path, version
        self.allHeadersReceived()

    def body_read(self, data: bytes) -> None:
        if self._rate_check is not None or self._body_started:
            self._window_bytes += len(data)
        self.requests[-1].handleContentChunk(data)

    def request_read(self) -> None:
        self.allContentReceived()

    def unreadable(self) -> None:
        self._reading.stop()
        self._respondToBadRequestAndDisconnect()

    # -- twisted.web's request steps ------------------------------------------

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        _cancel(self._head_due)
        self._head_due = None
        super().allHeadersReceived()
        # 0: no body; an int: Content-Length; None: chunked.
        if self.length != 0:
            self._window_bytes = 0
            self._body_started = True

    def allContentReceived(self) -> None:
        self._body_started = False
        _cancel(self._rate_check)
        self._rate_check = None
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Set first: the requests the client sent meanwhile are read from
        # here on, and their heads are due like any.
        self._awaiting_head = bool(self.persistent)
        self._sent_meanwhile = 0
        waiting = self._reading.waiting
        super().requestDone(request)
        if self.persistent:
            self._reading.release()
            if waiting:
                self._start_deadlines()

    def timeoutConnection(self) -> None:
        self._give_up(ClientClose.IDLE)

    def _slow_head(self) -> None:
        self._head_due = None
        self._give_up(ClientClose.SLOW_HEAD, seconds=self.site.config.header_timeout)

    def _body_rate(self) -> None:
        config = self.site.config
        if self._window_bytes < config.body_min_rate * config.body_rate_window:
            self._rate_check = None
            self._give_up(
                ClientClose.SLOW_BODY, rate=config.body_min_rate, seconds=config.body_rate_window
            )
            return
        self._window_bytes = 0
        self._rate_check = self.callLater(config.body_rate_window, self._body_rate)

    def _give_up(self, why: ClientClose, **fields: Any) -> None:
        """Close the connection, saying why; abort it if it is still open
        ``abortTimeout`` seconds later (a client that reads nothing)."""
        self.site.client_log.info(_LOG_LINES[why], peer=self._peer(), **fields)
        self.site.connection_closed_for(why)
        self.setTimeout(None)
        if why is not ClientClose.IDLE:
            # Nothing was answered on it yet: the client may learn why.
            self.transport.write(_TIMEOUT_ANSWER)  # type: ignore[union-attr]
        self._abort_later = self.callLater(self.abortTimeout, self._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self._abort_later = None
        self.site.client_log.info(
            "aborting client connections that did not close, such as {peer}", peer=self._peer()
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        _cancel(self._abort_later)
        self._abort_later = None
        _cancel(self._head_due)
        self._head_due = None
        _cancel(self._rate_check)
        self._rate_check = None
        self.site.connection_lost()
        super().connectionLost(reason)

    def _peer(self) -> str:
        return getattr(self.getPeer(), "host", None) or "unix"


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()
