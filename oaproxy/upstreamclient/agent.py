"""The ``IAgent`` front: ``request(method, uri, headers, bodyProducer)``.

The request head is built here once, as bytes: request line, ``Host``, the
proxy's credentials when the request goes to a proxy in absolute form, the
caller's headers, then the body's framing (``Content-Length`` from the
producer's ``length``, chunked when it is ``UNKNOWN_LENGTH``). On a pooled
connection the request is written before ``request`` returns, with no
Deferred but the caller's.
"""

from __future__ import annotations

import re
from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from oaproxy.upstreamclient.errors import ProxyRefused
from oaproxy.upstreamclient.pool import Route, UpstreamPool
from oaproxy.upstreamclient.protocol import UpstreamConnection
from oaproxy.upstreamclient.proxy import HTTPProxy
from oaproxy.upstreamclient.response import UpstreamResponse

# RFC 9110 tokens for methods; targets of visible ASCII only (no spaces, no
# CR or LF: nothing that could end the request line early).
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]*\Z")
_KNOWN_METHODS = frozenset(
    {b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE"}
)
# Twisted's Agent sends Content-Length: 0 for these when there is no body.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# Framing is the client's: the caller's own values would contradict it.
# Proxy credentials are the route's: a caller's would go to the upstream.
_OURS = frozenset({b"Content-Length", b"Transfer-Encoding", b"Proxy-Authorization"})
# What a proxy answers an absolute-form request it will not pass on.
_PROXY_AUTHENTICATION_REQUIRED = 407


@implementer(IAgent)
class UpstreamAgent:
    """Requests over ``pool``, through ``proxy`` if given, else direct; with
    ``fresh`` each on a new connection (which joins the pool after its
    response, like any other).

    Redirects are not followed. Failures are Twisted's (see
    ``oaproxy.upstreamclient.errors``); cancelling the result before the
    response aborts the connection and fails it with ``CancelledError``.
    A 407 from a proxy fails the request with ``ProxyRefused``: it is the
    proxy's refusal, not an answer of the upstream.
    """

    def __init__(
        self, pool: UpstreamPool, *, proxy: HTTPProxy | None = None, fresh: bool = False
    ) -> None:
        self._pool = pool
        self._proxy = proxy
        self._fresh = fresh

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        try:
            route, target = self._split(uri)
            head = _head(method, target, route, headers, bodyProducer)
        except ValueError as e:
            return fail(Failure(e))
        pool = self._pool
        connection = None if self._fresh else pool.take(route)
        if connection is not None:
            d: Deferred[UpstreamResponse] = Deferred(connection.cancel)
            connection.send(d, head, bodyProducer, method == b"HEAD", True)
        else:
            d = _Connecting(pool, route, head, bodyProducer, method == b"HEAD").deferred
        if route.target_prefix:
            d.addCallback(_refused_by_proxy, route)
        return cast("Deferred[IResponse]", d)

    def _split(self, uri: bytes) -> tuple[Route, bytes]:
        """The route of ``uri`` and its origin-form target (``/path?query``)."""
        start = uri.find(b"://")
        if start < 0:
            raise ValueError("not an absolute URL")
        slash = uri.find(b"/", start + 3)
        if slash < 0:
            origin, target = uri, b"/"
        else:
            origin, target = uri[:slash], uri[slash:]
        if b"?" in origin or b"#" in origin:
            raise ValueError("a URL with a query or fragment but no path is not supported")
        fragment = target.find(b"#")
        if fragment >= 0:
            target = target[:fragment]
        return self._pool.route(origin, self._proxy), target


def _refused_by_proxy(response: UpstreamResponse, route: Route) -> UpstreamResponse:
    if response.code != _PROXY_AUTHENTICATION_REQUIRED:
        return response
    # Its body is the proxy's; the connection is not used again.
    response.stopProducing()
    assert route.proxy is not None
    raise ProxyRefused(route.proxy.url, "refused: 407 Proxy Authentication Required", 407)


def _head(
    method: bytes,
    target: bytes,
    route: Route,
    headers: Headers | None,
    producer: IBodyProducer | None,
) -> bytes:
    if method not in _KNOWN_METHODS and not _METHOD.match(method):
        raise ValueError("invalid HTTP method")
    if not _TARGET.match(target):
        raise ValueError("invalid request target")
    if route.target_prefix:
        target = route.target_prefix + target
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    host: bytes | None = route.host
    if route.proxy_authorization:
        parts.append(route.proxy_authorization)
    if headers is not None:
        # Twisted's Headers hold valid names and values without CR or LF.
        for name, values in headers.getAllRawHeaders():
            if name in _OURS:
                continue
            if name == b"Host":
                host = None  # the caller's own, as Twisted's Agent keeps it
            for value in values:
                parts.append(name + b": " + value + b"\r\n")
    if host is not None:
        parts.insert(4, host)
    if producer is None:
        if method in _BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n")
    elif producer.length is UNKNOWN_LENGTH:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        parts.append(b"Content-Length: %d\r\n" % producer.length)
    parts.append(b"\r\n")
    return b"".join(parts)


class _Connecting:
    """A request waiting for a new connection."""

    __slots__ = (
        "_cancelled",
        "_connecting",
        "_connection",
        "_head",
        "_head_request",
        "_pool",
        "_producer",
        "deferred",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        route: Route,
        head: bytes,
        producer: IBodyProducer | None,
        head_request: bool,
    ) -> None:
        self.deferred: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self._pool = pool
        self._head = head
        self._producer = producer
        self._head_request = head_request
        self._cancelled = False
        self._connection: UpstreamConnection | None = None
        self._connecting: Deferred[UpstreamConnection] | None = None
        connecting = pool.connect(route)
        if not connecting.called:
            self._connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        if self._cancelled:
            # Cancelled as the connection was made: it is new and unused.
            self._pool.release(connection)
            return
        self._connection = connection
        connection.send(self.deferred, self._head, self._producer, self._head_request, False)
        self._head = b""
        self._producer = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._cancelled:
            self.deferred.errback(failure)

    def _cancel(self, d: Deferred[Any]) -> None:
        if self._connection is not None:
            self._connection.cancel(d)
            return
        self._cancelled = True
        if self._connecting is not None:
            self._connecting.cancel()
