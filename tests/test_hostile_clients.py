"""What a hostile client tries, on real sockets against the running service
(in process, or the real twistd): methods the API does not use, request
heads and bodies sent a byte at a time, more connections than descriptors."""

from __future__ import annotations

import gzip
import os
import shutil
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from tests.doubles import Reply, parse_reply
from tests.live import EndToEndCase, RawClient, chat, free_port, reactor, read_body
from tests.payloads import CLIENT_KEY, SK_MAIN, upstream
from tests.test_daemon import DaemonCase, base_config


async def send_raw(port: int, request: bytes) -> Reply:
    """Write ``request`` (which asks for ``Connection: close``) and parse the answer."""
    client = RawClient(request, events=1 << 30)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await client.lost
    return parse_reply(client.received)


def request_head(method: bytes, path: bytes, *lines: bytes) -> bytes:
    head = [method + b" " + path + b" HTTP/1.1", b"Host: proxy.test", b"Connection: close", *lines]
    return b"\r\n".join(head) + b"\r\n\r\n"


class MethodTests(EndToEndCase):
    async def test_trace_and_connect_never_reach_an_upstream(self) -> None:
        """TRACE, CONNECT and the like get 405 with Allow; the upstream sees none."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint, sk=SK_MAIN)])
        auth = b"Authorization: Bearer " + CLIENT_KEY.encode()
        for method in (b"TRACE", b"CONNECT", b"PROPFIND", b"get"):
            reply = await send_raw(proxy.port, request_head(method, b"/v1/chat/completions", auth))
            self.assertEqual(reply.status, 405, method)
            self.assertEqual(
                reply.header(b"allow"), b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS", method
            )
            error = reply.json()["error"]
            self.assertEqual(
                (error["type"], error["code"]), ("invalid_request_error", "method_not_allowed")
            )
            self.assertNotIn(SK_MAIN, reply.body.decode())
        self.assertEqual(fake.requests, [])
        record = await proxy.records.nth(4)
        self.assertEqual((record["method"], record["status"]), ("get", 405))

    async def test_api_methods_still_forwarded(self) -> None:
        """GET, DELETE and HEAD go to the upstream as before."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        auth = b"Authorization: Bearer " + CLIENT_KEY.encode()
        for method in (b"GET", b"DELETE", b"HEAD"):
            # Not /v1/models: oaproxy answers GET there itself.
            await send_raw(proxy.port, request_head(method, b"/v1/files", auth))
        self.assertEqual([r.method for r in fake.requests], [b"GET", b"DELETE", b"HEAD"])


SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Slow: " + b"a" * 4096


