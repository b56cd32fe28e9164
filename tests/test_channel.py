"""Client connections (``oaproxy.channel``, ``ProxySite``): deadlines for the
request head and the body's rate, the cap on open connections; on the real
site with an in-memory transport and a ``Clock``."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import Client, Harness, parse_reply
from tests.payloads import http_request

CONFIG = """
authorization: {alice: sk-client}
header_timeout: 5
body_min_rate: 100
body_rate_window: 2
max_connections: 3
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

AUTH = (b"Authorization", b"Bearer sk-client")
HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-client\r\n"


def sample(h: Harness, name: str, **labels: str) -> float | None:
    value: float | None = h.shared.metrics.registry.get_sample_value(name, labels)
    return value


class HeadDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def check_408(self, client: Client) -> None:
        reply = parse_reply(client.written)
        self.assertEqual((reply.status, reply.header(b"connection")), (408, b"close"))
        self.assertEqual(reply.json()["error"]["code"], "request_timeout")
        self.assertTrue(client.transport.disconnecting)

    def test_a_head_sent_slowly_is_cut_off(self) -> None:
        """A byte every second keeps Twisted's idle timer alive; not the head's deadline."""
        client = self.h.connect()
        for byte in HEAD[:4]:
            client.send(bytes([byte]))
            self.h.clock.advance(1)
        self.assertFalse(client.transport.disconnecting)
        client.send(HEAD[4:5])
        self.h.clock.advance(1)
        self.check_408(client)
        self.assertEqual(sample(self.h, "oaproxy_connections_closed_total", reason="slow_head"), 1)
        self.assertEqual(self.h.agent.calls, [])

    def test_a_silent_connection_is_cut_off(self) -> None:
        """The first head is due header_timeout after the connection opens."""
        client = self.h.connect()
        self.h.clock.advance(5)
        self.check_408(client)

    def test_the_next_head_is_due_from_its_first_byte(self) -> None:
        """Between requests a connection may idle; the next head is due from its first byte."""
        client = self.h.connect()
        # /v1/files: forwarded (oaproxy answers /v1/models itself, from a kept list).
        client.send(http_request(b"GET", b"/v1/files", header_lines=[AUTH]))
        self.h.agent.only().respond(200, body=b"{}")
        self.h.clock.advance(30)
        self.assertFalse(client.transport.disconnecting)
        client.send(b"GET /v1/fi")
        self.h.clock.advance(4)
        client.send(b"les HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-client\r\n\r\n")
        self.assertEqual(len(self.h.agent.calls), 2)
        self.h.clock.advance(10)
        self.assertFalse(client.transport.disconnecting)

    def test_pipelined_requests_have_their_deadlines(self) -> None:
        """Pipelined requests are read in turn; a half head after them is cut off."""
        client = self.h.connect()
        request = http_request(b"GET", b"/v1/files", header_lines=[AUTH])
        client.send(request + request + b"GET /v1/files HTTP/1.1\r\n")
        self.h.agent.only().respond(200, body=b"{}")
        self.h.agent.calls[1].respond(200, body=b"{}")
        self.h.clock.advance(5)
        self.assertTrue(client.transport.disconnecting)
        self.assertIn(b"HTTP/1.1 408 Request Timeout", client.written)


class BodyRateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def start(self, length: int) -> Client:
        client = self.h.connect()
        client.send(HEAD + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
        return client

    def test_a_body_below_the_rate_is_cut_off(self) -> None:
        """100 bytes/s over 2 s asks for 200 bytes in each window; 150 is too few."""
        client = self.start(10000)
        client.send(b"x" * 150)
        self.h.clock.advance(2)
        reply = parse_reply(client.written)
        self.assertEqual(reply.status, 408)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(sample(self.h, "oaproxy_connections_closed_total", reason="slow_body"), 1)
        self.assertEqual(self.h.agent.calls, [])
        self.assertEqual(self.h.records, [])

    def test_each_window_must_reach_the_rate(self) -> None:
        """Every window of the body must reach the rate, not just the average so far."""
        client = self.start(10000)
        for _ in range(3):
            client.send(b"x" * 200)
            self.h.clock.advance(2)
        self.assertFalse(client.transport.disconnecting)
        client.send(b"x" * 199)
        self.h.clock.advance(2)
        self.assertTrue(client.transport.disconnecting)

    def test_a_whole_body_stops_the_clock(self) -> None:
        """Once the body is whole, however long the answer takes, no rate applies."""
        body = b'{"model": "m", "input": "hi"}'
        client = self.start(len(body))
        client.send(body)
        self.h.clock.advance(60)
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(len(self.h.agent.calls), 1)

    def test_a_request_read_whole_starts_no_deadline(self) -> None:
        """A head and body that come in one read need neither deadline: no
        timer is started for them; a body left unfinished by a read has its
        rate check from then on."""
        client = self.h.connect()
        started: list[str] = []
        call_later = client.protocol.callLater

        def recorded(delay: float, f: Any, *args: object) -> Any:
            started.append(f.__name__)
            return call_later(delay, f, *args)

        client.protocol.callLater = recorded
        body = b'{"model": "m", "input": "hi"}'
        client.send(
            HEAD
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        self.assertEqual(len(self.h.agent.calls), 1)
        self.assertNotIn("_slow_head", started)
        self.assertNotIn("_body_rate", started)
        self.h.agent.only().respond(200, body=b"{}")
        client.send(HEAD + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        self.assertEqual(started.count("_body_rate"), 1)
        self.assertNotIn("_slow_head", started)
        self.h.clock.advance(2)
        self.assertTrue(client.transport.disconnecting)

    def test_chunked_bodies_too(self) -> None:
        """A chunked body is held to the same rate."""
        client = self.h.connect()
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n")
        self.h.clock.advance(2)
        self.assertTrue(client.transport.disconnecting)


class ConnectionCapTests(SynchronousTestCase):
    def test_connections_over_the_cap_are_closed_at_once(self) -> None:
        """Past max_connections no protocol is built (the socket is closed), and it is counted."""
        h = Harness(CONFIG)
        clients = [h.connect() for _ in range(3)]
        address = IPv4Address("TCP", "10.9.9.9", 1234)
        self.assertIsNone(h.site.buildProtocol(address))
        self.assertEqual(sample(h, "oaproxy_connections_refused_total"), 1)
        self.assertEqual(sample(h, "oaproxy_connections_open"), 3)
        clients[0].disconnect()
        self.assertIsNotNone(h.site.buildProtocol(address))
        self.assertEqual(sample(h, "oaproxy_connections_open"), 2)


class AddressTests(SynchronousTestCase):
    def test_asked_once_per_connection(self) -> None:
        """The connection's addresses are asked of the transport once, however
        many requests it carries; each request sees them."""
        h = Harness(CONFIG)
        client = h.connect("10.9.8.7")
        asked: list[str] = []
        transport = client.transport
        get_host, get_peer = transport.getHost, transport.getPeer

        def host() -> Any:
            asked.append("host")
            return get_host()

        def peer() -> Any:
            asked.append("peer")
            return get_peer()

        transport.getHost, transport.getPeer = host, peer  # type: ignore[method-assign]
        for _ in range(3):
            client.send(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(client.written.count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual(sorted(asked), ["host", "peer"])
        request: Any = h.site.requestFactory(client.protocol)
        self.assertEqual(request.getClientAddress(), IPv4Address("TCP", "10.9.8.7", 40000))
        self.assertEqual(request.getHost(), IPv4Address("TCP", "127.0.0.1", 8888))
