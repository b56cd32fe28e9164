"""The lean upstream client (oaproxy.upstreamclient), in memory.

A conformance table of upstream wire behaviours, each row fed split at
hypothesis-chosen byte boundaries (and one byte at a time); then the request
head, backpressure, cancellation and the pool's idle connections on a Clock.
The real-socket tests are in test_upstreamclient_live.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from itertools import pairwise
from typing import Any, cast

from attrs import field, frozen
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ExcessWrite
from twisted.web.client import (
    URI,
    FileBodyProducer,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from oaproxy.relay import BytesProducer
from oaproxy.upstreamclient import (
    MAX_HEAD_BYTES,
    IncompleteBody,
    NoResponse,
    ResponseHeadTooLarge,
    UnexpectedStatus,
    UpstreamAgent,
    UpstreamConnection,
    UpstreamPool,
    UpstreamResponse,
    retry_on_new_connection,
)

ORIGIN = b"http://upstream.test"
URL = ORIGIN + b"/v1/chat/completions"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"


# ---------------------------------------------------------------------------
# An upstream in memory


@frozen
class Link:
    """One connection the client made: its protocol and the transport under it."""

    protocol: UpstreamConnection
    transport: StringTransport

    def feed(self, data: bytes, cuts: frozenset[int] = frozenset()) -> None:
        points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
        for a, b in pairwise(points):
            self.protocol.dataReceived(data[a:b])

    def close(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, upstream: MemoryUpstream) -> None:
        self._upstream = upstream

    def connect(self, factory: Any) -> Deferred[Any]:
        if self._upstream.hold:
            d: Deferred[Any] = Deferred(lambda d: self._upstream.cancelled.append(d))
            self._upstream.pending.append((factory, d))
            return d
        return succeed(self._upstream.accept(factory))


@implementer(IAgentEndpointFactory)
class MemoryUpstream:
    """Endpoints whose connections are ``StringTransport``s, made at once
    (or, with ``hold``, when the test says)."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.uris: list[URI] = []
        self.hold = False
        self.pending: list[tuple[Any, Deferred[Any]]] = []
        self.cancelled: list[Deferred[Any]] = []

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        self.uris.append(uri)
        return _Endpoint(self)

    def accept(self, factory: Any) -> UpstreamConnection:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.links.append(Link(protocol, transport))
        return cast(UpstreamConnection, protocol)

    @property
    def last(self) -> Link:
        return self.links[-1]


class Body(Protocol):
    """Records a response body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.chunks = 0
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert self.reason is None, "connectionLost twice"
        self.reason = reason


class Client:
    """A pool and its agents over a ``MemoryUpstream``, on a ``Clock``."""

    def __init__(self, **pool: Any) -> None:
        self.clock = Clock()
        self.upstream = MemoryUpstream()
        self.pool = UpstreamPool(self.clock, self.upstream, **pool)
        self.agent = UpstreamAgent(self.pool)
        self.fresh = UpstreamAgent(self.pool, fresh=True)

    def request(
        self,
        method: bytes = b"GET",
        url: bytes = URL,
        headers: Headers | None = None,
        body: IBodyProducer | None = None,
    ) -> Deferred[Any]:
        return self.agent.request(method, url, headers, body)

    def exchange(self, wire: bytes = OK, method: bytes = b"GET") -> tuple[UpstreamResponse, Body]:
        """One whole request and response on whatever connection the pool gives."""
        d = self.request(method)
        self.upstream.last.feed(wire)
        return self.read(d)

    def read(self, d: Deferred[Any]) -> tuple[UpstreamResponse, Body]:
        response: UpstreamResponse = _result(d)
        body = Body()
        response.deliverBody(body)
        return response, body

    @property
    def idle(self) -> int:
        return len(self.pool.route(ORIGIN).idle)


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _error(d: Deferred[Any]) -> Any:
    """The exception ``d`` failed with."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0].value


# ---------------------------------------------------------------------------
# The conformance table


