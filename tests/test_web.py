"""Tests for oaproxy.web and oaproxy.headers: the resource tree, the body cap,
client auth answers, bodies and headers on their way through, client addresses."""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import IO, Any, ClassVar, cast

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyChannel

from oaproxy.paths import RequestPath, request_path
from oaproxy.relay import BytesProducer
from oaproxy.web import IN_MEMORY_BODY, ProxyRequest
from tests.doubles import Harness, Reply
from tests.payloads import api_path, chat_body, error_body, multipart

CONFIG = """
authorization: {alice: sk-client}
max_body_bytes: 4000000
trusted_proxies: [10.0.0.0/8, "2001:db8::/32"]
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b}
"""

AUTH = (b"Authorization", b"Bearer sk-client")
JSON = (b"Content-Type", b"application/json")
CHAT = chat_body()


class BodyCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG.replace("max_body_bytes: 4000000", "max_body_bytes: 1000"))
        self.made: list[ProxyRequest] = []
        # What each request held of its body when it was rendered.
        self.kept: list[bytes] = []
        made, kept = self.made, self.kept

        class Recorded(ProxyRequest):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                made.append(self)

            def process(self) -> None:
                content = cast(IO[bytes], self.content)
                content.seek(0)
                kept.append(content.read())
                super().process()

        self.h.site.requestFactory = Recorded

    def check_413(self, reply: Reply) -> None:
        self.assertEqual(reply.status, 413)
        self.assertEqual(reply.header(b"content-type"), b"application/json")
        self.assertEqual(
            reply.json(),
            error_body("Request body too large: the limit is 1000 bytes.", "request_too_large"),
        )
        self.assertEqual(self.h.agent.calls, [])
        [request] = self.made
        self.assertTrue(request.too_large)
        self.assertEqual(self.kept, [b""])

    def test_content_length_over_the_cap(self) -> None:
        """A Content-Length over max_body_bytes is answered 413 before any
        upstream is asked, and the body is not kept."""
        client = self.h.request(b"POST", b"/v1/chat/completions", b"x" * 1001, [JSON, AUTH])
        self.check_413(client.reply())

    def test_no_100_continue_for_a_refused_body(self) -> None:
        """A client that expects 100-continue for a body over the cap is not
        invited to send it, and gets the 413."""
        client = self.h.connect()
        client.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 1001\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", client.transport.value())
        client.send(b"x" * 1001)
        self.check_413(client.reply())

    def test_100_continue_within_the_cap(self) -> None:
        """A body within the cap gets its 100 Continue."""
        client = self.h.connect()
        client.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(client.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_chunked_over_the_cap(self) -> None:
        """A chunked body is refused the moment it passes the cap, its spool
        file closed, and answered 413 once it ends."""
        client = self.h.connect()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        client.send(head + b"258\r\n" + b"y" * 600 + b"\r\n")
        [request] = self.made
        self.assertFalse(request.too_large)
        spool = cast(IO[bytes], request.content)
        client.send(b"258\r\n" + b"y" * 600 + b"\r\n")
        self.assertTrue(request.too_large)
        self.assertTrue(spool.closed)
        client.send(b"258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n")
        self.check_413(client.reply())

    def test_at_the_cap(self) -> None:
        """A body of exactly max_body_bytes, plain or chunked, is forwarded whole."""
        for chunked in (False, True):
            h = Harness(CONFIG.replace("max_body_bytes: 4000000", "max_body_bytes: 1000"))
            body = json.dumps({"model": "m", "input": "z" * 973}).encode()
            self.assertEqual(len(body), 1000)
            client = h.request(b"POST", b"/v1/embeddings", body, [JSON, AUTH], chunked=chunked)
            self.assertEqual(h.agent.only().body, body)
            h.agent.only().respond(200, body=b"{}")
            self.assertEqual(client.reply().status, 200)

    def test_unit_content_length(self) -> None:
        """A request told a length over the cap marks itself too large and keeps
        none of the content it is handed."""
        request = self.request()
        request.gotLength(5000)
        request.handleContentChunk(b"z" * 5000)
        self.assertTrue(request.too_large)
        self.assertEqual(cast(BytesIO, request.content).getvalue(), b"")

    def request(self) -> ProxyRequest:
        channel: Any = DummyChannel()
        channel.site = self.h.site
        return ProxyRequest(channel)


class ResourceTreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def test_preflight(self) -> None:
        """A CORS preflight is answered 204 by the proxy itself, allowing the
        asked headers, without an upstream request or a record."""
        client = self.h.request(
            b"OPTIONS",
            b"/v1/chat/completions",
            header_lines=[
                (b"Origin", b"https://app.example"),
                (b"Access-Control-Request-Method", b"POST"),
                (b"Access-Control-Request-Headers", b"authorization, x-stainless-os"),
            ],
        )
        reply = client.reply()
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertEqual(reply.header(b"access-control-allow-origin"), b"*")
        self.assertEqual(
            reply.header(b"access-control-allow-methods"), b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
        )
        self.assertEqual(
            reply.header(b"access-control-allow-headers"), b"authorization, x-stainless-os"
        )
        self.assertIsNone(reply.header(b"content-length"))  # a 204 has no body to measure
        self.assertEqual(reply.header(b"access-control-max-age"), b"86400")
        self.assertEqual(self.h.agent.calls, [])
        self.assertEqual(self.h.records, [])

    def test_preflight_default_headers(self) -> None:
        """A preflight that names no headers is allowed the headers the SDKs send."""
        reply = self.h.request(b"OPTIONS", b"/v1/models").reply()
        self.assertEqual(
            reply.header(b"access-control-allow-headers"),
            b"authorization, content-type, openai-beta",
        )

    def test_healthz(self) -> None:
        """/healthz answers 200 with a JSON status, without a key."""
        reply = self.h.request(b"GET", b"/healthz").reply()
        self.assertEqual((reply.status, reply.json()), (200, {"status": "ok"}))
        self.assertEqual(reply.header(b"content-type"), b"application/json")

    def test_unknown_paths(self) -> None:
        """Paths outside /v1/ get a JSON 404 saying where the API is, and reach no upstream."""
        for path in [b"/", b"/v2/chat/completions", b"/chat/completions", b"/favicon.ico"]:
            reply = self.h.request(b"GET", path, header_lines=[AUTH]).reply()
            self.assertEqual(reply.status, 404, path)
            shown = path.decode()
            self.assertEqual(
                reply.json(),
                error_body(f"Unknown path {shown}; the API is under /v1/.", "not_found"),
                path,
            )
        self.assertEqual(self.h.agent.calls, [])

    def test_401_answers(self) -> None:
        """A missing, non-bearer or wrong key gets OpenAI's 401 with the reason,
        CORS headers included, and reaches no upstream."""
        for lines, message in [
            ([JSON], "authorization header should start with 'Bearer'"),
            (
                [JSON, (b"Authorization", b"Basic eDp5")],
                "authorization header should start with 'Bearer'",
            ),
            ([JSON, (b"Authorization", b"Bearer sk-clienT")], "wrong authorization header"),
        ]:
            reply = self.h.request(b"POST", b"/v1/chat/completions", CHAT, lines).reply()
            self.assertEqual(
                (reply.status, reply.json()), (401, error_body(message, "invalid_api_key"))
            )
            self.assertEqual(reply.header(b"access-control-allow-origin"), b"*")
        self.assertEqual(self.h.agent.calls, [])

    def test_404_model(self) -> None:
        """A model no upstream serves gets OpenAI's model_not_found 404."""
        h = Harness(
            CONFIG.replace("sk: sk-b}", "sk: sk-b, allow: [gpt-4o]}").replace(
                "sk: sk-a}", "sk: sk-a, allow: [gpt-4o]}"
            )
        )
        reply = h.request(b"POST", b"/v1/chat/completions", CHAT, [JSON, AUTH]).reply()
        self.assertEqual(
            (reply.status, reply.json()),
            (
                404,
                error_body(
                    "The model `gpt-4o-mini` does not exist or is not served by this proxy.",
                    "model_not_found",
                    param="model",
                ),
            ),
        )

    def test_query_and_bodiless_get(self) -> None:
        """A GET is forwarded with its query and without a body producer; the
        record keeps the query in its path and has no model."""
        client = self.h.request(b"GET", b"/v1/files?limit=2&after=x", header_lines=[AUTH])
        call = self.h.agent.only()
        self.assertEqual(
            (call.method, call.uri, call.producer),
            (b"GET", b"https://a.test/v1/files?limit=2&after=x", None),
        )
        call.respond(200, body=b'{"data":[]}')
        self.assertEqual(client.reply().body, b'{"data":[]}')
        record = self.h.record()
        self.assertEqual(
            (record["path"], record["model"], record["method"], record["key_name"]),
            ("/v1/files?limit=2&after=x", None, "GET", "alice"),
        )

    def test_204_from_upstream_has_no_length(self) -> None:
        """A 204 from the upstream reaches the client without a Content-Length."""
        client = self.h.request(b"DELETE", b"/v1/files/file-1", header_lines=[AUTH])
        self.h.agent.only().respond(204, content_type=None, body=b"")
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 204 "), raw)
        self.assertNotIn(b"content-length", raw.lower())

    def test_head_keeps_the_upstreams_length(self) -> None:
        """The answer to a HEAD keeps the upstream's Content-Length and has no body."""
        client = self.h.request(b"HEAD", b"/v1/files/file-1/content", header_lines=[AUTH])
        call = self.h.agent.only()
        self.assertEqual(call.method, b"HEAD")
        call.respond(200, body=b"", headers=Headers({b"content-length": [b"1234"]}))
        raw = client.transport.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 1234", head)
        self.assertEqual(rest, b"")


class BodyTests(SynchronousTestCase):
    BOUNDARY = b"----oaproxy-test-boundary"

    def setUp(self) -> None:
        self.h = Harness(
            CONFIG.replace("sk: sk-b}", "sk: sk-b, allow: [/v1/audio/transcriptions]}")
        )

    def send(self, audio: bytes) -> tuple[Any, bytes]:
        body = multipart(
            self.BOUNDARY,
            [
                (b'Content-Disposition: form-data; name="model"', b"whisper-1"),
                (
                    b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                    b"Content-Type: audio/wav",
                    audio,
                ),
            ],
        )
        content_type = b"multipart/form-data; boundary=" + self.BOUNDARY
        client = self.h.request(
            b"POST", b"/v1/audio/transcriptions", body, [(b"Content-Type", content_type), AUTH]
        )
        return client, body

    def test_small_multipart_is_byte_exact(self) -> None:
        """A small multipart upload reaches the upstream byte for byte, with its
        boundary; the record takes the model from the form and the text from the
        answer."""
        audio = bytes(range(256)) * 8 + b"\r\n--" + self.BOUNDARY + b"x\r\n"
        client, body = self.send(audio)
        call = self.h.agent.only()
        self.assertIsInstance(call.producer, BytesProducer)
        self.assertEqual((call.uri, call.body), (b"https://a.test/v1/audio/transcriptions", body))
        self.assertEqual(call.producer.length, len(body))  # type: ignore[union-attr]
        self.assertEqual(
            call.header(b"content-type"), [b"multipart/form-data; boundary=" + self.BOUNDARY]
        )
        call.respond(200, body=b'{"text":"hi"}')
        self.assertEqual(client.reply().body, b'{"text":"hi"}')
        record = self.h.record()
        # Routed by its path; recorded with the form's model and the answer's text.
        self.assertEqual(
            (record["model"], record["bytes_in"], record["response_text"]),
            ("whisper-1", len(body), "hi"),
        )

    def test_large_multipart_streams_from_the_spool_file(self) -> None:
        """Over 1 MiB the body is read from twisted.web's spool file for each
        attempt, by a FileBodyProducer on the cooperator (driven by the clock)."""
        audio = os.urandom(IN_MEMORY_BODY + 12345)
        client, body = self.send(audio)
        first = self.h.agent.only()
        self.assertIsInstance(first.producer, FileBodyProducer)
        self.assertEqual(first.producer.length, len(body))  # type: ignore[union-attr]
        self.assertEqual(first.body, b"")
        self.h.clock.advance(0)
        self.assertTrue(first.body_finished)
        self.assertEqual(first.body, body)
        first.respond(503, body=b"{}")
        # The failover sends the very same bytes again.
        second = self.h.agent.calls[1]
        self.assertEqual(second.uri, b"https://b.test/v1/audio/transcriptions")
        self.h.clock.advance(0)
        self.assertEqual(
            (second.body_finished, len(second.body), second.body == body), (True, len(body), True)
        )
        second.respond(200, body=b'{"text":"ok"}')
        self.assertEqual(client.reply().body, b'{"text":"ok"}')
        self.assertEqual(
            self.h.record()["request_body"],
            {
                "content_type": "multipart/form-data; boundary=" + self.BOUNDARY.decode(),
                "size": len(body),
            },
        )

    def test_early_answer_while_the_body_is_sent(self) -> None:
        """An upstream that answers before reading the whole body may still be
        sent the rest while the next attempt reads the same spool file."""
        audio = os.urandom(IN_MEMORY_BODY * 2)
        client, body = self.send(audio)
        first = self.h.agent.only()
        first.respond(503, body=b"{}")
        second = self.h.agent.calls[1]
        self.h.clock.advance(0)
        self.assertEqual((first.body == body, second.body == body), (True, True))
        second.respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)

    def test_large_json_is_read_for_its_model(self) -> None:
        """A JSON body over the in-memory size is still parsed for its model and
        sent from memory."""
        body = json.dumps({"model": "gpt-4o-mini", "input": "w" * (IN_MEMORY_BODY + 10)}).encode()
        self.h.request(b"POST", b"/v1/embeddings", body, [JSON, AUTH])
        call = self.h.agent.only()
        self.assertIsInstance(call.producer, BytesProducer)
        self.assertEqual(call.body, body)