class Slowloris(Protocol):
    """Sends ``data`` (a request head that never ends) one byte every
    ``interval`` seconds; ``lost`` fires with how long the connection lived."""

    def __init__(self, interval: float, data: bytes = SLOW_HEAD) -> None:
        self.interval = interval
        self.data = data
        self.sent = 0
        self.received = b""
        self.opened = 0.0
        self.lost: Deferred[float] = Deferred()
        self._next: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.opened = reactor.seconds()
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data[self.sent : self.sent + 1])
        self.sent += 1
        self._next = reactor.callLater(self.interval, self._send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self.lost.callback(reactor.seconds() - self.opened)

    def stop(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.lost.called:
            transport.abortConnection()


async def slowloris(case: Any, port: int, count: int, interval: float) -> list[Slowloris]:
    """``count`` slow clients on ``port``, each aborted in cleanup if still open."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    clients = []
    for _ in range(count):
        client = Slowloris(interval)
        case.addCleanup(client.stop)
        await connectProtocol(endpoint, client)
        clients.append(client)
    return clients


async def all_closed_within(clients: list[Slowloris], seconds: float) -> list[float]:
    """How long each client's connection lived; fails if any outlives ``seconds``."""
    lived: Deferred[list[Any]] = DeferredList([c.lost for c in clients], fireOnOneErrback=True)
    lived.addTimeout(seconds, reactor)
    results = await lived
    return [value for _, value in results]


class SlowClientTests(EndToEndCase):
    async def test_forty_slow_heads_are_closed_at_the_deadline(self) -> None:
        """40 heads sent a byte per 0.2 s get 408 at header_timeout; others are served."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)], header_timeout=1)
        clients = await slowloris(self, proxy.port, 40, 0.2)
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        lived = await all_closed_within(clients, 3)
        self.assertTrue(all(0.9 <= seconds < 2 for seconds in lived), lived)
        for client in clients:
            self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received[:50])

    async def test_a_slow_body_is_closed(self) -> None:
        """A whole head, then a body at 500 bytes/s where 4 KiB/s are asked."""
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)], body_min_rate=4096, body_rate_window=0.5
        )
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n\r\n"
        )
        client = Slowloris(0.002, head + b"x" * 100000)
        self.addCleanup(client.stop)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        [lived] = await all_closed_within([client], 3)
        self.assertLess(lived, 2)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received[:50])
        self.assertEqual(fake.requests, [])


class DescriptorLimitTests(DaemonCase):
    timeout = 60

    async def test_more_slow_clients_than_descriptors(self) -> None:
        """260 slow clients, 256 descriptors: the excess closed at once, the rest in time."""
        if shutil.which("prlimit") is None:
            raise SkipTest("prlimit (util-linux) is not installed")
        fake = await self.fake()
        port = free_port()
        config = base_config(
            port,
            {"alice": CLIENT_KEY},
            [{"name": "main", "endpoint": fake.endpoint, "sk": SK_MAIN}],
            header_timeout=2,
        )
        daemon = self.spawn(config, prefix=["prlimit", "--nofile=256:256"])
        await self.serving(daemon, port)
        clients = await slowloris(self, port, 260, 0.3)
        descriptors = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
        lived = await all_closed_within(clients, 8)
        at_once = [seconds for seconds in lived if seconds < 1]
        # (256 - 64 reserved) // 3 per connection: 64 are let in.
        self.assertEqual(len(at_once), 260 - 64, sorted(lived))
        self.assertTrue(all(1.9 <= seconds < 4 for seconds in lived if seconds >= 1), lived)
        self.assertLess(descriptors, 200)
        await self.serving(daemon, port, attempts=20)
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        metrics = (await read_body(response)).decode()
        self.assertIn("oaproxy_connections_refused_total 196.0", metrics)
        self.assertIn('oaproxy_connections_closed_total{reason="slow_head"} 64.0', metrics)
        self.assertNotIn("EMFILE", daemon.text)
        self.assertNotIn("Traceback", daemon.text)
        # Two lines for 196 refusals, not 196.
        self.assertEqual(daemon.text.count("refusing client connections"), 1, daemon.text)


DENIED = "gpt-denied"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


class DenyListTests(EndToEndCase):
    """An upstream that denies a model never gets it, however the body hides it."""

    async def test_bodies_that_hide_their_model(self) -> None:
        """Each disguise of a denied model gets 400, 404 or 415, and reaches no upstream."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint, deny=[DENIED])])
        json_type = b"application/json"
        form_type = b"multipart/form-data; boundary=b"
        form = (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            + DENIED.encode()
            + b"\r\n--b--\r\n"
        )
        cases: list[tuple[bytes, bytes, bytes | None, bytes, int]] = [
            # path, body, content type, extra header, status
            (b"/v1/chat/completions", b'{"model": ["gpt-denied"]}', json_type, b"", 400),
            (b"/v1/chat/completions", b'{"model": 4, "x": "gpt-denied"}', json_type, b"", 400),
            (
                b"/v1/chat/completions",
                f'{{"model": "{DENIED}", "a": {deep(2000)}}}'.encode(),
                json_type,
                b"",
                404,
            ),
            (b"/v1/chat/completions", b'{"model": "gpt-denied"}', b"text/plain", b"", 404),
            (b"/v1/embeddings", b" " * 5000 + b'{"model": "gpt-denied"}', None, b"", 404),
            (
                b"/v1/chat/completions",
                b'{"model": "gpt-4o-mini", "MODEL": "gpt-denied"}',
                json_type,
                b"",
                400,
            ),
            (b"/v1/chat/completions", b'{"Model": "gpt-denied"}', json_type, b"", 400),
            (b"/v1/chat/completions", b'{"mod\\u0065l": "gpt-denied"}', json_type, b"", 404),
            (
                b"/v1/chat/completions",
                b'{"model": "gpt-4o-mini"}{"model": "gpt-denied"}',
                json_type,
                b"",
                400,
            ),
            (
                b"/v1/chat/completions",
                gzip.compress(b'{"model": "gpt-denied"}'),
                json_type,
                b"Content-Encoding: gzip\r\n",
                415,
            ),
            (b"/v1/chat/completions", gzip.compress(b'{"model": "x"}'), json_type, b"", 400),
            (
                b"/v1/chat/completions",
                b"model=gpt-denied",
                b"application/x-www-form-urlencoded",
                b"",
                400,
            ),
            (b"/v1/chat/completions", form, form_type, b"", 400),
            (b"/v1/audio/transcriptions", form, form_type, b"", 404),
            (b"/v1/responses", b"", json_type, b"", 400),
        ]
        for path, body, content_type, extra, status in cases:
            head = (
                b"POST " + path + b" HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
                b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n" + extra
            )
            if content_type is not None:
                head += b"Content-Type: " + content_type + b"\r\n"
            request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
            reply = await send_raw(proxy.port, request)
            self.assertEqual(reply.status, status, (path, body[:60], reply.body))
        self.assertEqual(fake.requests, [])
        for n in range(1, len(cases) + 1):
            record = await proxy.records.nth(n)
            self.assertEqual(record["outcome"], "client_error", record)

    async def test_what_routing_can_read_still_passes(self) -> None:
        """Allowed models, forms and bodies without one keep being forwarded."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint, deny=[DENIED])])
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        auth = b"Authorization: Bearer " + CLIENT_KEY.encode()
        for path, body, content_type in [
            (b"/v1/batches", b'{"input_file_id": "f"}', b"application/json"),
            (b"/v1/files/f-1/content", b"\x00\x01binary", b"application/octet-stream"),
            (b"/v1/chat/completions", b'\n {"model": "gpt-4o-mini"}', b"text/plain"),
        ]:
            head = request_head(b"POST", path, auth, b"Content-Type: " + content_type)
            request = head[:-2] + b"Content-Length: %d\r\n\r\n" % len(body) + body
            await send_raw(proxy.port, request)
        self.assertEqual(
            [r.path for r in fake.requests],
            [b"/v1/chat/completions", b"/v1/batches", b"/v1/files/f-1/content",
             b"/v1/chat/completions"],
        )  # fmt: skip
