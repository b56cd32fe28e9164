"""The lean upstream client on real sockets (127.0.0.1:0): keep-alive, a
lying upstream, a stale pooled connection, TLS with an explicit trust root."""

from __future__ import annotations

import datetime
import io
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from oaproxy.outbound import ReusedEndpoints
from oaproxy.relay import BytesProducer
from oaproxy.upstreamclient import (
    NoResponse,
    UpstreamAgent,
    UpstreamPool,
    retry_on_new_connection,
)

reactor: Any = _reactor


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


async def read(response: Any) -> bytes:
    body = _Body()
    response.deliverBody(body)
    return await body.done


class _Echo(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        return b"%s %s %d" % (request.method, request.uri, len(body))


class _Scripted(Protocol):
    """Answers each request head it reads with the next scripted bytes."""

    def __init__(self, server: ScriptedUpstream) -> None:
        self.server = server
        self.buffer = b""

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.server.requests.append(head)
            answer, close = self.server.script.pop(0)
            assert self.transport is not None
            self.transport.write(answer)
            if close:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.lost += 1


class ScriptedUpstream(Factory):
    def __init__(self, *script: tuple[bytes, bool]) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.connections: list[_Scripted] = []
        self.lost = 0

    def buildProtocol(self, addr: Any) -> _Scripted:
        return _Scripted(self)


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class LiveCase(TestCase):
    def listen(self, factory: Any) -> bytes:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return b"http://127.0.0.1:%d" % port.getHost().port

    def client(self, **endpoints: Any) -> tuple[UpstreamPool, UpstreamAgent]:
        pool = UpstreamPool(reactor, ReusedEndpoints(reactor, **endpoints))
        self.addCleanup(pool.closeCachedConnections)
        return pool, UpstreamAgent(pool)

    def close_server_side(self, upstream: ScriptedUpstream) -> None:
        for protocol in upstream.connections:
            if protocol.transport is not None:
                protocol.transport.loseConnection()


class KeepAliveTests(LiveCase):
    async def test_requests_share_one_connection_with_bodies_from_memory_and_file(self) -> None:
        """Three requests (bytes, spool file, none) go over one kept-alive connection."""
        site = server.Site(_Echo())
        origin = self.listen(site)
        pool, agent = self.client()
        cooperator = Cooperator()
        self.addCleanup(cooperator.stop)
        spooled = FileBodyProducer(io.BytesIO(b"y" * 300_000), cooperator)
        answers = []
        for body in (BytesProducer(b"x" * 1000), spooled, None):
            response = await agent.request(b"POST", origin + b"/v1/echo?q=1", Headers(), body)
            answers.append(await read(response))
        self.assertEqual(
            answers,
            [b"POST /v1/echo?q=1 1000", b"POST /v1/echo?q=1 300000", b"POST /v1/echo?q=1 0"],
        )
        self.assertEqual(len(pool.route(origin).idle), 1)


class LyingUpstreamTests(LiveCase):
    async def check_next_request_is_safe(self, lie: bytes) -> None:
        upstream = ScriptedUpstream((lie, False), (_ok(b"next"), False))
        origin = self.listen(upstream)
        _, agent = self.client()
        # The next request goes out the moment the first body ends, as in a
        # busy proxy: on the same connection, were it pooled.
        following: list[Deferred[Any]] = []

        class Next(_Body):
            def connectionLost(self, reason: Failure = connectionDone) -> None:
                following.append(agent.request(b"GET", origin + b"/second"))
                super().connectionLost(reason)

        first = Next()
        (await agent.request(b"GET", origin + b"/first")).deliverBody(first)
        self.assertEqual(await first.done, b"ok")
        self.assertEqual(await read(await following[0]), b"next")
        self.assertEqual(len(upstream.connections), 2)
        self.close_server_side(upstream)

    async def test_bytes_past_content_length_never_reach_the_next_request(self) -> None:
        """An upstream sending more than its Content-Length: its connection is closed."""
        await self.check_next_request_is_safe(_ok(b"ok") + b"HTTP/1.1 200 OK\r\n")

    async def test_second_response_never_reaches_the_next_request(self) -> None:
        """A second response, its head where the first socket read ends (Twisted's
        Agent dropped the rest of that read, pooled the connection and gave the
        next request the second response: 3 of 3 runs)."""
        ok = _ok(b"ok")
        await self.check_next_request_is_safe(ok + b" " * (65536 - len(ok)) + _ok(b"SECRET"))


class StaleConnectionTests(LiveCase):
    async def test_pooled_connection_closed_by_the_upstream_fails_as_stale(self) -> None:
        """A request on a pooled connection the upstream just closed: NoResponse(reused),
        and once more on a fresh connection it succeeds."""
        upstream = ScriptedUpstream((_ok(b"ok"), True), (_ok(b"fresh"), False))
        origin = self.listen(upstream)
        pool, agent = self.client()
        response = await agent.request(b"GET", origin + b"/a")
        # Asked again the moment the body ends: before the reactor saw the close.
        stale: list[Deferred[Any]] = []

        class Again(_Body):
            def connectionLost(self, reason: Failure = connectionDone) -> None:
                stale.append(agent.request(b"GET", origin + b"/b"))
                super().connectionLost(reason)

        body = Again()
        response.deliverBody(body)
        await body.done
        try:
            await stale[0]
        except NoResponse as e:
            self.assertTrue(e.reused)
            self.assertTrue(retry_on_new_connection(e))
        else:
            self.fail("the stale connection answered")
        fresh = UpstreamAgent(pool, fresh=True)
        self.assertEqual(await read(await fresh.request(b"GET", origin + b"/b")), b"fresh")
        self.close_server_side(upstream)


def _self_signed_localhost() -> tuple[bytes, bytes]:
    """A certificate for localhost (with the subjectAltName service_identity needs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@implementer(IOpenSSLTrustRoot)
class _TrustFile:
    """Trusts the certificates of one PEM file.

    Loaded from files, the certificate and key never pass through pyOpenSSL
    objects, which pyOpenSSL now deprecates (and ``-W error`` would fail on).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _addCACertsToContext(self, context: Any) -> None:
        context.load_verify_locations(self.path)


class TLSTests(LiveCase):
    def listen_tls(self) -> tuple[bytes, str]:
        """An https server for localhost; its origin and its certificate's PEM file."""
        cert_pem, key_pem = _self_signed_localhost()
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(key_pem)
        contexts = ssl.DefaultOpenSSLContextFactory(
            str(directory / "key.pem"), str(directory / "cert.pem")
        )
        port = reactor.listenSSL(0, server.Site(_Echo()), contexts, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return b"https://localhost:%d" % port.getHost().port, str(directory / "cert.pem")

    async def test_tls_verified_against_an_explicit_trust_root(self) -> None:
        """TLS through ReusedEndpoints: trusted by the given root, kept alive."""
        origin, certificate = self.listen_tls()
        pool, agent = self.client(tls=BrowserLikePolicyForHTTPS(trustRoot=_TrustFile(certificate)))
        for _ in range(2):
            response = await agent.request(b"POST", origin + b"/v1/x", None, BytesProducer(b"abc"))
            self.assertEqual(await read(response), b"POST /v1/x 3")
        self.assertEqual(len(pool.route(origin).idle), 1)

    async def test_tls_untrusted_certificate_refused(self) -> None:
        """The same server with the platform's roots is refused before any request."""
        origin, _ = self.listen_tls()
        pool, agent = self.client()
        try:
            await agent.request(b"GET", origin + b"/v1/x")
        except NoResponse as e:
            self.assertFalse(e.reused)
            self.assertTrue(type(e.reasons[0].value).__module__.startswith("OpenSSL"))
        else:
            self.fail("an untrusted certificate was accepted")
        self.assertEqual(len(pool.route(origin).idle), 0)
        self.flushLoggedErrors()


class ShutdownTests(LiveCase):
    async def test_close_cached_connections_closes_them(self) -> None:
        """closeCachedConnections fires once the upstream saw its connections closed."""
        upstream = ScriptedUpstream((_ok(b"ok"), False), (_ok(b"ok"), False))
        origin = self.listen(upstream)
        pool, agent = self.client()
        both = [agent.request(b"GET", origin + b"/%d" % i) for i in range(2)]
        for d in both:
            await read(await d)
        self.assertEqual(len(pool.route(origin).idle), 2)
        await pool.closeCachedConnections()
        self.assertEqual(len(pool.route(origin).idle), 0)
        await _turns(3)
        self.assertEqual(upstream.lost, 2)


def _turns(count: int) -> Deferred[None]:
    """A few reactor turns (no wall-clock wait)."""
    d: Deferred[None] = Deferred()

    def turn(left: int) -> None:
        if left:
            reactor.callLater(0, turn, left - 1)
        else:
            d.callback(None)

    turn(count)
    return d
