"""A lean HTTP/1.1 client for upstreams: llhttp (``httptools``) parsing over a
keep-alive pool of our own, behind Twisted's ``IAgent`` interface.

- ``UpstreamPool(reactor, endpoints)``: connections per route (scheme, host,
  port), made through an ``IAgentEndpointFactory`` (TLS is the endpoints'),
  kept alive, bounded, closed when idle; ``closeCachedConnections()``.
- ``UpstreamAgent(pool, fresh=False)``: ``request(method, uri, headers,
  bodyProducer)`` fires with an ``UpstreamResponse`` (``code``, ``phrase``,
  ``headers``, ``length``, ``deliverBody``), as Twisted's ``Agent`` does.
- ``retry_on_new_connection(error)``: whether a failure came from a reused
  pooled connection that ended before any byte of a response.
"""

from oaproxy.upstreamclient.agent import UpstreamAgent
from oaproxy.upstreamclient.errors import (
    IncompleteBody,
    NoResponse,
    ResponseHeadTooLarge,
    UnexpectedStatus,
    retry_on_new_connection,
)
from oaproxy.upstreamclient.pool import IDLE_TIMEOUT, MAX_IDLE_PER_ROUTE, Route, UpstreamPool
from oaproxy.upstreamclient.protocol import MAX_HEAD_BYTES, UpstreamConnection, UpstreamResponse

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_HEAD_BYTES",
    "MAX_IDLE_PER_ROUTE",
    "IncompleteBody",
    "NoResponse",
    "ResponseHeadTooLarge",
    "Route",
    "UnexpectedStatus",
    "UpstreamAgent",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamResponse",
    "retry_on_new_connection",
]
