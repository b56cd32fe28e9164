"""Client requests read by llhttp (``oaproxy.requestparser`` in
``oaproxy.channel``): what twisted.web's reading did, on the real site with
an in-memory transport; the limits on a head, pipelining, bodies, and the
heads that are not read."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import Client, Harness
from tests.payloads import http_request

CONFIG = """
authorization: {alice: sk-client}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

AUTH = (b"Authorization", b"Bearer sk-client")
FILES = http_request(b"GET", b"/v1/files", header_lines=[AUTH])
BAD = b"HTTP/1.1 400 Bad Request\r\n\r\n"
EMBED = b'{"model": "m", "input": "hi"}'


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def check_400(self, client: Client) -> None:
        self.assertEqual(client.written, BAD)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.h.agent.calls, [])

    def test_head_over_the_size_limit(self) -> None:
        """A head over twisted.web's 16 KiB is refused; one just under is read."""
        under = http_request(b"GET", b"/v1/files", header_lines=[AUTH, (b"X-Pad", b"a" * 16000)])
        self.assertLess(len(under), 16384)
        self.h.connect().send(under)
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.agent.calls.clear()
        over = [AUTH, (b"X-Pad", b"a" * 8000), (b"X-More", b"b" * 8400)]
        self.check_400(self.h.request(b"GET", b"/v1/files", header_lines=over))

    def test_endless_header_value(self) -> None:
        """A header value that never ends is refused once past the limit,
        whatever the reads it comes in: nothing holds it unbounded."""
        client = self.h.connect()
        client.send(b"GET /v1/files HTTP/1.1\r\nX-Endless: ")
        for _ in range(20):
            client.send(b"a" * 1000)
        self.check_400(client)

    def test_too_many_headers(self) -> None:
        """Over 500 headers: refused, as twisted.web's maxHeaders."""
        lines = [AUTH] + [(b"X-H%d" % i, b"v") for i in range(500)]
        self.check_400(self.h.request(b"GET", b"/v1/files", header_lines=lines))

    def test_unreadable_heads(self) -> None:
        """Heads twisted.web refused, and those llhttp reads more strictly."""
        for head in [
            b"GET /v1/files HTTP/1.1\r\nBad Name: a\r\n\r\n",
            b"GET /v1/files HTTP/2.0\r\n\r\n",
            b"GET /v1/files HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
            b"GET /v1/files HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            b"POST /v1/files HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST /v1/files HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /v1/files now HTTP/1.1\r\n\r\n",
            b"G(T /v1/files HTTP/1.1\r\n\r\n",
        ]:
            client = self.h.connect()
            client.send(head)
            self.assertEqual(client.written, BAD, head)
            self.assertTrue(client.transport.disconnecting, head)
        self.assertEqual(self.h.agent.calls, [])

    def test_empty_lines_before_a_request(self) -> None:
        """Two are ignored, as twisted.web ignored one; a flood of them is
        refused at once, never held or read again (it grew with each read)."""
        client = self.h.connect()
        client.send(b"\r\n\r\n" + FILES)
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.agent.calls.clear()
        flood = self.h.connect()
        flood.send(b"\r\n\r\n")
        self.assertEqual(flood.written, b"")
        flood.send(b"\n")
        self.check_400(flood)
        big = self.h.connect()
        big.send(b"\r\n" * 40000)
        self.check_400(big)

    def test_endless_trailer(self) -> None:
        """A chunked body's trailer (or any framing) over 64 KiB between two
        body bytes is refused, whatever the reads: llhttp would hold it whole."""
        client = self.h.connect()
        client.send(
            b"POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer sk-client\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-Trailer: " % (len(EMBED), EMBED)
        )
        for _ in range(70):
            client.send(b"t" * 1024)
        self.check_400(client)

    def test_many_small_chunks_are_a_body(self) -> None:
        """Framing is counted only between body bytes: a body of many tiny
        chunks, far more framing than 64 KiB in all, is read whole."""
        body = json.dumps({"model": "m", "input": "x" * 30000}).encode()
        chunks = b"".join(
            b"1;pad=%s\r\n%s\r\n" % (b"p" * 8, body[i : i + 1]) for i in range(len(body))
        )
        client = self.h.connect()
        client.send(
            b"POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer sk-client\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        self.assertGreater(len(chunks) - len(body), 64 * 1024)
        self.assertEqual(self.h.agent.only().body, body)

    def test_requests_read_ahead_are_bounded(self) -> None:
        """Past 16 requests read and not answered yet (pipelined), the
        client gets the answers to those, then 400: what is read ahead is
        events and objects many times its size."""
        client = self.h.connect()
        health = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
        client.send(FILES + health * 100)
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.agent.only().respond(200, body=b"{}")
        self.assertEqual(client.written.count(b"HTTP/1.1 200 OK"), 16)
        self.assertTrue(client.written.endswith(BAD))
        self.assertTrue(client.transport.disconnecting)

    def test_head_size_whatever_the_reads(self) -> None:
        """A head under the limit is read however it is cut: its line ends,
        counted in the reads, are not counted against it."""
        lines = [AUTH] + [(b"X-H%03d" % i, b"v" * 155) for i in range(100)]
        head = http_request(b"GET", b"/v1/files", header_lines=lines)
        self.assertLess(len(head) - 2 * (len(lines) + 2), 16384)
        self.assertGreater(len(head), 16384)
        client = self.h.connect()
        for part in (head[:10], head[10:-2], head[-2:]):
            client.send(part)
        self.assertEqual(len(self.h.agent.calls), 1)


class ReadingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def test_headers_as_twisted_read_them(self) -> None:
        """Names in canonical case, values without surrounding blanks, repeats kept."""
        client = self.h.connect()
        client.send(
            b"POST /v1/embeddings HTTP/1.1\r\nauthorization:   Bearer sk-client  \r\n"
            b"content-type: application/json\t\r\nAccept: a\r\naccept: b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(EMBED) + EMBED
        )
        call = self.h.agent.only()
        self.assertEqual(call.header(b"content-type"), [b"application/json"])
        self.assertEqual(call.header(b"authorization"), [b"Bearer sk-a"])
        self.assertEqual(call.header(b"accept"), [b"a", b"b"])
        self.assertEqual(call.body, EMBED)
        call.respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)

    def test_method_in_pieces(self) -> None:
        """A method llhttp does not know, sent a byte at a time, is the API's
        to refuse (405, recorded with the method sent)."""
        client = self.h.connect()
        for byte in http_request(b"get", b"/v1/files", header_lines=[AUTH]):
            client.send(bytes([byte]))
        reply = client.reply()
        self.assertEqual(reply.status, 405)
        self.assertEqual(self.h.records[0].method, "get")

    def test_chunked_body_with_trailer(self) -> None:
        """A chunked body reaches the upstream unframed; its trailer is dropped."""
        body = json.dumps({"model": "m", "input": "hello"}).encode()
        client = self.h.connect()
        client.send(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-client\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (5, body[:5])
            + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
            + b"0\r\nX-Trailer: t\r\n\r\n"
        )
        call = self.h.agent.only()
        self.assertEqual(call.body, body)
        self.assertIsNone(call.header(b"x-trailer"))
        call.respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)

    def test_expect_100_continue(self) -> None:
        """Told at the head, before the body is sent."""
        client = self.h.connect()
        client.send(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-client\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(EMBED)
        )
        self.assertEqual(client.written, b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(EMBED)
        self.assertEqual(self.h.agent.only().body, EMBED)

    def test_pipelined_requests_in_turn(self) -> None:
        """Requests sent together are read one at a time: the next begins
        once the one before is answered."""
        client = self.h.connect()
        client.send(FILES + FILES + b"\r\n" + FILES)
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.agent.calls[0].respond(200, body=b'{"n":1}')
        self.assertEqual(len(self.h.agent.calls), 2)
        self.h.agent.calls[1].respond(200, body=b'{"n":2}')
        self.h.agent.calls[2].respond(200, body=b'{"n":3}')
        self.assertEqual(client.written.count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual(client.written.rsplit(b"\r\n\r\n", 1)[1], b'{"n":3}')

    def test_answered_at_once_then_the_next(self) -> None:
        """Requests answered without waiting (/healthz) are each read and answered."""
        client = self.h.connect()
        health = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
        client.send(health * 5 + FILES)
        self.assertEqual(client.written.count(b"HTTP/1.1 200 OK"), 5)
        self.assertEqual(len(self.h.agent.calls), 1)

    def test_pipelined_bytes_past_a_little_pause_the_client(self) -> None:
        """While a request is answered, the client is read no further past
        16 KiB of what it sent meanwhile (twisted.web's rule); then on."""
        client = self.h.connect()
        client.send(FILES)
        body = json.dumps({"model": "m", "input": "x" * 20000}).encode()
        client.send(http_request(b"POST", b"/v1/embeddings", body, [AUTH]))
        self.assertEqual(client.transport.producerState, "paused")
        self.h.agent.only().respond(200, body=b"{}")
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(self.h.agent.calls[1].body, body)

    def test_http_1_0_closes_and_reads_no_more(self) -> None:
        """An HTTP/1.0 request's answer ends the connection; what follows is not read."""
        client = self.h.connect()
        client.send(http_request(b"GET", b"/v1/files", header_lines=[AUTH]).replace(b"1.1", b"1.0"))
        client.send(FILES)
        self.h.agent.only().respond(200, body=b"{}")
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(len(self.h.agent.calls), 1)

    def test_connect_then_more(self) -> None:
        """CONNECT (which llhttp would take as the end of HTTP) is refused by
        the API, and the requests after it are read as ever."""
        client = self.h.connect()
        connect = http_request(b"CONNECT", b"/v1/chat/completions", header_lines=[AUTH])
        client.send(connect + FILES)
        self.assertIn(b"HTTP/1.1 405 Method Not Allowed", client.written)
        self.assertEqual(len(self.h.agent.calls), 1)
