"""What a record keeps of the texts a client sent: no secret in any of them,
none longer than ``records.max_field_bytes``. The requests go over a real
socket, as a client would send them."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.harness import (
    CLIENT_KEY,
    SK_MAIN,
    EndToEndCase,
    RawClient,
    RunningProxy,
    reactor,
    upstream,
)
from tests.support import Reply, parse_reply


def request_bytes(path: bytes, body: bytes, headers: dict[bytes, bytes]) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers.items()]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RecordTextCase(EndToEndCase):
    async def send(
        self,
        proxy: RunningProxy,
        payload: Any,
        path: bytes = b"/v1/chat/completions",
        **headers: bytes,
    ) -> Reply:
        """One request with ``headers`` (``_`` in a name is ``-``), the client's key and JSON."""
        head = {
            b"Authorization": b"Bearer " + CLIENT_KEY.encode(),
            b"Content-Type": b"application/json",
        }
        head.update({name.replace("_", "-").encode(): value for name, value in headers.items()})
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client = RawClient(request_bytes(path, body, head), events=2**31)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        await client.lost
        return parse_reply(client.received)


class RedactionTests(RecordTextCase):
    async def test_client_texts_lose_configured_keys(self) -> None:
        """Query string, model, user agent, trusted X-Forwarded-For and a JSON-escaped
        key in the body: the record keeps no secret from any of them."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)], records={"headers": True})
        escaped = SK_MAIN.replace("-", "\\u002d")
        body = (
            b'{"model": "' + CLIENT_KEY.encode() + b'", "messages": [{"role": "user", '
            b'"content": "my key is ' + escaped.encode() + b'"}]}'
        )
        reply = await self.send(
            proxy,
            body,
            path=b"/v1/chat/completions?api_key=" + CLIENT_KEY.replace("-", "%2D").encode(),
            User_Agent=b"agent/1 " + SK_MAIN.encode(),
            X_Forwarded_For=CLIENT_KEY.encode(),
        )
        self.assertEqual(reply.status, 200)
        record = await proxy.records.nth(1)
        stored = json.dumps(record)
        for secret in (CLIENT_KEY, SK_MAIN, CLIENT_KEY.replace("-", "%2D"), escaped):
            self.assertNotIn(secret, stored)
        self.assertEqual(
            (record["path"], record["model"], record["user_agent"], record["client_ip"]),
            (
                "/v1/chat/completions?api_key=[redacted]",
                "[redacted]",
                "agent/1 [redacted]",
                "[redacted]",
            ),
        )
        self.assertIn("my key is [redacted]", record["request_body"])
