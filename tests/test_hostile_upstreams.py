"""Broken and hostile upstreams on real sockets: what they send that a
well-behaved HTTP server never would, and what oaproxy makes of it.

``RawUpstream`` answers each request with bytes the test wrote (a status
line, headers and a body, exactly as given), so that framing, line endings
and texts can be anything; the proxy runs as twistd builds it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from tests.doubles import Reply, parse_reply
from tests.fakeupstream import ConnectionTracker
from tests.live import EndToEndCase, RawClient, RunningProxy, reactor
from tests.payloads import (
    CLIENT_KEY,
    SK_MAIN,
    chat_payload,
    content_chunk,
    raw_chat_request,
    sse,
    upstream,
)

#: What a raw upstream answers: bytes, or bytes made from the request head.
Answer = bytes | Callable[[bytes], bytes]


class _Answering(Protocol):
    """Reads one request (head and ``Content-Length`` body), writes the next
    answer and closes the connection, so that a body without length ends
    (unless the upstream keeps it open)."""

    def __init__(self, upstream: RawUpstream) -> None:
        self._upstream = upstream
        self._received = b""

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        head, sep, body = self._received.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self._upstream.heads.append(head)
        answer = self._upstream.answers.pop(0)
        transport: Any = self.transport
        transport.write(answer(head) if callable(answer) else answer)
        if not self._upstream.keep_open:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._received = b""


class RawUpstream(Factory):
    def __init__(self, *answers: Answer, keep_open: bool = False) -> None:
        self.answers = list(answers)
        self.keep_open = keep_open
        self.heads: list[bytes] = []
        self.connections = ConnectionTracker(self)

    def buildProtocol(self, addr: Any) -> _Answering:
        return _Answering(self)


def authorization_line(head: bytes) -> bytes:
    """The ``Authorization: Bearer …`` line of a request head, as sent."""
    return next(line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization:"))


def event_stream(*events: bytes) -> bytes:
    """A 200 SSE answer without length or chunking: the close ends it."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + b"".join(events)


def content_event(text: str, line_end: bytes = b"\n") -> bytes:
    return sse(content_chunk(text)).replace(b"\n", line_end)


class HostileUpstreamCase(EndToEndCase):
    def raw_upstream(self, *answers: Answer, keep_open: bool = False) -> str:
        """A raw upstream's endpoint URL; it is stopped in cleanup."""
        raw = RawUpstream(*answers, keep_open=keep_open)
        port = reactor.listenTCP(0, raw, interface="127.0.0.1")
        self.addCleanup(raw.connections.close_all)
        self.addCleanup(port.stopListening)
        self.raw = raw
        return f"http://127.0.0.1:{port.getHost().port}/v1"

    async def send(self, proxy: RunningProxy, **payload: Any) -> bytes:
        """One chat completion through the proxy on a connection of its own:
        the bytes of its answer."""
        request = raw_chat_request(chat_payload(**payload), CLIENT_KEY).replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1
        )
        client = RawClient(request, events=2**31)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        await client.lost
        return client.received

    async def ask(self, proxy: RunningProxy, **payload: Any) -> Reply:
        return parse_reply(await self.send(proxy, **payload))


class LineEndTests(HostileUpstreamCase):
    async def test_bare_cr_done_before_the_close_ends_the_stream(self) -> None:
        """A close-delimited stream with bare CR line ends is whole once it said [DONE]."""
        events = (content_event("Hel", b"\r"), content_event("lo", b"\r"), b"data: [DONE]\r\r")
        endpoint = self.raw_upstream(event_stream(*events))
        proxy = await self.proxy([upstream("raw", endpoint, stream_usage=False)])
        reply = await self.ask(proxy, stream=True)
        self.assertEqual((reply.status, reply.complete), (200, True))
        self.assertEqual(reply.body, b"".join(events))
        record = await proxy.records.nth(1)
        self.assertEqual((record["outcome"], record["error"]), ("ok", None))
        self.assertEqual(record["response_text"], "Hello")

    async def test_bare_cr_first_event_at_the_close_is_relayed(self) -> None:
        """An only event ending in a bare CR at the close is relayed (then an error: no [DONE])."""
        endpoint = self.raw_upstream(event_stream(content_event("Hi", b"\r")))
        proxy = await self.proxy([upstream("raw", endpoint, stream_usage=False)])
        reply = await self.ask(proxy, stream=True)
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.body.startswith(content_event("Hi", b"\r")), reply.body)
        self.assertIn(b"event: error", reply.body)
        record = await proxy.records.nth(1)
        self.assertEqual(record["response_text"], "Hi")


# Data that never reaches the blank line ending an event.
ENDLESS_EVENT = b"data: " + b"x" * (1024 * 1024)


class EventCapTests(HostileUpstreamCase):
    async def test_endless_event_before_the_first_fails_over(self) -> None:
        """An upstream sending data without a blank line is failed over at max_event_bytes."""
        endpoint = self.raw_upstream(event_stream(ENDLESS_EVENT), keep_open=True)
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("raw", endpoint), upstream("main", fake.endpoint)], max_event_bytes=65536
        )
        reply = await self.ask(proxy, stream=True)
        self.assertEqual((reply.status, reply.complete), (200, True))
        self.assertIn(b"data: [DONE]", reply.body)
        record = await proxy.records.nth(1)
        self.assertEqual(
            [(a["upstream"], a["error"]) for a in record["attempts"]],
            [("raw", "SSE event over 65536 bytes"), ("main", None)],
        )

    async def test_endless_event_after_the_first_ends_the_stream(self) -> None:
        """After the first event, an endless one ends the stream with an error event."""
        first = content_event("Hi")
        endpoint = self.raw_upstream(event_stream(first, ENDLESS_EVENT), keep_open=True)
        proxy = await self.proxy([upstream("raw", endpoint)], max_event_bytes=65536)
        reply = await self.ask(proxy, stream=True)
        self.assertEqual((reply.status, reply.complete), (200, True))
        self.assertTrue(reply.body.startswith(first), reply.body[:200])
        self.assertIn(b"upstream stream failed: SSE event over 65536 bytes", reply.body)
        self.assertNotIn(b"xxxx", reply.body)
        record = await proxy.records.nth(1)
        self.assertEqual(
            (record["outcome"], record["error"]),
            ("stream_failed", "SSE event over 65536 bytes"),
        )