class HeaderTests(SynchronousTestCase):
    CLIENT_HEADERS: ClassVar[list[tuple[bytes, bytes]]] = [
        JSON,
        AUTH,
        (b"Accept", b"application/json"),
        (b"User-Agent", b"OpenAI/Python 1.50.0"),
        (b"OpenAI-Beta", b"assistants=v2"),
        (b"Idempotency-Key", b"idem-1"),
        (b"X-Stainless-Lang", b"python"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic cHJveHk="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Cookie", b"session=abc"),
        (b"Api-Key", b"azure-key"),
        (b"X-Api-Key", b"anthropic-key"),
        (b"Accept-Encoding", b"gzip, br"),
        (b"Expect", b"100-continue"),
        (b"X-Forwarded-For", b"198.51.100.1, 10.0.0.9"),
    ]

    def forwarded(self, upstream: str, **kwargs: Any) -> Headers:
        h = Harness(
            CONFIG.replace(
                '{name: a, endpoint: "https://a.test/v1", sk: sk-a}',
                '{name: a, endpoint: "https://a.test/v1", ' + upstream + "}",
            )
        )
        h.request(b"POST", b"/v1/chat/completions", CHAT, self.CLIENT_HEADERS, **kwargs)
        return h.agent.only().headers

    def test_without_keep_header(self) -> None:
        """By default the upstream gets only the API's own headers: no
        hop-by-hop or connection-named headers, cookies, other credentials or
        SDK telemetry; its own key, identity encoding, and the peer added to
        X-Forwarded-For."""
        sent = self.forwarded("sk: sk-a", peer="10.1.2.3")
        self.assertEqual(
            sorted((name.lower(), values) for name, values in sent.getAllRawHeaders()),
            [
                (b"accept", [b"application/json"]),
                (b"accept-encoding", [b"identity"]),
                (b"authorization", [b"Bearer sk-a"]),
                (b"content-type", [b"application/json"]),
                (b"idempotency-key", [b"idem-1"]),
                (b"openai-beta", [b"assistants=v2"]),
                (b"user-agent", [b"OpenAI/Python 1.50.0"]),
                (b"x-forwarded-for", [b"198.51.100.1, 10.0.0.9, 10.1.2.3"]),
            ],
        )

    def test_keep_header(self) -> None:
        """With keep_header the client's other headers pass too, but hop-by-hop
        headers, cookies and credentials are still dropped."""
        sent = self.forwarded("sk: sk-a, keep_header: true", peer="203.0.113.5")
        self.assertEqual(
            sorted((name.lower(), values) for name, values in sent.getAllRawHeaders()),
            [
                (b"accept", [b"application/json"]),
                (b"accept-encoding", [b"identity"]),
                (b"authorization", [b"Bearer sk-a"]),
                (b"content-type", [b"application/json"]),
                (b"idempotency-key", [b"idem-1"]),
                (b"openai-beta", [b"assistants=v2"]),
                (b"user-agent", [b"OpenAI/Python 1.50.0"]),
                (b"x-forwarded-for", [b"198.51.100.1, 10.0.0.9, 203.0.113.5"]),
                (b"x-stainless-lang", [b"python"]),
            ],
        )

    def test_authorization(self) -> None:
        """The upstream's Authorization is its sk, the client's own key with sk:
        asis, and none without an sk, whether or not keep_header is set."""
        for upstream, expected in [
            ("sk: sk-a", [b"Bearer sk-a"]),
            ("sk: sk-a, keep_header: true", [b"Bearer sk-a"]),
            ("sk: asis", [b"Bearer sk-client"]),
            ("sk: asis, keep_header: true", [b"Bearer sk-client"]),
            ('sk: ""', None),
            ("keep_header: true", None),
        ]:
            self.assertEqual(
                self.forwarded(upstream).getRawHeaders(b"authorization"), expected, upstream
            )

    def test_no_forwarded_for_from_the_client(self) -> None:
        """A client that sent no X-Forwarded-For is named in a new one."""
        h = Harness(CONFIG)
        h.request(b"POST", b"/v1/chat/completions", CHAT, [JSON, AUTH], peer="192.0.2.44")
        self.assertEqual(h.agent.only().header(b"x-forwarded-for"), [b"192.0.2.44"])

    def test_response_headers(self) -> None:
        """The client gets the upstream's headers less the hop-by-hop ones, with
        a Content-Length of the body relayed and the proxy's own Server and
        Date."""
        h = Harness(CONFIG)
        client = h.request(b"POST", b"/v1/chat/completions", CHAT, [JSON, AUTH])
        upstream = Headers(
            {
                b"Connection": [b"keep-alive, X-Upstream-Hop"],
                b"X-Upstream-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=60"],
                b"Transfer-Encoding": [b"chunked"],
                b"Proxy-Authenticate": [b"Basic"],
                b"Trailer": [b"x-t"],
                b"Upgrade": [b"h2"],
                b"Content-Length": [b"999"],
                b"Date": [b"Mon, 01 Jan 2024 00:00:00 GMT"],
                b"Server": [b"cloudflare"],
                b"X-Request-Id": [b"req-123"],
                b"OpenAI-Processing-Ms": [b"42"],
                b"X-RateLimit-Remaining-Requests": [b"99"],
                b"Set-Cookie": [b"__cf_bm=a", b"b=c"],
            }
        )
        h.agent.only().respond(200, body=b'{"id":"x"}', headers=upstream)
        reply = client.reply()
        self.assertEqual((reply.status, reply.body, reply.complete), (200, b'{"id":"x"}', True))
        names = {name.lower() for name, _ in reply.headers.getAllRawHeaders()}
        for gone in [
            b"connection",
            b"x-upstream-hop",
            b"keep-alive",
            b"transfer-encoding",
            b"proxy-authenticate",
            b"trailer",
            b"upgrade",
        ]:
            self.assertNotIn(gone, names)
        self.assertEqual(reply.header(b"content-length"), b"10")
        self.assertEqual(reply.header(b"server"), b"oaproxy")
        self.assertNotEqual(reply.header(b"date"), b"Mon, 01 Jan 2024 00:00:00 GMT")
        self.assertEqual(reply.header(b"x-request-id"), b"req-123")
        self.assertEqual(reply.header(b"openai-processing-ms"), b"42")
        self.assertEqual(reply.header(b"x-ratelimit-remaining-requests"), b"99")
        self.assertEqual(reply.headers.getRawHeaders(b"set-cookie"), [b"__cf_bm=a", b"b=c"])
        self.assertEqual(reply.header(b"content-type"), b"application/json")


