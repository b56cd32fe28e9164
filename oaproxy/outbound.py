"""Outbound HTTP: one persistent pool for the upstreams, verified TLS, no
redirects followed, and one endpoint per upstream host.

Upstream requests go through ``oaproxy.upstreamclient`` (httptools parsing
over a keep-alive pool of our own: about 100 µs less per request than
Twisted's ``Agent``); alert posts, few and far between, through Twisted's
``Agent`` and treq.

Twisted's ``Agent`` builds a new ``HostnameEndpoint`` for every request (IDNA
encoding the host each time) and, for https, a new TLS client context with the
platform's trust roots loaded again; a proxy sends many requests to few hosts,
so endpoints are made once per (scheme, host, port) and reused, by both.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from oaproxy.upstreamclient import UpstreamAgent, UpstreamPool

# A proxy talks to few hosts over many concurrent requests.
MAX_PERSISTENT_PER_HOST = 64
# Below the idle timeout of common upstreams and load balancers (60 s), so a
# connection is dropped by us before the far end drops it under a request.
CACHED_CONNECTION_TIMEOUT = 50


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """Endpoints for upstream URIs, made once per scheme, host and port."""

    def __init__(self, reactor: Any, tls: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        # Verifies certificates against the platform's roots (service-identity).
        self._tls = tls if tls is not None else BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._make(uri)
        return endpoint

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        plain = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"http":
            return plain
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), plain)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def upstream_pool(reactor: Any) -> UpstreamPool:
    """The one pool of upstream connections; ``closeCachedConnections`` at stop."""
    return UpstreamPool(
        reactor,
        ReusedEndpoints(reactor),
        max_idle_per_route=MAX_PERSISTENT_PER_HOST,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )


def upstream_agent(pool: UpstreamPool, *, fresh: bool = False) -> IAgent:
    """An agent for upstreams over ``pool``; it follows no redirects.

    With ``fresh`` every request gets a new connection: the one retry after a
    stale pooled connection.
    """
    return UpstreamAgent(pool, fresh=fresh)


class _QuietClientFactory(_HTTP11ClientFactory):
    # One log line per connection is noise in a proxy's journal.
    noisy = False


class _AlertPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def alert_agent(reactor: Any) -> IAgent:
    """A Twisted ``Agent`` for alert posts: TLS verified, no redirects, and no
    pooled connections to close (an alert every minute at most)."""
    pool = _AlertPool(reactor, persistent=False)
    return Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor), pool=pool)
