"""The upstream client's own cost per request, in memory: Twisted's Agent
versus oaproxy's upstream client.

    python bench/client_micro.py [--requests 20000]

One pooled connection on a ``StringTransport``: per request the client
writes a POST with a 300 B body and the headers the forwarder sends, is fed a
whole response (a 591 B JSON answer, or an SSE stream of 21 chunks) and
delivers its body to a protocol that drops it. No sockets and no reactor, so
the figure (process CPU time per request) holds on a busy machine too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from oaproxy.upstreamclient import UpstreamAgent, UpstreamPool

URL = b"http://upstream.test/v1/chat/completions"


def json_answer() -> bytes:
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
        }
    ).encode()
    body = body.ljust(591)
    return (
        b"HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2026 00:00:00 GMT\r\n"
        b"content-type: application/json\r\nopenai-processing-ms: 120\r\n"
        b"x-request-id: req_abc\r\nserver: nginx\r\ncontent-length: %d\r\n\r\n" % len(body)
    ) + body


def sse_answer() -> bytes:
    events = [b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'] * 20 + [b"data: [DONE]\n\n"]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )


@implementer(IBodyProducer)
class Body:
    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


class Dropped(Protocol):
    def connectionLost(self, reason: Failure | None = None) -> None:
        pass


class _Endpoint:
    def __init__(self, memory: Memory) -> None:
        self._memory = memory

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        self._memory.transport = StringTransport()
        self._memory.protocol = protocol
        protocol.makeConnection(self._memory.transport)
        return succeed(protocol)


@implementer(IAgentEndpointFactory)
class Memory:
    """Connections on a ``StringTransport`` (the last one made is kept)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.protocol: Any = None

    def endpointForURI(self, uri: Any) -> Any:
        return _Endpoint(self)


def per_request(client: str, answer: bytes, requests: int) -> float:
    clock, memory = Clock(), Memory()
    agent: Any
    if client == "lean":
        agent = UpstreamAgent(UpstreamPool(clock, memory))
    else:
        agent = Agent.usingEndpointFactory(
            clock, memory, pool=HTTPConnectionPool(clock, persistent=True)
        )
    headers = Headers(
        {
            b"content-type": [b"application/json"],
            b"authorization": [b"Bearer sk-bench"],
            b"accept-encoding": [b"identity"],
            b"x-forwarded-for": [b"127.0.0.1"],
        }
    )
    payload = b'{"model": "gpt-bench", "messages": []}'.ljust(300)

    def one() -> None:
        d = agent.request(b"POST", URL, headers, Body(payload))
        memory.transport.clear()
        memory.protocol.dataReceived(answer)
        d.addCallback(lambda response: response.deliverBody(Dropped()))

    for _ in range(500):
        one()
    started = time.process_time()
    for _ in range(requests):
        one()
    return (time.process_time() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    for name, answer in (("591 B JSON", json_answer()), ("SSE, 21 chunks", sse_answer())):
        for round_ in range(1, args.rounds + 1):
            for client in ("agent", "lean"):
                us = per_request(client, answer, args.requests)
                print(f"round {round_}  {name:<15} {client:<6} {us:6.1f} µs/request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
