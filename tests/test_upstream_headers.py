"""What an upstream's response headers may carry to the client, on real
sockets: headers named in ``Connection`` never, ``Set-Cookie`` only with
``keep_header``, its CORS headers never (CORS is oaproxy's)."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol

from tests.live import EndToEndCase, reactor
from tests.payloads import CLIENT_KEY, proxy_config, raw_chat_request, upstream
from tests.test_hostile_clients import send_raw

HOP_HEADERS = (
    b"Connection: keep-alive, X-Upstream-Hop\r\n"
    b"X-Upstream-Hop: secret-route\r\n"
    b"Keep-Alive: timeout=60\r\n"
    b"Set-Cookie: __cf_bm=tracking; Path=/\r\n"
    b"X-Request-Id: req-1\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
)


def canned(content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n" + HOP_HEADERS
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


class _Canned(Protocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.seen = b""

    def dataReceived(self, data: bytes) -> None:
        self.seen += data
        if b"\r\n\r\n" in self.seen and self.transport is not None:
            self.transport.write(self.answer)
            self.seen = b""


class CannedUpstream(Factory):
    """Answers every request on its connections with the same bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def buildProtocol(self, addr: Any) -> _Canned:
        return _Canned(self.answer)


class UpstreamHeaderTests(EndToEndCase):
    def canned(self, answer: bytes) -> str:
        port = reactor.listenTCP(0, CannedUpstream(answer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/v1"

    async def ask(self, answer: bytes, keys: bool = True, **more: Any) -> Any:
        upstreams = [upstream("main", self.canned(answer), **more)]
        if keys:
            proxy = await self.proxy(upstreams)
        else:
            config = proxy_config("keyless", {}, upstreams)
            proxy = await self.start_proxy(config, self.mktemp() + ".yaml")
        request = raw_chat_request({"model": "m", "messages": []}, CLIENT_KEY)
        request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        return await send_raw(proxy.port, request)

    async def test_connection_named_headers_and_cookies_stay_behind(self) -> None:
        """What Connection names, Keep-Alive and Set-Cookie stay behind; the rest passes."""
        for answer in (
            canned(b"application/json", b'{"id":"x"}'),
            canned(b"text/event-stream", b'data: {"id":"x"}\n\ndata: [DONE]\n\n'),
        ):
            reply = await self.ask(answer)
            self.assertEqual(reply.status, 200)
            names = {name.lower() for name, _ in reply.headers.getAllRawHeaders()}
            self.assertNotIn(b"x-upstream-hop", names)
            self.assertNotIn(b"keep-alive", names)
            self.assertNotIn(b"set-cookie", names)
            self.assertEqual(reply.header(b"x-request-id"), b"req-1")
            # The proxy needs a key: any page may read, as oaproxy itself says.
            self.assertEqual(reply.header(b"access-control-allow-origin"), b"*")

    async def test_keep_header_passes_cookies(self) -> None:
        """With keep_header the upstream's cookies are the client's business."""
        reply = await self.ask(canned(b"application/json", b"{}"), keep_header=True)
        self.assertEqual(reply.header(b"set-cookie"), b"__cf_bm=tracking; Path=/")
        self.assertIsNone(reply.header(b"x-upstream-hop"))

    async def test_keyless_proxy_lets_no_page_read(self) -> None:
        """A keyless proxy sends no CORS header, whatever the upstream says."""
        reply = await self.ask(canned(b"application/json", b"{}"), keys=False)
        self.assertEqual(reply.status, 200)
        self.assertIsNone(reply.header(b"access-control-allow-origin"))
