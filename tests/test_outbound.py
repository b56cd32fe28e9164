"""Outbound HTTP as a proxy needs it: TLS verified, redirects not followed,
one persistent pool sized for many requests to few hosts."""

from __future__ import annotations

import json
from typing import Any

from service_identity.exceptions import CertificateError
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers

from oaproxy.outbound import CACHED_CONNECTION_TIMEOUT, MAX_PERSISTENT_PER_HOST, ReusedEndpoints
from tests.live import EndToEndCase, chat, reactor
from tests.payloads import CLIENT_KEY, upstream


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
        self.assertTrue(pool.persistent)
        self.assertEqual(pool.maxPersistentPerHost, MAX_PERSISTENT_PER_HOST)
        self.assertEqual(pool.cachedConnectionTimeout, CACHED_CONNECTION_TIMEOUT)
        for _ in range(3):
            await self.sdk(proxy, chat)
        # Three requests, one after another, over one upstream connection.
        self.assertEqual(len(fake.requests), 3)
        self.assertEqual(len(fake.connections.open), 1)


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

    def test_other_schemes_refused(self) -> None:
        """A scheme other than http and https is refused."""
        endpoints = ReusedEndpoints(Clock())
        self.assertRaises(
            SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://x/v1")
        )
