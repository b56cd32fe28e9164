"""Repeated log lines are rate-limited: one line, then one with a count per
interval (``oaproxy.logthrottle``), whatever many clients or one broken
upstream do."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.logthrottle import RepeatLimit
from tests.live import EndToEndCase, reactor
from tests.payloads import CLIENT_KEY, raw_chat_request, upstream
from tests.test_hostile_clients import send_raw


class RepeatLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: list[dict[str, Any]] = []
        self.limit = RepeatLimit(cast(ILogObserver, self.seen.append), self.clock, interval=60)
        self.log = Logger(namespace="test", observer=self.limit)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.seen]

    def test_first_then_a_count_per_interval(self) -> None:
        """1000 lines of one kind in a minute are two: the first, and a count."""
        for n in range(1000):
            self.log.info("client {n} timed out", n=n)
        self.log.warn("another kind")
        self.assertEqual(self.lines(), ["client 0 timed out", "another kind"])
        self.clock.advance(60)
        self.assertEqual(
            self.lines()[2:], ["999 more like this in the last 60s: client {n} timed out"]
        )
        self.assertEqual(self.seen[2]["log_level"], LogLevel.info)
        # The next interval starts with a line of its own.
        self.log.info("client {n} timed out", n=1000)
        self.assertEqual(self.lines()[3:], ["client 1000 timed out"])
        self.clock.advance(60)
        self.assertEqual(len(self.seen), 4)

    def test_flush_says_what_is_held(self) -> None:
        """At stop the counts held back are said at once, and no timer is left."""
        for _ in range(3):
            self.log.info("same")
        self.limit.flush()
        self.assertEqual(self.lines(), ["same", "2 more like this in the last 60s: same"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Idle(Protocol):
    """A client that connects, says nothing, and waits to be closed."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class _Processing(Protocol):
    """An upstream that answers with 20,000 ``102 Processing`` heads, then 200."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.transport is not None:
            body = b'{"id":"x"}'
            self.transport.write(
                b"HTTP/1.1 102 Processing\r\n\r\n" * 20000
                + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )


class LiveLogTests(EndToEndCase):
    def collect(self) -> list[str]:
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            line = formatEvent(event)
            # The test's own client connections are no business of the daemon.
            if "OneShotFactory" not in line:
                lines.append(line)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return lines

    async def test_idle_connections_timing_out_write_two_lines(self) -> None:
        """30 idle client connections timed out: one line, and one with the count."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        proxy.service.site.timeOut = 0.2
        lines = self.collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        clients = [_Idle() for _ in range(30)]
        for client in clients:
            await connectProtocol(endpoint, client)
        await DeferredList([client.closed for client in clients])
        timeouts = [line for line in lines if "idle" in line or "Timing out" in line]
        self.assertEqual(timeouts, ["closing client connections idle too long, such as 127.0.0.1"])
        await proxy.service.stopService()
        self.assertIn(
            "29 more like this in the last 60s:"
            " closing client connections idle too long, such as {peer}",
            lines,
        )

    async def test_informational_flood_writes_nothing(self) -> None:
        """An upstream's 20,000 102 Processing heads are skipped without a line."""
        factory = Factory.forProtocol(_Processing)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"http://127.0.0.1:{port.getHost().port}/v1"
        proxy = await self.proxy([upstream("main", endpoint)])
        lines = self.collect()
        request = raw_chat_request({"model": "m", "messages": []}, CLIENT_KEY)
        request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        reply = await send_raw(proxy.port, request)
        self.assertEqual((reply.status, reply.body), (200, b'{"id":"x"}'))
        self.assertEqual(lines, [])
