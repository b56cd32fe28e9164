"""How the forwarder reaches each upstream: one ``IAgent`` per upstream type.

``openai`` upstreams are plain HTTP through the shared connection pool;
``echo`` answers in the process (``oaproxy.echo``); ``replicate`` translates
chat completions to Replicate's predictions (``oaproxy.replicate``) over
the same pool. The forwarder's attempt logic (deadlines, failover, the
stream relay) is the same for all: each is an ``IAgent``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from twisted.web.iweb import IAgent

from oaproxy.config import Upstream, UpstreamType
from oaproxy.echo import EchoAgent
from oaproxy.replicate import ReplicateAgent


@frozen
class UpstreamClient:
    """The agents of one upstream."""

    agent: IAgent
    # For the one retry after a stale pooled connection: a new connection.
    fresh_agent: IAgent
    # Says, right after agent.request(), whether it used a pooled connection.
    pooled: Callable[[], bool]


def _never_pooled() -> bool:
    return False


class UpstreamClients:
    """Each upstream's ``UpstreamClient``, made once per config."""

    def __init__(
        self,
        upstreams: tuple[Upstream, ...],
        http: UpstreamClient,
        *,
        clock: Any,
        wall_clock: Callable[[], float],
    ) -> None:
        echo = EchoAgent(wall_clock)
        clients: dict[str, UpstreamClient] = {}
        for upstream in upstreams:
            if upstream.type is UpstreamType.ECHO:
                clients[upstream.name] = UpstreamClient(echo, echo, _never_pooled)
            elif upstream.type is UpstreamType.REPLICATE:
                clients[upstream.name] = UpstreamClient(
                    ReplicateAgent(upstream, http.agent, clock, wall_clock),
                    ReplicateAgent(upstream, http.fresh_agent, clock, wall_clock),
                    http.pooled,
                )
            else:
                clients[upstream.name] = http
        self._clients: Mapping[str, UpstreamClient] = clients

    def __call__(self, upstream: Upstream) -> UpstreamClient:
        # Each config's forwarder has its own clients, for its own upstreams.
        return self._clients[upstream.name]
