"""How the forwarder reaches each upstream: one ``IAgent`` per upstream type.

``openai`` upstreams are plain HTTP over the shared connection pool, by
their way out (direct, or their proxy: ``oaproxy.outbound``); ``echo``
answers in the process (``oaproxy.echo``), with no way out at all;
``replicate`` translates chat completions to Replicate's predictions
(``oaproxy.replicate``) over the agent for its way out, polls included.
The forwarder's attempt logic (deadlines, failover, the stream relay) is
the same for all: each is an ``IAgent``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from twisted.web.iweb import IAgent

from oaproxy.config import Upstream, UpstreamType
from oaproxy.credentials import Words
from oaproxy.echo import EchoAgent
from oaproxy.outbound import AgentFor
from oaproxy.replicate import ReplicateAgent


@frozen
class UpstreamClient:
    """The agents of one upstream."""

    agent: IAgent
    # For the one retry after a stale pooled connection: a new connection.
    fresh_agent: IAgent


class UpstreamClients:
    """Each upstream's ``UpstreamClient``, made once per config."""

    def __init__(
        self,
        upstreams: tuple[Upstream, ...],
        agents: AgentFor,
        fresh_agents: AgentFor,
        *,
        clock: Any,
        wall_clock: Callable[[], float],
        max_event_bytes: int,
        words: Words,
    ) -> None:
        echo = EchoAgent(wall_clock)
        clients: dict[str, UpstreamClient] = {}
        for upstream in upstreams:
            if upstream.type is UpstreamType.ECHO:
                # Answered here: it has no connection that could be stale.
                clients[upstream.name] = UpstreamClient(echo, echo)
                continue
            agent, fresh_agent = agents(upstream.proxy), fresh_agents(upstream.proxy)
            if upstream.type is UpstreamType.REPLICATE:
                agent, fresh_agent = (
                    ReplicateAgent(
                        upstream,
                        http,
                        clock,
                        wall_clock,
                        max_event_bytes=max_event_bytes,
                        words=words,
                    )
                    for http in (agent, fresh_agent)
                )
            clients[upstream.name] = UpstreamClient(agent, fresh_agent)
        self._clients: Mapping[str, UpstreamClient] = clients

    def __call__(self, upstream: Upstream) -> UpstreamClient:
        # Each config's forwarder has its own clients, for its own upstreams.
        return self._clients[upstream.name]
