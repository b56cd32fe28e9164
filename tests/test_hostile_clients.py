"""What a hostile client tries, on a real socket against the running service:
methods the API does not use."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.harness import CLIENT_KEY, SK_MAIN, EndToEndCase, RawClient, reactor, upstream
from tests.support import Reply, parse_reply


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
        """TRACE and CONNECT get 405 with Allow; the upstream (which would echo
        its own key back) sees no request at all."""
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
            await send_raw(proxy.port, request_head(method, b"/v1/models", auth))
        self.assertEqual([r.method for r in fake.requests], [b"GET", b"DELETE", b"HEAD"])
