"""A lean HTTP/1.1 client for upstreams: llhttp (``httptools``) parsing over a
keep-alive pool of our own, behind Twisted's ``IAgent`` interface.

- ``UpstreamPool(reactor, endpoints)``: connections per route (proxy,
  scheme, host, port), made through an ``IAgentEndpointFactory`` (TLS is the
  endpoints'; ``IProxyEndpointFactory`` for routes through a proxy), kept
  alive, bounded, closed when idle; ``closeCachedConnections()``.
- ``UpstreamAgent(pool, proxy=None, fresh=False)``: ``request(method, uri,
  headers, bodyProducer)`` fires with an ``UpstreamResponse`` (``code``,
  ``phrase``, ``headers``, ``length``, ``deliverBody``), as Twisted's
  ``Agent`` does.
- ``HTTPProxy``: an outbound proxy; ``ProxyEndpoint`` and ``TunnelEndpoint``
  (``CONNECT``) make the connections through it, failing with a
  ``ProxyError`` (``ProxyUnreachable``, ``ProxyRefused``).
- ``retry_on_new_connection(error)``: whether a failure came from a reused
  pooled connection that ended before any byte of a response.
"""

from oaproxy.upstreamclient.agent import UpstreamAgent
from oaproxy.upstreamclient.errors import (
    IncompleteBody,
    NoResponse,
    ProxyError,
    ProxyRefused,
    ProxyUnreachable,
    ResponseHeadTooLarge,
    UnexpectedStatus,
    retry_on_new_connection,
)
from oaproxy.upstreamclient.pool import (
    IDLE_TIMEOUT,
    MAX_IDLE_PER_ROUTE,
    IProxyEndpointFactory,
    Route,
    UpstreamPool,
)
from oaproxy.upstreamclient.protocol import MAX_HEAD_BYTES, UpstreamConnection
from oaproxy.upstreamclient.proxy import HTTPProxy
from oaproxy.upstreamclient.response import UpstreamResponse
from oaproxy.upstreamclient.tunnel import ProxyEndpoint, TunnelEndpoint

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_HEAD_BYTES",
    "MAX_IDLE_PER_ROUTE",
    "HTTPProxy",
    "IProxyEndpointFactory",
    "IncompleteBody",
    "NoResponse",
    "ProxyEndpoint",
    "ProxyError",
    "ProxyRefused",
    "ProxyUnreachable",
    "ResponseHeadTooLarge",
    "Route",
    "TunnelEndpoint",
    "UnexpectedStatus",
    "UpstreamAgent",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamResponse",
    "retry_on_new_connection",
]