@frozen
class Row:
    """One upstream wire behaviour and what the client must make of it."""

    name: str
    shows: str
    wire: bytes
    method: bytes = b"GET"
    # The upstream closes the connection after sending ``wire``.
    close: bool = False
    # The request goes out on a connection that served one before.
    reused: bool = True
    # The response (None: the request itself fails with ``end``).
    code: int | None = 200
    phrase: bytes = b"OK"
    body: bytes = b""
    length: int | object = UNKNOWN_LENGTH
    headers: dict[bytes, list[bytes]] | None = None
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    end: type[BaseException] = ResponseDone
    # What the failure holds (its reasons, or its own value).
    inner: type[BaseException] | None = None
    # The connection serves the next request.
    pooled: bool = True
    examples: int = field(default=40, eq=False)


ROWS = [
    Row(
        "content_length",
        "A Content-Length body is read to its length; the connection serves again.",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type:  text/plain  \r\n"
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\n\r\nhello",
        body=b"hello",
        length=5,
        headers={
            b"Content-Length": [b"5"],
            b"Content-Type": [b"text/plain"],
            b"Set-Cookie": [b"a=1", b"b=2"],
        },
    ),
    Row(
        "no_reason_phrase",
        "A status line without a reason phrase has an empty phrase.",
        b"HTTP/1.1 429\r\nContent-Length: 2\r\n\r\n{}",
        code=429,
        phrase=b"",
        body=b"{}",
        length=2,
    ),
    Row(
        "chunked",
        "A chunked body is dechunked (extensions and trailers dropped) and ends the response.",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        body=b"hello world",
        headers={
            b"Transfer-Encoding": [b"chunked"],
            b"Content-Type": [b"text/event-stream"],
        },
    ),
    Row(
        "close_delimited",
        "A body with neither length nor chunks ends with the connection: PotentialDataLoss.",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: [DONE]\n\n",
        close=True,
        body=b"data: 1\n\ndata: [DONE]\n\n",
        end=PotentialDataLoss,
        pooled=False,
    ),
    Row(
        "coding_not_chunked",
        "A transfer coding that does not end in chunked is close-delimited.",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz",
        close=True,
        body=b"xyz",
        end=PotentialDataLoss,
        pooled=False,
    ),
    Row(
        "head",
        "A HEAD response has no body whatever its Content-Length; its connection is closed.",
        b"HTTP/1.1 200 OK\r\nContent-Length: 591\r\n\r\n",
        method=b"HEAD",
        length=0,
        headers={b"Content-Length": [b"591"]},
        pooled=False,
    ),
    Row(
        "no_content",
        "A 204 has no body; the connection serves again.",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        code=204,
        phrase=b"No Content",
        length=0,
    ),
    Row(
        "no_content_with_a_body",
        "Bytes after a 204 (which has no body) close the connection.",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        code=204,
        phrase=b"No Content",
        length=0,
        pooled=False,
    ),
    Row(
        "not_modified",
        "A 304 has no body whatever its Content-Length says.",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nContent-Length: 591\r\n\r\n",
        code=304,
        phrase=b"Not Modified",
        length=0,
    ),
    Row(
        "informational",
        "100, 102 and 103 responses are skipped, headers and all.",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n" + OK,
        body=b"ok",
        length=2,
        headers={b"Content-Length": [b"2"]},
    ),
    Row(
        "many_informational",
        "20,000 102 Processing are skipped without a log line.",
        b"HTTP/1.1 102 Processing\r\n\r\n" * 20_000 + OK,
        body=b"ok",
        length=2,
        examples=5,
    ),
    Row(
        "connection_close",
        "Connection: close is honoured: the response is whole, the connection closed.",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
        length=2,
        pooled=False,
    ),
    Row(
        "http_1_0",
        "An HTTP/1.0 response closes the connection.",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
        length=2,
        version=(b"HTTP", 1, 0),
        pooled=False,
    ),
    Row(
        "http_1_0_keep_alive",
        "An HTTP/1.0 response with Connection: keep-alive keeps it.",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        body=b"ok",
        length=2,
        version=(b"HTTP", 1, 0),
    ),
    Row(
        "more_than_content_length",
        "Bytes past the Content-Length close the connection; the response stands.",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSECRET",
        body=b"ok",
        length=2,
        pooled=False,
    ),
    Row(
        "second_response",
        "A second response to one request closes the connection; the first stands.",
        OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECRET",
        body=b"ok",
        length=2,
        pooled=False,
    ),
    Row(
        "cut_in_length_body",
        "A Content-Length body cut short fails with ResponseFailed, saying how much came.",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        close=True,
        body=b"hello",
        length=10,
        end=ResponseFailed,
        inner=IncompleteBody,
        pooled=False,
    ),
    Row(
        "cut_in_chunked_body",
        "A chunked body cut before its last chunk fails with ResponseFailed.",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        close=True,
        body=b"hello",
        end=ResponseFailed,
        inner=IncompleteBody,
        pooled=False,
    ),
    Row(
        "cut_in_head",
        "A connection cut inside the head fails the request (bytes came: not NoResponse).",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        close=True,
        code=None,
        end=ResponseFailed,
        inner=ConnectionDone,
        pooled=False,
    ),
    Row(
        "cut_before_any_byte_reused",
        "A reused connection closed before any byte: NoResponse, worth a retry.",
        b"",
        close=True,
        code=None,
        end=NoResponse,
        pooled=False,
    ),
    Row(
        "cut_before_any_byte_new",
        "A new connection closed before any byte: NoResponse, not worth a retry.",
        b"",
        close=True,
        reused=False,
        code=None,
        end=NoResponse,
        pooled=False,
    ),
    Row(
        "not_http",
        "An answer that is not HTTP fails the request and closes the connection.",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        code=None,
        end=ResponseFailed,
        pooled=False,
    ),
    Row(
        "switching_protocols",
        "A 101 to a request that asked for no upgrade fails it.",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        code=None,
        end=ResponseFailed,
        inner=UnexpectedStatus,
        pooled=False,
    ),
    Row(
        "length_and_chunked",
        "Content-Length with chunked (a smuggling shape) fails the request.",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        code=None,
        end=ResponseFailed,
        pooled=False,
    ),
    Row(
        "bad_chunk",
        "A malformed chunk size fails the body and closes the connection.",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        body=b"hello",
        end=ResponseFailed,
        pooled=False,
    ),
]