class ClientAddressTests(SynchronousTestCase):
    def client_ip(self, peer: str, forwarded: list[bytes], config: str = CONFIG) -> Any:
        h = Harness(config)
        lines = [JSON, AUTH, *[(b"X-Forwarded-For", value) for value in forwarded]]
        client = h.request(b"POST", b"/v1/chat/completions", CHAT, lines, peer=peer)
        h.agent.only().respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        return h.record()["client_ip"]

    def test_table(self) -> None:
        """The client address comes from X-Forwarded-For only through trusted
        proxies, walked from the right, and stops at the first untrusted or
        unreadable hop."""
        table = [
            # An untrusted peer: its X-Forwarded-For is not believed.
            ("198.51.100.7", [b"203.0.113.9"], "198.51.100.7"),
            ("198.51.100.7", [], "198.51.100.7"),
            # A trusted proxy: the address it saw.
            ("10.1.2.3", [b"203.0.113.9"], "203.0.113.9"),
            ("10.1.2.3", [], "10.1.2.3"),
            # Chains are walked from the right, past trusted proxies only.
            ("10.1.2.3", [b"203.0.113.9, 10.9.9.9"], "203.0.113.9"),
            ("10.1.2.3", [b"6.6.6.6, 203.0.113.9, 10.9.9.9"], "203.0.113.9"),
            ("10.1.2.3", [b"6.6.6.6", b"203.0.113.9,10.9.9.9"], "203.0.113.9"),
            # Every hop trusted: the leftmost.
            ("10.1.2.3", [b"10.0.0.1, 10.9.9.9"], "10.0.0.1"),
            ("10.1.2.3", [b"2001:db8::1"], "2001:db8::1"),
            # Garbage is where the walk stops, never skipped over.
            ("10.1.2.3", [b"6.6.6.6, unknown"], "unknown"),
        ]
        for peer, forwarded, expected in table:
            self.assertEqual(self.client_ip(peer, forwarded), expected, (peer, forwarded))

    def test_default_trusts_loopback_only(self) -> None:
        """Without trusted_proxies only a loopback peer's X-Forwarded-For is believed."""
        config = CONFIG.replace('trusted_proxies: [10.0.0.0/8, "2001:db8::/32"]\n', "")
        self.assertEqual(self.client_ip("127.0.0.1", [b"203.0.113.9"], config), "203.0.113.9")
        self.assertEqual(self.client_ip("10.1.2.3", [b"203.0.113.9"], config), "10.1.2.3")

    def test_record_fields_from_the_request(self) -> None:
        """The record takes its time, address, key name, user agent, method,
        path, model and sizes from the request and its answer."""
        h = Harness(CONFIG)
        client = h.request(
            b"POST",
            b"/v1/chat/completions",
            CHAT,
            [JSON, AUTH, (b"User-Agent", b"ua/1")],
            peer="198.51.100.7",
        )
        h.clock.advance(2)
        h.agent.only().respond(200, body=b'{"id":"x"}')
        client.reply()
        record = h.record()
        self.assertEqual(
            {
                k: record[k]
                for k in [
                    "time",
                    "client_ip",
                    "key_name",
                    "user_agent",
                    "method",
                    "path",
                    "model",
                    "stream",
                    "bytes_in",
                    "bytes_out",
                    "ttfb",
                    "duration",
                ]
            },
            {
                "time": 1_700_000_000.0,
                "client_ip": "198.51.100.7",
                "key_name": "alice",
                "user_agent": "ua/1",
                "method": "POST",
                "path": "/v1/chat/completions",
                "model": "gpt-4o-mini",
                "stream": False,
                "bytes_in": len(CHAT),
                "bytes_out": len(b'{"id":"x"}'),
                "ttfb": 2.0,
                "duration": 2.0,
            },
        )