class EchoedSecretTests(HostileUpstreamCase):
    async def test_status_line_quoting_the_key_is_redacted(self) -> None:
        """A status line that quotes the request's Authorization never reaches the client."""
        endpoint = self.raw_upstream(
            lambda head: b"HTTP/1.1 502 " + authorization_line(head) + b"\r\n\r\n",
            lambda head: (
                b"HTTP/1.1 200 " + authorization_line(head) + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            ),
        )
        proxy = await self.proxy([upstream("raw", endpoint, sk=SK_MAIN)])
        for _ in range(2):
            received = await self.send(proxy)
            self.assertIn(b" Authorization: Bearer [redacted]\r\n", received)
            self.assertNotIn(SK_MAIN.encode(), received)
        self.assertIn(SK_MAIN.encode(), self.raw.heads[0])
        self.assertEqual(len(proxy.records.seen), 2)
        self.assertNotIn(SK_MAIN, json.dumps(proxy.records.seen))

    async def test_garbage_status_line_is_no_echo(self) -> None:
        """A status line that is no HTTP fails the attempt; the 502 quotes none of it."""
        endpoint = self.raw_upstream(
            lambda head: b"HTTP/1.1 abc " + authorization_line(head) + b"\r\n\r\n"
        )
        proxy = await self.proxy([upstream("raw", endpoint, sk=SK_MAIN)])
        reply = await self.ask(proxy)
        self.assertEqual(reply.status, 502)
        self.assertNotIn(SK_MAIN.encode(), reply.body)
        record = await proxy.records.nth(1)
        self.assertNotIn(SK_MAIN, json.dumps(record))

    async def test_response_header_carrying_a_key_is_dropped(self) -> None:
        """A response header that carries a configured key never reaches the
        client; the others pass, in answers and streams alike."""

        def debug_headers(head: bytes) -> bytes:
            return (
                b"X-Debug-Auth: " + authorization_line(head).split(b": ", 1)[1] + b"\r\n"
                b"X-Request-Id: req-1\r\n"
            )

        endpoint = self.raw_upstream(
            lambda head: (
                b"HTTP/1.1 200 OK\r\n" + debug_headers(head) + b"Content-Type: "
                b"application/json\r\nContent-Length: 2\r\n\r\n{}"
            ),
            lambda head: (
                b"HTTP/1.1 200 OK\r\n" + debug_headers(head) + b"Content-Type: "
                b"text/event-stream\r\n\r\n" + content_event("Hi") + b"data: [DONE]\n\n"
            ),
        )
        proxy = await self.proxy([upstream("raw", endpoint, sk=SK_MAIN, stream_usage=False)])
        for reply in (await self.ask(proxy), await self.ask(proxy, stream=True)):
            self.assertEqual((reply.status, reply.header(b"x-request-id")), (200, b"req-1"))
            self.assertIsNone(reply.header(b"x-debug-auth"))


class _Counting(Protocol):
    """A client that sends one request and keeps the response's head and
    the count of its bytes (a large answer is not held)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.size = 0
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if len(self.head) < 4096:
            self.head += data[:4096]
        self.size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


def embeddings_answer(vectors: int, dimensions: int) -> bytes:
    """An embeddings answer as OpenAI sends it (usage last), of about
    ``vectors * dimensions * 13`` bytes of numbers."""
    vector = b"[" + b"0.0123456789," * (dimensions - 1) + b"0.0123456789]"
    items = b",".join(
        b'{"object":"embedding","index":%d,"embedding":%s}' % (i, vector) for i in range(vectors)
    )
    body = (
        b'{"object":"list","data":[' + items + b'],"model":"text-embedding-3-small",'
        b'"usage":{"prompt_tokens":8,"total_tokens":8}}'
    )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    ) + body


class LargeAnswerTests(HostileUpstreamCase):
    timeout = 60

    async def test_large_answer_does_not_hold_the_reactor(self) -> None:
        """A 64 MiB embeddings answer passes without holding the reactor (it
        was parsed whole for the record: 2 s); the record keeps its usage."""
        answer = embeddings_answer(vectors=1700, dimensions=3072)
        endpoint = self.raw_upstream(answer)
        proxy = await self.proxy([upstream("raw", endpoint)])
        gaps = [0.0]
        last = [reactor.seconds()]

        def tick() -> None:
            now = reactor.seconds()
            gaps[0] = max(gaps[0], now - last[0])
            last[0] = now

        ticker = LoopingCall(tick)
        ticker.clock = reactor
        ticker.start(0.005)
        try:
            request = raw_chat_request(
                {"model": "text-embedding-3-small", "input": "hi"}, CLIENT_KEY
            ).replace(b"/v1/chat/completions", b"/v1/embeddings")
            client = _Counting(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
            await client.lost
            record = await proxy.records.nth(1)
        finally:
            ticker.stop()
        self.assertTrue(client.head.startswith(b"HTTP/1.1 200 "), client.head[:100])
        self.assertGreater(client.size, len(answer) - 1000)
        self.assertEqual(
            record["usage"], {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}
        )
        self.assertLess(gaps[0], 0.5)