def _cuts(row: Row) -> Any:
    if len(row.wire) < 2:
        return st.just(frozenset[int]())
    return st.frozensets(st.integers(1, len(row.wire) - 1), max_size=12)


class ConformanceTests(SynchronousTestCase):
    """Each row of ``ROWS``, fed in pieces cut anywhere."""

    def check(self, row: Row, cuts: frozenset[int], deliver_late: bool) -> None:
        client = Client()
        if row.reused:
            client.exchange()
        logged: list[dict[str, Any]] = []
        observer = cast(ILogObserver, logged.append)
        globalLogPublisher.addObserver(observer)
        try:
            d = client.request(row.method)
            link = client.upstream.last
            body = Body()
            if not deliver_late:
                d.addCallback(lambda response: (response.deliverBody(body), response)[1])
            link.sent()
            link.feed(row.wire, cuts)
            if row.close:
                link.close()
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertEqual(logged, [])
        if row.code is None:
            error = _error(d)
            self.assertIsInstance(error, row.end)
            if row.end is NoResponse:
                self.assertEqual(error.reused, row.reused)
                self.assertEqual(retry_on_new_connection(error), row.reused)
            else:
                self.assertFalse(retry_on_new_connection(error))
            if row.inner is not None:
                reasons = [r.value for r in error.reasons]
                self.assertTrue(any(isinstance(r, row.inner) for r in reasons), reasons)
        else:
            response = _result(d)
            if deliver_late:
                response.deliverBody(body)
            self.assertEqual(
                (response.code, response.phrase, response.length, response.version),
                (row.code, row.phrase, row.length, row.version),
            )
            if row.headers is not None:
                self.assertEqual(dict(response.headers.getAllRawHeaders()), row.headers)
            self.assertEqual(body.data, row.body)
            assert body.reason is not None, "the body did not end"
            self.assertIsInstance(body.reason.value, row.end)
            if row.inner is not None:
                ended: Any = body.reason.value
                reasons = [r.value for r in ended.reasons]
                self.assertTrue(any(isinstance(r, row.inner) for r in reasons), reasons)
        self.assertEqual(client.idle, 1 if row.pooled else 0)
        if not row.close:
            self.assertEqual(link.closing, not row.pooled)
        # Whatever the upstream sent, the next request gets its own answer.
        if not row.pooled and not row.close:
            link.close()
        connections = len(client.upstream.links)
        _, following = client.exchange(NEXT)
        self.assertEqual(following.data, b"next")
        self.assertEqual(len(client.upstream.links), connections + (0 if row.pooled else 1))

    def test_table_is_whole(self) -> None:
        """Every row has its own name, and its own test below."""
        names = [row.name for row in ROWS]
        self.assertEqual(len(names), len(set(names)))
        for name in names:
            self.assertTrue(hasattr(self, f"test_{name}"), name)