class ForwardingFailureTests(SynchronousTestCase):
    def test_a_bug_still_answers_the_client(self) -> None:
        """An exception escaping the forwarder becomes a 500, never a hang."""
        h = Harness(CONFIG)

        def broken(*args: Any, **kwargs: Any) -> Any:
            from twisted.internet.defer import fail

            return fail(Failure(RuntimeError("bug")))

        self.patch(h.forwarder, "forward", broken)
        reply = h.request(b"POST", b"/v1/chat/completions", CHAT, [JSON, AUTH]).reply()
        self.assertEqual(
            (reply.status, reply.json()),
            (500, error_body("Internal proxy error.", "internal_error", type="server_error")),
        )
        self.assertEqual(h.record()["outcome"], "error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PathTests(SynchronousTestCase):
    """Routing sees the path decoded and without empty segments; a path that
    climbs is refused, so no path slips past an allow or deny list."""

    DENY_FILES = """
authorization: {alice: sk-client}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a, deny: [/v1/files]}
"""

    def test_route_path(self) -> None:
        """The API path is decoded and without empty segments; paths that
        climb or spell /v1 with escapes are none."""
        self.assertEqual(api_path(b"/v1/models?limit=2"), "/v1/models")
        self.assertEqual(api_path(b"/v1//files/"), "/v1/files")
        self.assertEqual(api_path(b"/v1/%66iles"), "/v1/files")
        self.assertEqual(api_path(b"/v1"), "/v1")
        self.assertIsNone(api_path(b"/v1/../admin"))
        self.assertIsNone(api_path(b"/v1/files/%2e%2e/x"))
        self.assertIsNone(api_path(b"/v1/./models"))
        # The upstream URL is endpoint + the raw bytes after "/v1".
        self.assertIsNone(api_path(b"/%761/chat/completions"))
        self.assertIsNone(api_path(b"/v%31/models"))
        self.assertIsNone(api_path(b"/v1x/models"))

    def test_route_prefix_path(self) -> None:
        """Under a route prefix the same rules hold for what follows it."""
        routes = ["/ollama", "/team/a"]
        self.assertEqual(
            request_path(b"/ollama/v1/chat/completions?x=1", routes),
            RequestPath("/ollama", "/v1/chat/completions", b"/chat/completions?x=1"),
        )
        self.assertEqual(
            request_path(b"/team/a/v1//files", routes),
            RequestPath("/team/a", "/v1/files", b"//files"),
        )
        self.assertEqual(
            request_path(b"/v1/models", routes), RequestPath(None, "/v1/models", b"/models")
        )
        for uri in (
            b"/ollama/v1/../x",
            b"/ollama/%761/models",
            b"/%6Fllama/v1/models",
            b"/ollama/v1x",
            b"/other/v1/models",
            b"/ollama",
        ):
            self.assertIsNone(request_path(uri, routes), uri)

    def test_encoded_v1_never_reaches_an_upstream(self) -> None:
        """A percent-encoded /v1 is answered 400 and reaches no upstream."""
        for path in (b"/%761/chat/completions", b"/v%31/chat/completions", b"/%76%31/models"):
            h = Harness(CONFIG)
            reply = h.request(b"POST", path, CHAT, [JSON, AUTH]).reply()
            self.assertEqual(reply.status, 400, path)
            self.assertEqual(h.agent.calls, [], path)

    def test_denied_path_in_every_spelling(self) -> None:
        """A denied path is denied however it is spelled: doubled slashes,
        percent-encoding, a trailing slash."""
        for path in (b"/v1/files", b"/v1//files", b"/v1/%66iles", b"/v1/files/"):
            h = Harness(self.DENY_FILES)
            reply = h.request(b"GET", path, b"", [AUTH]).reply()
            self.assertEqual(reply.status, 404, path)
            self.assertEqual(h.agent.calls, [], path)

    def test_climbing_path_refused(self) -> None:
        """A path with encoded '..' segments is answered 400, reaches no
        upstream, and is recorded."""
        h = Harness(CONFIG)
        reply = h.request(b"GET", b"/v1/%2e%2e/%2e%2e/admin", b"", [AUTH]).reply()
        self.assertEqual(reply.status, 400)
        self.assertEqual(
            reply.json(),
            error_body(
                "Invalid path: the API is under /v1/, spelled plainly, with no '.' or '..' segments.",
                "invalid_path",
            ),
        )
        self.assertEqual(h.agent.calls, [])
        self.assertEqual(h.record()["status"], 400)


class RefusedUnreadTests(SynchronousTestCase):
    def test_no_key_no_parse(self) -> None:
        """Without a valid key (and no noauth upstream) the body is not parsed."""
        h = Harness(CONFIG)
        parsed: list[bytes] = []
        inspect = h.pipeline.inspect

        def spy(body: Any, content_type: bytes | None) -> Any:
            parsed.append(body.data)
            return inspect(body, content_type)

        self.patch(h.pipeline, "inspect", spy)
        reply = h.request(b"POST", b"/v1/chat/completions", CHAT, [JSON]).reply()
        self.assertEqual(reply.status, 401)
        self.assertEqual(parsed, [None])
        record = h.record()
        self.assertEqual((record["model"], record["bytes_in"]), (None, len(CHAT)))
