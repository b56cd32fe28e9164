"""The bytes of answers' heads on the wire, whole: names, values and their
order, for each kind of answer (a relayed upstream answer, oaproxy's own
error, a stream's head, /healthz, the admin API). ``Date`` is the one value
that moves; its line is checked on its own."""

from __future__ import annotations

import re
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from oaproxy.admin.resource import AdminResource
from tests.doubles import Harness

CONFIG = """
authorization: {alice: sk-client}
limits:
  backend: memory
  per_key: "1000/minute"
cache:
  backend: memory
  default: true
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

_DATE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")
AUTH = (b"Authorization", b"Bearer sk-client")


def head_of(written: bytes) -> tuple[bytes, bytes]:
    """The head with its Date value put as ``<date>``, and that value."""
    head = written.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    found = _DATE.search(head)
    assert found is not None, head
    return _DATE.sub(b"\r\nDate: <date>\r\n", head, count=1), found.group(1)


class AnswerHeadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)
        # A time whose second is not a whole one: Date is of its second.
        self.h.clock.advance(1_700_000_000.75)

    def head(self, written: bytes) -> bytes:
        head, date = head_of(written)
        self.assertEqual(date, datetimeToString(1_700_000_000))
        return head

    def test_relayed_answer(self) -> None:
        """An upstream's answer: Server and Date first, the upstream's own
        headers (the proxy's replacing those of the same name where they
        stand), then the proxy's."""
        client = self.h.chat()
        upstream = Headers(
            {
                b"X-Request-Id": [b"req-1"],
                b"Set-Cookie": [b"a=b"],
                b"X-Ratelimit-Remaining-Requests": [b"5"],
                b"X-Oaproxy-Upstream": [b"further"],
                b"Openai-Processing-Ms": [b"42"],
                b"Server": [b"upstream"],
            }
        )
        self.h.agent.only().respond(200, body=b'{"id":"x"}', headers=upstream)
        self.assertEqual(
            self.head(client.written),
            b"HTTP/1.1 200 OK\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"X-Request-Id: req-1\r\n"
            b"X-Ratelimit-Remaining-Requests: 999\r\n"
            b"X-Oaproxy-Upstream: a\r\n"
            b"Openai-Processing-Ms: 42\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 10\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Access-Control-Expose-Headers: x-oaproxy-upstream\r\n"
            b"X-Ratelimit-Limit-Requests: 1000\r\n"
            b"X-Ratelimit-Reset-Requests: 1m0s\r\n"
            b"X-Oaproxy-Cache: miss\r\n\r\n",
        )

    def test_error_answer(self) -> None:
        """oaproxy's own refusal (no key)."""
        client = self.h.chat(key=None)
        self.assertEqual(
            self.head(client.written),
            b"HTTP/1.1 401 Unauthorized\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 148\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Access-Control-Expose-Headers: x-oaproxy-upstream\r\n\r\n",
        )

    def test_stream_head(self) -> None:
        """A stream's head: chunked, as twisted.web frames it."""
        client = self.h.chat(stream=True)
        response = self.h.agent.only().respond(200, b"text/event-stream")
        response.write(b'data: {"choices":[]}\n\n')
        self.assertEqual(
            self.head(client.written),
            b"HTTP/1.1 200 OK\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"X-Oaproxy-Upstream: a\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Access-Control-Expose-Headers: x-oaproxy-upstream\r\n"
            b"X-Ratelimit-Limit-Requests: 1000\r\n"
            b"X-Ratelimit-Remaining-Requests: 999\r\n"
            b"X-Ratelimit-Reset-Requests: 1m0s\r\n"
            b"X-Oaproxy-Cache: miss\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        )

    def test_healthz(self) -> None:
        client = self.h.request(b"GET", b"/healthz")
        head, _ = head_of(client.written)
        self.assertEqual(
            re.sub(rb"TwistedWeb/[^\r]*", b"TwistedWeb/<version>", head),
            b"HTTP/1.1 200 OK\r\n"
            b"Server: TwistedWeb/<version>\r\n"
            b"Date: <date>\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 16\r\n\r\n",
        )

    def test_admin(self) -> None:
        """The admin API's answers: its own Server, no-store."""
        host = SimpleNamespace(
            generation=SimpleNamespace(config=SimpleNamespace(admin_key="k")),
            shared=SimpleNamespace(environ={}, wall_clock=lambda: 0.0),
        )
        self.h.generation.root.putChild(b"admin", AdminResource(host))
        refused = self.h.request(b"GET", b"/admin/upstreams", header_lines=[AUTH])
        self.assertEqual(
            self.head(refused.written),
            b"HTTP/1.1 401 Unauthorized\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Cache-Control: no-store\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 116\r\n\r\n",
        )
        sent = self.h.request(b"GET", b"/admin/")
        self.assertEqual(
            self.head(sent.written),
            b"HTTP/1.1 303 See Other\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Cache-Control: no-store\r\n"
            b"Location: /admin/ui/\r\n"
            b"Content-Length: 0\r\n\r\n",
        )

    def test_preflight(self) -> None:
        """A 204 of oaproxy's own: no length, no type."""
        client = self.h.request(b"OPTIONS", b"/v1/models", header_lines=[(b"Origin", b"https://a")])
        self.assertEqual(
            self.head(client.written),
            b"HTTP/1.1 204 No Content\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Access-Control-Expose-Headers: x-oaproxy-upstream\r\n"
            b"Access-Control-Allow-Methods: GET, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
            b"Access-Control-Allow-Headers: authorization, content-type, openai-beta\r\n"
            b"Access-Control-Max-Age: 86400\r\n\r\n",
        )

    def test_date_follows_the_clock(self) -> None:
        """Date is the site's clock's second, made anew when it has moved on."""
        first = self.h.request(b"GET", b"/healthz")
        self.h.clock.advance(0.2)
        same = self.h.request(b"GET", b"/healthz")
        self.h.clock.advance(0.1)
        later = self.h.request(b"GET", b"/healthz")
        dates = [head_of(c.written)[1] for c in (first, same, later)]
        self.assertEqual(
            dates,
            [datetimeToString(1_700_000_000)] * 2 + [datetimeToString(1_700_000_001)],
        )

    def test_upstream_value_cannot_split_the_head(self) -> None:
        """CR and LF in an upstream's header value become spaces: no line of
        the upstream's making reaches the head."""
        client = self.h.chat()
        upstream = Headers()
        # As a raw parser would hand them over, unsanitized.
        raw = {b"X-Note": [b"a\r\nSet-Cookie: stolen=1\r\n\r\nbody", b"b\rc\nd"]}
        upstream._rawHeaders = raw
        self.h.agent.only().respond(200, body=b"{}", headers=upstream)
        head = self.head(client.written)
        self.assertIn(b"\r\nX-Note: a Set-Cookie: stolen=1  body\r\nX-Note: b c d\r\n", head)
        self.assertNotIn(b"\r\nSet-Cookie", head)
        self.assertEqual(client.reply().body, b"{}")

    def test_head_requests(self) -> None:
        """HEAD: the head GET would have, without a body (twisted.web's
        faked HEAD for /healthz; the upstream's length for a forwarded one)."""
        health = self.h.request(b"HEAD", b"/healthz")
        self.assertTrue(health.written.endswith(b"Content-Length: 16\r\n\r\n"))
        client = self.h.request(b"HEAD", b"/v1/files", header_lines=[AUTH])
        upstream = Headers({b"Content-Length": [b"7"]})
        self.h.agent.only().respond(200, body=b"", headers=upstream)
        self.assertEqual(
            self.head(client.written),
            b"HTTP/1.1 200 OK\r\n"
            b"Server: oaproxy\r\n"
            b"Date: <date>\r\n"
            b"Content-Type: application/json\r\n"
            b"X-Oaproxy-Upstream: a\r\n"
            b"Content-Length: 7\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Access-Control-Expose-Headers: x-oaproxy-upstream\r\n"
            b"X-Ratelimit-Limit-Requests: 1000\r\n"
            b"X-Ratelimit-Remaining-Requests: 999\r\n"
            b"X-Ratelimit-Reset-Requests: 1m0s\r\n\r\n",
        )
        self.assertTrue(client.written.endswith(b"\r\n\r\n"))