def _row_test(row: Row) -> Callable[..., None]:
    @settings(max_examples=row.examples, deadline=None)
    @given(cuts=_cuts(row), deliver_late=st.booleans())
    @example(cuts=frozenset(range(1, len(row.wire))), deliver_late=False)
    def test(self: ConformanceTests, cuts: frozenset[int], deliver_late: bool) -> None:
        self.check(row, cuts, deliver_late)

    test.__doc__ = row.shows
    test.__name__ = f"test_{row.name}"
    return test


for _row in ROWS:
    setattr(ConformanceTests, f"test_{_row.name}", _row_test(_row))


# ---------------------------------------------------------------------------
# The request


class RequestTests(SynchronousTestCase):
    def test_head_is_written_once_with_host_and_headers(self) -> None:
        """Request line, Host, the caller's headers, then the framing from the producer."""
        client = Client()
        headers = Headers({b"content-type": [b"application/json"], b"x-many": [b"1", b"2"]})
        client.request(b"POST", URL + b"?a=1#frag", headers, BytesProducer(b'{"a":1}'))
        self.assertEqual(
            client.upstream.last.sent(),
            b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: upstream.test\r\n"
            b"Content-Type: application/json\r\nX-Many: 1\r\nX-Many: 2\r\n"
            b'Content-Length: 7\r\n\r\n{"a":1}',
        )

    def test_host_header_like_twisted_agent(self) -> None:
        """Default ports are left out of Host; others and IPv6 brackets are kept."""
        for url, host in [
            (b"https://api.example:443/v1", b"api.example"),
            (b"http://api.example:8080/v1", b"api.example:8080"),
            (b"http://[::1]:8080/v1", b"[::1]:8080"),
            (b"http://127.0.0.1/", b"127.0.0.1"),
        ]:
            client = Client()
            client.request(url=url)
            self.assertIn(b"\r\nHost: " + host + b"\r\n", client.upstream.last.sent())

    def test_routes_per_scheme_host_and_port(self) -> None:
        """One endpoint per scheme, host and port, as ReusedEndpoints is asked today."""
        client = Client()
        for url in [
            b"https://a.example/v1/x",
            b"https://a.example:443/v1/y",
            b"http://a.example/v1/x",
            b"https://a.example:8443/v1/x",
        ]:
            client.request(url=url)
        self.assertEqual(
            [(u.scheme, u.host, u.port) for u in client.upstream.uris],
            [
                (b"https", b"a.example", 443),
                (b"http", b"a.example", 80),
                (b"https", b"a.example", 8443),
            ],
        )

    def test_empty_post_says_content_length_0(self) -> None:
        """A POST without a body says so; a GET says nothing."""
        client = Client()
        client.request(b"POST")
        self.assertIn(b"\r\nContent-Length: 0\r\n\r\n", client.upstream.last.sent())
        client.upstream.last.feed(OK)
        client.request(b"GET")
        self.assertNotIn(b"Content-Length", client.upstream.last.sent())

    def test_callers_framing_headers_are_not_sent_callers_host_is(self) -> None:
        """The client frames the body itself; a Host the caller set is kept."""
        client = Client()
        headers = Headers(
            {b"content-length": [b"99"], b"transfer-encoding": [b"chunked"], b"host": [b"h.test"]}
        )
        client.request(b"POST", headers=headers, body=BytesProducer(b"abc"))
        self.assertEqual(
            client.upstream.last.sent(),
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h.test\r\nContent-Length: 3\r\n\r\nabc",
        )

    def test_unknown_length_is_chunked(self) -> None:
        """A producer of UNKNOWN_LENGTH is sent chunked, ending with the last chunk."""
        client = Client()
        producer = _Producer(UNKNOWN_LENGTH)
        client.request(b"POST", body=producer)
        link = client.upstream.last
        self.assertEqual(link.sent(), b"")  # the head waits for the first write
        producer.consumer.write(b"hello")
        producer.consumer.write(b"")
        producer.consumer.write(b" world")
        producer.finished.callback(None)
        self.assertEqual(
            link.sent(),
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: upstream.test\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        link.feed(OK)
        self.assertEqual(client.idle, 1)

    def test_spooled_body_is_streamed_with_backpressure(self) -> None:
        """A FileBodyProducer is registered with the transport while it writes."""
        client = Client()
        cooperator = Cooperator(scheduler=lambda work: client.clock.callLater(0, work))
        data = b"x" * 200_000
        producer = FileBodyProducer(io.BytesIO(data), cooperator, readSize=65536)
        client.request(b"POST", body=producer)
        link = client.upstream.last
        self.assertIs(link.transport.producer, producer)
        self.assertTrue(link.transport.streaming)
        for _ in range(10):
            client.clock.advance(0)
        self.assertIsNone(link.transport.producer)
        self.assertTrue(link.sent().endswith(b"\r\nContent-Length: 200000\r\n\r\n" + data))
        link.feed(OK)
        self.assertEqual(client.idle, 1)

    def test_body_of_the_wrong_length_fails_the_request(self) -> None:
        """A producer writing more, or less, than its length fails and aborts."""
        for written in (b"abcd", b"ab"):
            client = Client()
            producer = _Producer(3)
            d = client.request(b"POST", body=producer)
            if len(written) > 3:
                self.assertRaises(ExcessWrite, producer.consumer.write, written)
            else:
                producer.consumer.write(written)
                producer.finished.callback(None)
            error = _error(d)
            self.assertIsInstance(error, RequestGenerationFailed)
            self.assertTrue(client.upstream.last.transport.disconnected)

    def test_producer_error_fails_the_request(self) -> None:
        """A producer that fails (a spool file gone) fails the request."""
        client = Client()
        producer = _Producer(10)
        d = client.request(b"POST", body=producer)
        producer.finished.errback(Failure(OSError("spool gone")))
        error = _error(d)
        self.assertIsInstance(error, RequestGenerationFailed)
        self.assertIsInstance(error.reasons[0].value, OSError)

    def test_answer_before_the_whole_body_closes_after_it(self) -> None:
        """An upstream answering before reading the body gets no second request."""
        client = Client()
        producer = _Producer(10)
        d = client.request(b"POST", body=producer)
        producer.consumer.write(b"abc")
        client.upstream.last.feed(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(_result(d).code, 413)
        self.assertTrue(producer.stopped)
        self.assertEqual(client.idle, 0)
        self.assertTrue(client.upstream.last.closing)
        self.assertRaises(ExcessWrite, producer.consumer.write, b"late")

    def test_invalid_requests_are_refused_before_a_connection(self) -> None:
        """Methods and targets that could break the request line fail at once."""
        client = Client()
        for method, url in [
            (b"GET /x HTTP/1.1\r\n", URL),
            (b"GET", URL + b" HTTP/1.1\r\nX: y"),
            (b"GET", b"not a url"),
            (b"GET", b"ftp://upstream.test/x"),
            (b"GET", b"http://user:secret@upstream.test/x"),
        ]:
            error = _error(client.request(method, url))
            self.assertIsInstance(error, ValueError)
            self.assertNotIn("secret", str(error))
        self.assertEqual(client.upstream.links, [])


@implementer(IBodyProducer)
class _Producer:
    """A body producer the test drives."""

    def __init__(self, length: Any) -> None:
        self.length = length
        self.consumer: Any = None
        self.finished: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.finished

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Backpressure, cancellation, the body's end


class BodyTransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Client()
        d = self.client.request()
        self.link = self.client.upstream.last
        self.link.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.response, self.body = self.client.read(d)

    def test_body_streams_as_it_arrives(self) -> None:
        """Each chunk reaches the body protocol when it arrives, not at the end."""
        self.assertEqual((self.body.data, self.body.reason), (b"abc", None))
        self.link.feed(b"3\r\ndef\r\n")
        self.assertEqual((self.body.data, self.body.chunks), (b"abcdef", 2))

    def test_pause_and_resume_reach_the_transport(self) -> None:
        """A slow client's pause stops reading from the upstream, and resume restarts it."""
        self.assertIs(self.body.transport, self.response)
        self.response.pauseProducing()
        self.assertEqual(self.link.transport.producerState, "paused")
        self.response.resumeProducing()
        self.assertEqual(self.link.transport.producerState, "producing")

    def test_ending_while_paused_resumes_before_pooling(self) -> None:
        """A connection pooled after a paused body reads again; the old body cannot pause it."""
        self.response.pauseProducing()
        self.link.feed(b"0\r\n\r\n")
        self.assertIsInstance(self.body.reason.value, ResponseDone)  # type: ignore[union-attr]
        self.assertEqual(self.link.transport.producerState, "producing")
        self.assertEqual(self.client.idle, 1)
        self.response.pauseProducing()
        self.response.stopProducing()
        self.assertEqual(self.link.transport.producerState, "producing")
        self.assertFalse(self.link.closing)

    def test_stop_producing_aborts_the_connection(self) -> None:
        """stopProducing (a client gone) aborts the upstream; it is never pooled."""
        self.response.stopProducing()
        self.assertTrue(self.link.transport.disconnected)
        self.link.feed(b"3\r\nxyz\r\n0\r\n\r\n")
        self.assertEqual(self.body.data, b"abc")
        self.assertIsNone(self.body.reason)
        self.link.close(ConnectionLost())
        self.assertIsInstance(self.body.reason.value, ResponseFailed)  # type: ignore[union-attr]
        self.assertEqual(self.client.idle, 0)

    def test_body_held_until_delivered(self) -> None:
        """Bytes and the end that arrive before deliverBody are given to it then."""
        client = Client()
        d = client.request()
        client.upstream.last.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        client.upstream.last.feed(b"def")
        _, body = client.read(d)
        self.assertEqual(body.data, b"abcdef")
        self.assertIsInstance(body.reason.value, ResponseDone)  # type: ignore[union-attr]


class CancellationTests(SynchronousTestCase):
    def test_cancel_on_a_pooled_connection_aborts_it(self) -> None:
        """Cancelled before the response: CancelledError, the connection aborted, not pooled."""
        client = Client()
        client.exchange()
        d = client.request()
        link = client.upstream.last
        d.cancel()
        self.assertIsInstance(_error(d), CancelledError)
        self.assertTrue(link.transport.disconnected)
        link.feed(OK)  # too late: ignored
        link.close()
        self.assertEqual(client.idle, 0)
        self.assertEqual(len(client.upstream.links), 1)

    def test_cancel_while_connecting(self) -> None:
        """Cancelled while connecting: the connection attempt is cancelled."""
        client = Client()
        client.upstream.hold = True
        d = client.request()
        d.cancel()
        self.assertIsInstance(_error(d), CancelledError)
        self.assertEqual(len(client.upstream.cancelled), 1)

    def test_connect_failure_is_the_endpoints(self) -> None:
        """A connection that cannot be made fails the request with the endpoint's error."""
        client = Client()
        client.upstream.hold = True
        d = client.request()
        client.upstream.pending[0][1].errback(Failure(ConnectionRefusedError("refused")))
        self.assertIsInstance(_error(d), ConnectionRefusedError)

    def test_cancel_while_the_body_is_written_stops_the_producer(self) -> None:
        """Cancelled while the body is produced: the producer is stopped too."""
        client = Client()
        producer = _Producer(10)
        d = client.request(b"POST", body=producer)
        d.cancel()
        self.assertIsInstance(_error(d), CancelledError)
        self.assertTrue(producer.stopped)
        self.assertTrue(client.upstream.last.transport.disconnected)

    def test_cancel_after_the_response_does_nothing(self) -> None:
        """Once the response came, cancel is too late: stopProducing is the way."""
        client = Client()
        d = client.request()
        client.upstream.last.feed(OK)
        d.cancel()
        self.assertEqual(_result(d).code, 200)
        self.assertEqual(client.idle, 1)


class StaleConnectionTests(SynchronousTestCase):
    def test_reused_connection_lost_mid_request_write(self) -> None:
        """Lost while the body is still written (reused): NoResponse, worth a retry."""
        client = Client()
        client.exchange()
        producer = _Producer(10)
        d = client.request(b"POST", body=producer)
        client.upstream.last.close(ConnectionLost())
        error = _error(d)
        self.assertIsInstance(error, NoResponse)
        self.assertEqual((error.reused, error.request_sent), (True, False))
        self.assertTrue(retry_on_new_connection(error))
        self.assertTrue(producer.stopped)

    def test_fresh_agent_makes_a_new_connection_and_pools_it(self) -> None:
        """The fresh agent never takes a pooled connection; its own joins the pool."""
        client = Client()
        client.exchange()
        d = client.fresh.request(b"GET", URL)
        self.assertEqual(len(client.upstream.links), 2)
        self.assertEqual(client.idle, 1)
        client.upstream.last.feed(OK)
        _result(d)
        self.assertEqual(client.idle, 2)

    def test_cancel_is_not_stale(self) -> None:
        """A cancelled request is never a reason to send it again."""
        client = Client()
        client.exchange()
        d = client.request()
        d.cancel()
        self.assertFalse(retry_on_new_connection(_error(d)))


class HeadLimitTests(SynchronousTestCase):
    def test_head_too_large_fails(self) -> None:
        """A head that never ends is cut past MAX_HEAD_BYTES, not held in memory."""
        client = Client()
        d = client.request()
        link = client.upstream.last
        link.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(MAX_HEAD_BYTES // 4096 + 2):
            if link.closing:
                break
            link.feed(b"a" * 4096)
        error = _error(d)
        self.assertIsInstance(error, ResponseFailed)
        self.assertIsInstance(error.reasons[0].value, ResponseHeadTooLarge)
        self.assertTrue(link.transport.disconnected)

    def test_each_informational_head_counts_on_its_own(self) -> None:
        """Many 1xx in many pieces never add up to a head too large."""
        client = Client()
        d = client.request()
        link = client.upstream.last
        for _ in range(3 * MAX_HEAD_BYTES // 4096):
            link.feed(b"HTTP/1.1 102 Processing\r\n\r\n" * 146)
        link.feed(OK)
        self.assertEqual(_result(d).code, 200)


# ---------------------------------------------------------------------------
# The pool


class PoolTests(SynchronousTestCase):
    def test_keep_alive_reuses_one_connection(self) -> None:
        """Requests one after another go over one connection."""
        client = Client()
        for _ in range(3):
            _, body = client.exchange()
            self.assertEqual(body.data, b"ok")
        self.assertEqual(len(client.upstream.links), 1)

    def test_concurrent_requests_use_their_own_connections(self) -> None:
        """Requests at the same time get a connection each; all are pooled after."""
        client = Client()
        ds = [client.request() for _ in range(3)]
        for link in client.upstream.links:
            link.feed(OK)
        for d in ds:
            _result(d)
        self.assertEqual((len(client.upstream.links), client.idle), (3, 3))

    def test_idle_connection_closed_after_the_idle_timeout(self) -> None:
        """A pooled connection is closed after idle_timeout seconds on the clock, not before."""
        client = Client(idle_timeout=50)
        client.exchange()
        link = client.upstream.last
        client.clock.advance(49.9)
        self.assertFalse(link.closing)
        client.clock.advance(0.1)
        self.assertTrue(link.closing)
        self.assertEqual(client.idle, 0)
        self.assertEqual(client.clock.getDelayedCalls(), [])

    def test_most_recent_used_first_older_ones_expire(self) -> None:
        """Idle connections are reused newest first; the oldest expire on their own time."""
        client = Client(idle_timeout=50)
        ds = [client.request() for _ in range(2)]
        first, second = client.upstream.links
        first.feed(OK)
        client.clock.advance(10)
        second.feed(OK)
        for d in ds:
            _result(d)
        first.sent()
        second.sent()
        client.request()
        self.assertEqual(second.sent()[:4], b"GET ")
        self.assertEqual(first.sent(), b"")
        client.clock.advance(40)
        self.assertTrue(first.closing)
        self.assertFalse(second.closing)
        second.feed(OK)
        client.clock.advance(49)
        self.assertFalse(second.closing)
        client.clock.advance(1)
        self.assertTrue(second.closing)

    def test_idle_connections_bounded(self) -> None:
        """Past max_idle_per_route idle connections, one more is closed, not pooled."""
        client = Client(max_idle_per_route=2)
        ds = [client.request() for _ in range(3)]
        for link in client.upstream.links:
            link.feed(OK)
        for d in ds:
            _result(d)
        self.assertEqual(client.idle, 2)
        self.assertEqual([link.closing for link in client.upstream.links], [False, False, True])

    def test_bytes_while_idle_close_the_connection(self) -> None:
        """Any byte on an idle connection (a late lie) closes it; no one gets it."""
        client = Client()
        client.exchange()
        link = client.upstream.last
        link.feed(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(link.transport.disconnected)
        self.assertEqual(client.idle, 0)
        _, body = client.exchange(NEXT)
        self.assertEqual(body.data, b"next")
        self.assertEqual(len(client.upstream.links), 2)

    def test_idle_connection_closed_by_the_upstream_is_forgotten(self) -> None:
        """An idle connection the upstream closes leaves the pool."""
        client = Client()
        client.exchange()
        client.upstream.last.close()
        self.assertEqual(client.idle, 0)

    def test_close_cached_connections(self) -> None:
        """closeCachedConnections closes the idle ones and fires once they are closed."""
        client = Client()
        ds = [client.request() for _ in range(2)]
        for link in client.upstream.links:
            link.feed(OK)
        for d in ds:
            _result(d)
        closed = client.pool.closeCachedConnections()
        self.assertFalse(closed.called)
        self.assertTrue(all(link.closing for link in client.upstream.links))
        self.assertEqual(client.clock.getDelayedCalls(), [])
        for link in client.upstream.links:
            link.close()
        self.assertIsNone(_result(closed))
        self.assertEqual(client.idle, 0)
