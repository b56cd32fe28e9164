"""Keep-alive connections to upstreams, per route, bounded, closed when idle.

A ``Route`` is where the requests for one origin (scheme, host, port) go,
directly or through one outbound proxy: the ``Host`` header they carry, how
their request target is written, the endpoint that makes their connections,
and the connections idle between requests. Routes are kept per (proxy,
origin), so a connection made through one proxy never serves a request meant
for another way out:

- direct: the endpoint connects to the origin (TLS for https);
- an http origin through a proxy: the endpoint connects to the proxy, the
  target is absolute (``b"http://host:port"`` before the path) and each
  request carries ``Proxy-Authorization`` when the proxy has credentials;
- an https origin through a proxy: the endpoint opens a ``CONNECT`` tunnel
  (credentials on the ``CONNECT``) and TLS to the origin inside it; requests
  are written as for a direct route, and never carry the proxy's
  credentials, which are not the origin's business.

Connections, requests and responses are the same on every route.

Idle connections are kept last-in first-out, so under a steady load the
same few stay warm and the surplus ages out; each route has one timer, for
its oldest idle connection, instead of one per connection.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import Interface

from oaproxy.upstreamclient.protocol import UpstreamConnection
from oaproxy.upstreamclient.proxy import HTTPProxy

#: Idle connections kept per route (Twisted's ``maxPersistentPerHost``).
MAX_IDLE_PER_ROUTE = 64
#: Below the idle timeout of common upstreams and load balancers (60 s), so a
#: connection is dropped by us before the far end drops it under a request.
IDLE_TIMEOUT = 50.0
# Origins are few (the configured upstreams); a caller inventing them cannot
# grow the cache forever.
_MAX_ORIGINS = 1024


class IProxyEndpointFactory(Interface):
    """Endpoints for routes through an outbound proxy (``ReusedEndpoints``
    makes them); the pool's endpoint factory provides this too when any
    route goes through a proxy."""

    def endpointThroughProxy(proxy: HTTPProxy, uri: URI) -> IStreamClientEndpoint:
        """Connections that reach ``uri``'s origin through ``proxy``: to the
        proxy itself for http, a ``CONNECT`` tunnel with TLS inside for https."""


class Route:
    """Where the requests for one origin go, and its idle connections."""

    __slots__ = (
        "endpoint",
        "expiry",
        "factory",
        "host",
        "idle",
        "key",
        "proxy",
        "proxy_authorization",
        "target_prefix",
    )

    def __init__(
        self,
        key: tuple[Any, ...],
        host: bytes,
        endpoint: IStreamClientEndpoint,
        factory: Factory,
        *,
        proxy: HTTPProxy | None = None,
        absolute: bool = False,
    ) -> None:
        self.key = key
        #: The ``Host`` header line, ready to be written.
        self.host = b"Host: " + host + b"\r\n"
        #: The proxy this route's connections go through, if any.
        self.proxy = proxy
        #: Put before the origin-form target (``/v1/...``) when requests go
        #: to the proxy in absolute form (``absolute``); else empty.
        self.target_prefix = b"http://" + host if absolute else b""
        #: The ``Proxy-Authorization`` line of those requests, if any.
        self.proxy_authorization = b""
        if absolute and proxy is not None and proxy.authorization is not None:
            self.proxy_authorization = b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
        self.endpoint = endpoint
        self.factory = factory
        self.idle: list[UpstreamConnection] = []
        self.expiry: IDelayedCall | None = None


class _ConnectionFactory(Factory):
    # One log line per upstream connection is noise in a proxy's journal.
    noisy = False

    def __init__(self, pool: UpstreamPool, route: Route | None = None) -> None:
        self._pool = pool
        self.route = route

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        assert self.route is not None
        return UpstreamConnection(self._pool, self.route)


class UpstreamPool:
    """Connections to upstreams, made through ``endpoints`` (an
    ``IAgentEndpointFactory`` such as ``oaproxy.outbound.ReusedEndpoints``,
    and an ``IProxyEndpointFactory`` for routes through a proxy: TLS and
    its verification are the endpoints' business) and kept alive
    between requests: up to ``max_idle_per_route`` idle ones per route, each
    closed after ``idle_timeout`` seconds idle on the ``reactor``'s clock.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: IAgentEndpointFactory,
        *,
        max_idle_per_route: int = MAX_IDLE_PER_ROUTE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.max_idle_per_route = max_idle_per_route
        self.idle_timeout = idle_timeout
        self._clock = reactor
        self._endpoints = endpoints
        self._routes: dict[tuple[Any, ...], Route] = {}
        self._origins: dict[tuple[HTTPProxy | None, bytes], Route] = {}

    # -- routes -----------------------------------------------------------------

    def route(self, origin: bytes, proxy: HTTPProxy | None = None) -> Route:
        """The route for ``origin`` (``b"https://host[:port]"``), directly or
        through ``proxy``."""
        route = self._origins.get((proxy, origin))
        if route is None:
            route = self._route_for(origin, proxy)
            if len(self._origins) < _MAX_ORIGINS:
                self._origins[proxy, origin] = route
        return route

    def _route_for(self, origin: bytes, proxy: HTTPProxy | None) -> Route:
        uri = URI.fromBytes(origin + b"/")
        if b"@" in uri.netloc:
            # Never echoed: user information is a password more often than not.
            raise ValueError("an upstream URL with user information is not supported")
        if uri.scheme not in (b"http", b"https") or not uri.host:
            raise ValueError("not an http or https URL")
        key = (proxy, uri.scheme, uri.host, uri.port)
        route = self._routes.get(key)
        if route is None:
            if proxy is None:
                endpoint = self._endpoints.endpointForURI(uri)
            else:
                endpoint = IProxyEndpointFactory(self._endpoints).endpointThroughProxy(proxy, uri)
            factory = _ConnectionFactory(self)
            host = _host_header(uri.scheme, uri.host, uri.port)
            # An http origin's requests go to the proxy itself, in absolute
            # form; an https origin's go through a tunnel, as if direct.
            absolute = proxy is not None and uri.scheme == b"http"
            route = Route(key, host, endpoint, factory, proxy=proxy, absolute=absolute)
            factory.route = route
            self._routes[key] = route
        return route

    # -- connections --------------------------------------------------------------

    def take(self, route: Route) -> UpstreamConnection | None:
        """An idle connection of ``route``, the most recently used, if any."""
        idle = route.idle
        return idle.pop() if idle else None

    def connect(self, route: Route) -> Deferred[UpstreamConnection]:
        """A new connection for ``route``."""
        return cast("Deferred[UpstreamConnection]", route.endpoint.connect(route.factory))

    def release(self, connection: UpstreamConnection) -> None:
        """``connection`` finished a response and may serve another."""
        route = connection.route
        idle = route.idle
        if len(idle) >= self.max_idle_per_route:
            connection.close_idle()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        if route.expiry is None:
            route.expiry = self._clock.callLater(self.idle_timeout, self._expire, route)

    def discard(self, connection: UpstreamConnection) -> None:
        """``connection`` is gone (closed, or useless): forget it."""
        try:
            connection.route.idle.remove(connection)
        except ValueError:
            pass

    def _expire(self, route: Route) -> None:
        route.expiry = None
        now = self._clock.seconds()
        idle = route.idle
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.pop(0).close_idle()
        if idle:
            wait = idle[0].idle_since + self.idle_timeout - now
            route.expiry = self._clock.callLater(wait, self._expire, route)

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; fires when all of them are closed.

        Connections serving a request are left to finish it (they are closed
        instead of pooled only if the pool is full).
        """
        closing: list[Deferred[None]] = []
        for route in self._routes.values():
            if route.expiry is not None:
                route.expiry.cancel()
                route.expiry = None
            idle, route.idle = route.idle, []
            closing.extend(connection.close_idle() for connection in idle)
        done: Deferred[Any] = gatherResults(closing)
        return done.addCallback(lambda _: None)


def _host_header(scheme: bytes, host: bytes, port: int) -> bytes:
    """The ``Host`` value Twisted's ``Agent`` sends for this origin."""
    if isIPv6Address(host.decode("ascii", "replace")):
        host = b"[" + host + b"]"
    if (scheme, port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, port)
