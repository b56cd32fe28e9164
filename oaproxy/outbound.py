"""Outbound HTTP to the upstreams: one persistent pool, verified TLS, no
redirects followed, and one endpoint per upstream host.

Twisted's ``Agent`` builds a new ``HostnameEndpoint`` for every request (IDNA
encoding the host each time) and, for https, a new TLS client context with the
platform's trust roots loaded again; a proxy sends many requests to few hosts,
so endpoints are made once per (scheme, host, port) and reused.
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

# A proxy talks to few hosts over many concurrent requests.
MAX_PERSISTENT_PER_HOST = 64
# Below the idle timeout of common upstreams and load balancers (60 s), so a
# connection is dropped by us before the far end drops it under a request.
CACHED_CONNECTION_TIMEOUT = 50


class _QuietClientFactory(_HTTP11ClientFactory):
    # One log line per upstream connection is noise in a proxy's journal.
    noisy = False


class ProxyPool(HTTPConnectionPool):
    _factory = _QuietClientFactory
    # Whether the last getConnection() handed out a cached connection; the
    # forwarder reads it right after Agent.request(), which calls us at once.
    reused = False

    def getConnection(self, key: Any, endpoint: Any) -> Any:
        self.reused = bool(self._connections.get(key))
        return super().getConnection(key, endpoint)


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


def upstream_agent(reactor: Any, pool: HTTPConnectionPool) -> IAgent:
    """An agent for upstreams over ``pool``; it follows no redirects."""
    return Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor), pool=pool)


def upstream_pool(reactor: Any) -> ProxyPool:
    pool = ProxyPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    return pool
