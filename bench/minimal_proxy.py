"""The floor of the benchmark: a minimal twisted.web reverse proxy.

One upstream, a persistent pool, bodies relayed as they come, hop-by-hop
headers dropped, nothing else (no keys, routing, records, metrics). With
``--client agent`` it talks to the upstream through Twisted's ``Agent`` and
``HTTPConnectionPool``; with ``--client lean`` through oaproxy's
``upstreamclient``::

    python bench/minimal_proxy.py --upstream http://127.0.0.1:PORT [--client lean]

It prints ``listening 127.0.0.1:PORT`` once it accepts connections.
``bench/compare_clients.py`` runs both against ``bench/fake_upstream.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

reactor: Any = _reactor
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade"}
)
FORWARDED = (b"content-type", b"authorization", b"accept")


@implementer(IBodyProducer)
class Body:
    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


class Relay(Protocol):
    def __init__(self, request: server.Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.request.finished and not self.request._disconnected:
            self.request.finish()


class Proxy(resource.Resource):
    isLeaf = True

    def __init__(self, agent: Any, upstream: bytes) -> None:
        super().__init__()
        self.agent, self.upstream = agent, upstream

    def render(self, request: server.Request) -> Any:
        assert request.content is not None
        data = request.content.read()
        headers = Headers()
        for name in FORWARDED:
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        body = Body(data) if data else None
        d = self.agent.request(request.method, self.upstream + request.uri, headers, body)
        d.addCallbacks(self.respond, self.fail, callbackArgs=(request,), errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    def respond(self, response: Any, request: server.Request) -> None:
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                request.responseHeaders.setRawHeaders(name, values)
        response.deliverBody(Relay(request))

    def fail(self, failure: Failure, request: server.Request) -> None:
        if not request._disconnected:
            request.setResponseCode(502)
            request.finish()


def agent_for(client: str) -> Any:
    if client == "lean":
        from oaproxy.outbound import ReusedEndpoints
        from oaproxy.upstreamclient import UpstreamAgent, UpstreamPool

        return UpstreamAgent(UpstreamPool(reactor, ReusedEndpoints(reactor)))
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    return Agent(reactor, pool=pool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a minimal twisted.web reverse proxy")
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--client", choices=("agent", "lean"), default="agent")
    args = parser.parse_args(argv)
    site = server.Site(Proxy(agent_for(args.client), args.upstream.encode()))
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    print(f"listening 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
