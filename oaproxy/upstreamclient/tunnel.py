"""Connections through an outbound HTTP proxy.

- ``ProxyEndpoint``: connections to the proxy itself, for http origins (their
  requests then name the origin in absolute form); a failure to connect
  names the proxy, so that an attempt's error says which hop failed.
- ``TunnelEndpoint``: a ``CONNECT host:port`` tunnel through the proxy, for
  https origins. Its connections are made once the proxy answered 2xx: the
  factory's protocol (TLS, when wrapped by ``wrapClientTLS``) then speaks to
  the origin through the proxy's connection, so the certificate verified is
  the origin's, for the origin's host name.

A proxy that refuses the tunnel, answers something that is not HTTP, or
hangs up fails the connection with a ``ProxyError``; one that never answers
is left to the caller's deadline, whose cancel aborts the connection.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from oaproxy.upstreamclient.errors import ProxyRefused, ProxyUnreachable
from oaproxy.upstreamclient.proxy import HTTPProxy

#: Status line and headers of the proxy's answer to ``CONNECT``.
MAX_ANSWER_HEAD_BYTES = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: |\r?\n|\Z)")


def _unreachable(failure: Failure, proxy: HTTPProxy) -> Failure:
    if failure.check(CancelledError):
        return failure
    error = failure.value
    # Twisted's connect errors name only the address and the OS's reason.
    reason = str(error).strip() or type(error).__name__
    return Failure(ProxyUnreachable(proxy.url, f"unreachable: {reason}"))


@implementer(IStreamClientEndpoint)
class ProxyEndpoint:
    """Connections to ``proxy``, made through ``endpoint`` (to its address)."""

    def __init__(self, endpoint: IStreamClientEndpoint, proxy: HTTPProxy) -> None:
        self._endpoint = endpoint
        self._proxy = proxy

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        connecting: Deferred[Any] = self._endpoint.connect(protocolFactory)
        return connecting.addErrback(_unreachable, self._proxy)


def _authority(host: bytes, port: int) -> bytes:
    """``host:port``, an IPv6 address in brackets."""
    return b"[%b]:%d" % (host, port) if b":" in host else b"%b:%d" % (host, port)


def _connect_request(proxy: HTTPProxy, authority: bytes) -> bytes:
    """The ``CONNECT`` request for ``authority`` (``host:port``)."""
    lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
    if proxy.authorization is not None:
        lines.append(b"Proxy-Authorization: " + proxy.authorization)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connections to ``host:port`` through a ``CONNECT`` tunnel of ``proxy``,
    whose own connections ``endpoint`` makes."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, proxy: HTTPProxy, host: bytes, port: int
    ) -> None:
        self._endpoint = endpoint
        self._proxy = proxy
        self._target = _authority(host, port)
        self._request = _connect_request(proxy, self._target)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        opening = _Opening(protocolFactory, self._proxy, self._target, self._request)
        connecting: Deferred[Any] = self._endpoint.connect(opening)
        opening.connecting = connecting
        connecting.addCallbacks(opening.connected, opening.fail)
        return opening.established


class _Opening(Factory):
    """One tunnel being opened: the factory of its connection to the proxy,
    and the Deferred that fires with the tunnelled protocol."""

    noisy = False

    def __init__(
        self, factory: IProtocolFactory, proxy: HTTPProxy, target: bytes, request: bytes
    ) -> None:
        self.factory = factory
        self.proxy = proxy
        self.target = target
        self.request = request
        self.established: Deferred[Any] = Deferred(self._cancel)
        self.connecting: Deferred[Any] | None = None
        self.tunnel: _Tunnel | None = None

    def buildProtocol(self, addr: Any) -> _Tunnel:
        self.tunnel = _Tunnel(self, addr)
        return self.tunnel

    def connected(self, tunnel: _Tunnel) -> None:
        """Connected to the proxy; the ``CONNECT`` is on its way."""
        self.connecting = None

    def opened(self, protocol: Any) -> None:
        if not self.established.called:
            self.established.callback(protocol)

    def fail(self, failure: Failure) -> None:
        self.connecting = None
        if not self.established.called:
            self.established.errback(_unreachable(failure, self.proxy))

    def _cancel(self, d: Deferred[Any]) -> None:
        # The caller's deadline passed (or it went away) before the tunnel
        # was open: the Deferred fails with CancelledError, and whatever
        # connection there is to the proxy goes.
        if self.connecting is not None:
            self.connecting.cancel()
        if self.tunnel is not None:
            self.tunnel.abort()


class _Tunnel(Protocol):
    """The connection to the proxy: sends ``CONNECT``, reads the answer's
    head, then passes every byte to and from the tunnelled protocol."""

    def __init__(self, opening: _Opening, addr: Any) -> None:
        self._opening = opening
        self._addr = addr
        self._head = b""
        self._inner: Any = None

    def connectionMade(self) -> None:
        if self._opening.established.called:
            self.abort()  # cancelled while the connection was being made
            return
        assert self.transport is not None
        self.transport.write(self._opening.request)

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._opening.established.called:
            return  # refused or cancelled: the connection is being aborted
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_ANSWER_HEAD_BYTES:
                self._refused(None, "answered CONNECT with a head too large")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        match = _STATUS_LINE.match(head)
        if match is None:
            self._refused(None, "answered CONNECT with something that is not HTTP")
            return
        status = int(match.group(1))
        if not 200 <= status < 300:
            # The phrase is ours: nothing the proxy wrote is quoted.
            phrase = RESPONSES.get(status, b"").decode("ascii")
            said = f"{status} {phrase}".rstrip()
            target = self._opening.target.decode("ascii", "replace")
            self._refused(status, f"refused CONNECT {target}: {said}")
            return
        inner = self._opening.factory.buildProtocol(self._addr)
        if inner is None:
            # As Twisted's endpoints say of a factory that builds nothing.
            self.abort()
            self._opening.established.errback(Failure(NoProtocol()))
            return
        self._inner = inner
        transport: Any = self.transport
        inner.makeConnection(transport)
        self._opening.opened(inner)
        if rest:
            # Nothing should come before our first bytes through the tunnel;
            # whatever did is the far end's, for the inner protocol to judge.
            inner.dataReceived(rest)

    def _refused(self, status: int | None, what: str) -> None:
        self.abort()
        opening = self._opening
        if not opening.established.called:
            opening.established.errback(Failure(ProxyRefused(opening.proxy.url, what, status)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
            return
        opening = self._opening
        if not opening.established.called:
            error = ProxyUnreachable(opening.proxy.url, "closed the connection before answering")
            opening.established.errback(Failure(error))
