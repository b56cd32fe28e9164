"""Outbound HTTP: one persistent pool for the upstreams, verified TLS, no
redirects followed, one endpoint per upstream host, and the outbound proxy.

Upstream requests and alert posts both go through ``oaproxy.upstreamclient``
(httptools parsing over a keep-alive pool of our own: about 100 µs less per
request than Twisted's ``Agent``), over pools of their own: the upstreams'
keeps connections alive, the alerts' (a post a minute at most) keeps none.
One client for both means one way through a proxy: absolute-form requests
for http, ``CONNECT`` and TLS inside the tunnel for https, the credentials
as ``Proxy-Authorization``. The agents are asked for per way out
(``AgentFor``: None for direct, or an ``HTTPProxy``), as the config says;
nothing here reads ``HTTP_PROXY``, ``HTTPS_PROXY`` or ``NO_PROXY`` (nor do
Twisted and treq).

Twisted's ``Agent`` builds a new ``HostnameEndpoint`` for every request (IDNA
encoding the host each time) and, for https, a new TLS client context with the
platform's trust roots loaded again; a proxy sends many requests to few hosts,
so endpoints are made once per (proxy, scheme, host, port) and reused. An
upstream (or proxy) named by an IP address is connected to with a plain TCP
endpoint: ``HostnameEndpoint`` would still resolve it in the thread pool and
race its connection attempts, about a fifth of the cost of a stream's
request when a thousand open at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from oaproxy.upstreamclient import (
    HTTPProxy,
    IProxyEndpointFactory,
    ProxyEndpoint,
    TunnelEndpoint,
    UpstreamAgent,
    UpstreamPool,
)

# A proxy talks to few hosts over many concurrent requests.
MAX_PERSISTENT_PER_HOST = 64
# Below the idle timeout of common upstreams and load balancers (60 s), so a
# connection is dropped by us before the far end drops it under a request.
CACHED_CONNECTION_TIMEOUT = 50

#: The agent for one way out: direct (None), or through an outbound proxy.
AgentFor: TypeAlias = Callable[[HTTPProxy | None], IAgent]


@implementer(IAgentEndpointFactory, IProxyEndpointFactory)
class ReusedEndpoints:
    """Endpoints for upstream URIs, made once per scheme, host and port (and
    proxy, for those through one)."""

    def __init__(self, reactor: Any, tls: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        # Verifies certificates against the platform's roots (service-identity).
        self._tls = tls if tls is not None else BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[Any, ...], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._make(uri)
        return endpoint

    def endpointThroughProxy(self, proxy: HTTPProxy, uri: URI) -> IStreamClientEndpoint:
        key = (proxy, uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._make_through(proxy, uri)
        return endpoint

    def _tcp(self, host: str, port: int) -> IStreamClientEndpoint:
        """Connections to ``host``: resolved (and raced over its addresses)
        only when it is a name."""
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port)
        return HostnameEndpoint(self._reactor, host, port)

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        plain = self._tcp(uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"http":
            return plain
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), plain)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")

    def _make_through(self, proxy: HTTPProxy, uri: URI) -> IStreamClientEndpoint:
        to_proxy = self._tcp(proxy.host, proxy.port)
        if uri.scheme == b"http":
            return ProxyEndpoint(to_proxy, proxy)
        if uri.scheme == b"https":
            # TLS with the origin inside the tunnel: its certificate is
            # verified for its host name, which SNI names too.
            tunnel = TunnelEndpoint(to_proxy, proxy, uri.host, uri.port)
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tunnel)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def upstream_pool(reactor: Any) -> UpstreamPool:
    """The one pool of upstream connections; ``closeCachedConnections`` at stop."""
    return UpstreamPool(
        reactor,
        ReusedEndpoints(reactor),
        max_idle_per_route=MAX_PERSISTENT_PER_HOST,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )


def upstream_agents(pool: UpstreamPool, *, fresh: bool = False) -> AgentFor:
    """The agents for upstreams over ``pool``, one per way out; they follow
    no redirects.

    With ``fresh`` every request gets a new connection: the one retry after a
    stale pooled connection.
    """

    def agent(proxy: HTTPProxy | None) -> IAgent:
        # As cheap to make as to look up: one is made per attempt.
        return UpstreamAgent(pool, proxy=proxy, fresh=fresh)

    return agent


def alert_agents(reactor: Any) -> AgentFor:
    """The agents for alert posts: TLS verified, no redirects, and no pooled
    connections to close (an alert every minute at most): each connection
    is closed after its answer."""
    pool = UpstreamPool(reactor, ReusedEndpoints(reactor), max_idle_per_route=0)

    def agent(proxy: HTTPProxy | None) -> IAgent:
        return UpstreamAgent(pool, proxy=proxy)

    return agent
