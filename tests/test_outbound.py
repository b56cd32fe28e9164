"""Outbound HTTP as a proxy needs it: TLS verified, redirects not followed,
one persistent pool sized for many requests to few hosts."""

from __future__ import annotations

import json
import re
from typing import Any

from service_identity.exceptions import CertificateError
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers

from oaproxy.outbound import CACHED_CONNECTION_TIMEOUT, MAX_PERSISTENT_PER_HOST, ReusedEndpoints
from oaproxy.upstreamclient import HTTPProxy
from tests.doubles import Reply, parse_reply
from tests.live import EndToEndCase, chat, reactor
from tests.payloads import CLIENT_KEY, raw_chat_request, upstream


class _Redirect(resource.Resource):
    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location
        self.hits = 0

    def render(self, request: server.Request) -> bytes:
        self.hits += 1
        request.setResponseCode(302)
        request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": {"message": "moved", "type": "moved"}}).encode()


class OutboundTests(EndToEndCase):
    async def test_self_signed_tls_upstream_is_refused_and_failed_over(self) -> None:
        """An upstream whose certificate no CA vouches for is never used."""
        key = ssl.KeyPair.generate(size=2048)
        certificate = key.selfSignedCert(1, commonName="localhost")
        untrusted = _Redirect(b"/never")
        port = reactor.listenSSL(
            0, server.Site(untrusted), certificate.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        good = await self.fake()
        proxy = await self.proxy(
            [
                upstream("self-signed", f"https://localhost:{port.getHost().port}/v1"),
                upstream("good", good.endpoint),
            ]
        )
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        record = await proxy.records.nth(1)
        first, second = record["attempts"]
        self.assertEqual(first["upstream"], "self-signed")
        self.assertIsNone(first["status"])
        self.assertTrue(first["error"].startswith("connect error"), first["error"])
        self.assertEqual((second["upstream"], second["status"]), ("good", 200))
        # The handshake failed before any request was sent; Twisted logs why.
        self.assertEqual(untrusted.hits, 0)
        self.assertTrue(self.flushLoggedErrors(CertificateError))

    async def test_redirect_is_passed_on_not_followed(self) -> None:
        """An upstream's redirect is passed to the client as it came; the proxy never follows it."""
        target = await self.fake()
        redirect = _Redirect(target.endpoint.encode() + b"/chat/completions")
        port = reactor.listenTCP(0, server.Site(redirect), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = await self.proxy([upstream("moved", f"http://127.0.0.1:{port.getHost().port}/v1")])
        # Not the SDK: httpx would follow the redirect itself.
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        response = await client.post(
            proxy.base_url + "/chat/completions",
            json={"model": "m", "messages": []},
            headers=Headers({"Authorization": [f"Bearer {CLIENT_KEY}"]}),
            allow_redirects=False,
        )
        self.assertEqual(response.code, 302)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [target.endpoint.encode() + b"/chat/completions"],
        )
        await response.content()
        self.assertEqual(redirect.hits, 1)
        self.assertEqual(target.requests, [])

    async def test_one_persistent_pool(self) -> None:
        """The service has one persistent pool, tuned as oaproxy.outbound says,
        and three requests in a row reuse one upstream connection."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        pool: Any = proxy.service.pool
        self.assertEqual(pool.max_idle_per_route, MAX_PERSISTENT_PER_HOST)
        self.assertEqual(pool.idle_timeout, CACHED_CONNECTION_TIMEOUT)
        for _ in range(3):
            await self.sdk(proxy, chat)
        # Three requests, one after another, over one upstream connection.
        self.assertEqual(len(fake.requests), 3)
        self.assertEqual(len(fake.connections.open), 1)

    async def test_second_response_never_reaches_the_next_client(self) -> None:
        """An upstream answering one request twice: the next client gets its own answer.

        The second response starts where the proxy's first socket read ends,
        and the next client's request arrives as the first answer does (a
        busy proxy). Twisted's Agent dropped the rest of that read, pooled
        the connection and gave the next client the second response.
        """
        liar = _LiarUpstream()
        port = reactor.listenTCP(0, liar, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(liar.close_all)
        proxy = await self.proxy([upstream("liar", f"http://127.0.0.1:{port.getHost().port}/v1")])
        first, second = _ReplyClient(), _ReplyClient()
        for client in (first, second):
            await _connect(proxy.port, client)
        first.send(raw_chat_request({"model": "m", "messages": []}, CLIENT_KEY))
        held = await liar.held
        answer = _ok(b'{"id": "first"}')
        secret = _ok(b'{"id": "SECRET"}')
        held.write(answer + b" " * (65536 - len(answer)) + secret)
        second.send(raw_chat_request({"model": "m", "messages": []}, CLIENT_KEY))
        self.assertEqual((await first.reply).json(), {"id": "first"})
        self.assertEqual((await second.reply).json(), {"id": "next"})
        self.assertNotIn(b"SECRET", second.received)


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class _Liar(Protocol):
    def __init__(self, upstream: _LiarUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""

    def connectionMade(self) -> None:
        self.upstream.open.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not sep or len(rest) < (int(length.group(1)) if length else 0):
            return
        self.buffer = b""
        transport: Any = self.transport
        if not self.upstream.held.called:
            # The first request waits for the test; the others are answered.
            self.upstream.held.callback(transport)
        else:
            transport.write(_ok(b'{"id": "next"}'))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.upstream.open.remove(self)


class _LiarUpstream(Factory):
    def __init__(self) -> None:
        self.held: Deferred[Any] = Deferred()
        self.open: list[_Liar] = []

    def buildProtocol(self, addr: Any) -> _Liar:
        return _Liar(self)

    def close_all(self) -> None:
        for protocol in list(self.open):
            transport: Any = protocol.transport
            transport.abortConnection()


class _ReplyClient(Protocol):
    """A raw client connection to the proxy; ``reply`` fires with one whole reply."""

    def __init__(self) -> None:
        self.received = b""
        self.reply: Deferred[Reply] = Deferred()

    def send(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.reply.called:
            reply = parse_reply(self.received)
            if reply.complete:
                self.reply.callback(reply)
                transport: Any = self.transport
                transport.loseConnection()


async def _connect(port: int, protocol: Protocol) -> None:
    connected: Deferred[None] = Deferred()

    class _Once(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            reactor.callLater(0, connected.callback, None)
            return protocol

    reactor.connectTCP("127.0.0.1", port, _Once())
    await connected


class ReusedEndpointsTests(SynchronousTestCase):
    def test_one_endpoint_per_scheme_host_and_port(self) -> None:
        """Requests to one scheme, host and port share one endpoint; https
        endpoints are wrapped in TLS."""
        endpoints = ReusedEndpoints(Clock())
        a = endpoints.endpointForURI(URI.fromBytes(b"https://api.example/v1/chat/completions"))
        b = endpoints.endpointForURI(URI.fromBytes(b"https://api.example/v1/embeddings?x=1"))
        c = endpoints.endpointForURI(URI.fromBytes(b"http://api.example/v1/embeddings"))
        d = endpoints.endpointForURI(URI.fromBytes(b"https://api.example:8443/v1/models"))
        self.assertIs(a, b)
        self.assertEqual(len({id(a), id(c), id(d)}), 3)
        self.assertIsInstance(c, HostnameEndpoint)
        self.assertNotIsInstance(a, HostnameEndpoint)  # wrapped in TLS

    def test_ip_literals_connect_without_resolving(self) -> None:
        """An upstream or proxy named by an IPv4 or IPv6 address is connected
        to at once, with no name resolution (a host name still is resolved)."""
        memory = MemoryReactorClock()
        endpoints = ReusedEndpoints(memory)
        for url in (b"http://127.0.0.1:8080/v1", b"https://[::1]:8443/v1"):
            endpoints.endpointForURI(URI.fromBytes(url)).connect(Factory.forProtocol(Protocol))
        proxy = HTTPProxy("10.0.0.9", 3128)
        endpoints.endpointThroughProxy(proxy, URI.fromBytes(b"http://api.example/v1")).connect(
            Factory.forProtocol(Protocol)
        )
        self.assertEqual(
            [(host, port) for host, port, *_ in memory.tcpClients],
            [("127.0.0.1", 8080), ("::1", 8443), ("10.0.0.9", 3128)],
        )
        self.assertIsInstance(
            endpoints.endpointForURI(URI.fromBytes(b"http://api.example:80/v1")), HostnameEndpoint
        )

    def test_other_schemes_refused(self) -> None:
        """A scheme other than http and https is refused."""
        endpoints = ReusedEndpoints(Clock())
        self.assertRaises(
            SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://x/v1")
        )
