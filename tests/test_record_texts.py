"""What a record keeps of the texts a client sent: no secret in any of them,
none longer than ``records.max_field_bytes``. The requests go over a real
socket, as a client would send them."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import Harness, Reply, parse_reply
from tests.live import EndToEndCase, RawClient, RunningProxy, reactor
from tests.payloads import (
    CHAT_ANSWER,
    CLIENT_KEY,
    SK_MAIN,
    bearer,
    http_request,
    multipart,
    upstream,
)


class RecordTextCase(EndToEndCase):
    async def send(
        self,
        proxy: RunningProxy,
        payload: Any,
        path: bytes = b"/v1/chat/completions",
        **headers: bytes,
    ) -> Reply:
        """One request with ``headers`` (``_`` in a name is ``-``), the client's key and JSON."""
        head = dict([bearer(CLIENT_KEY), (b"Content-Type", b"application/json")])
        head.update({name.replace("_", "-").encode(): value for name, value in headers.items()})
        head[b"Connection"] = b"close"
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request = http_request(b"POST", path, body, head.items(), host=b"127.0.0.1")
        client = RawClient(request, events=2**31)
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


class FieldCapTests(RecordTextCase):
    async def test_huge_model_name_makes_no_huge_record(self) -> None:
        """A model name longer than max_field_bytes is kept as its first
        max_field_bytes, and named cut; a 10 MiB one is refused unread (no
        model is that long: oaproxy.inspection.MODEL_BYTES), its record small."""
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)], records={"max_field_bytes": 1024}
        )
        reply = await self.send(proxy, {"model": "m" * 3000, "messages": []})
        self.assertEqual(reply.status, 200)
        record = await proxy.records.nth(1)
        self.assertEqual(record["model"], "m" * 1024)
        self.assertIn("model", record["truncated"])
        model = "m" * (10 * 1024 * 1024)
        reply = await self.send(proxy, {"model": model, "messages": []})
        self.assertEqual(reply.status, 400)
        record = await proxy.records.nth(2)
        self.assertLess(len(json.dumps(record)), 300 * 1024)

    async def test_every_text_field_is_capped(self) -> None:
        """User agent, path, multipart field names and file names: none
        longer than max_field_bytes, each named in truncated."""
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)], records={"max_field_bytes": 1024, "headers": True}
        )
        boundary = b"b0undary"
        body = multipart(
            boundary,
            [
                (b'Content-Disposition: form-data; name="' + b"n" * 4096 + b'"', b"v"),
                (
                    b'Content-Disposition: form-data; name="file"; filename="'
                    + b"f" * 4096
                    + b'.wav"',
                    b"RIFF",
                ),
            ],
        )
        reply = await self.send(
            proxy,
            body,
            path=b"/v1/audio/transcriptions?q=" + b"q" * 4096,
            Content_Type=b"multipart/form-data; boundary=" + boundary,
            User_Agent=b"u" * 4096,
        )
        self.assertEqual(reply.status, 200)
        record = await proxy.records.nth(1)
        fields = record["request_body"]["fields"]
        self.assertEqual((fields[0]["name"], fields[1]["filename"]), ("n" * 1024, "f" * 1024))
        self.assertEqual(len(record["user_agent"]), 1024)
        self.assertEqual(len(record["path"]), 1024)
        self.assertEqual(record["request_headers"]["user-agent"], "u" * 1024)
        self.assertEqual(
            set(record["truncated"]), {"user_agent", "path", "request_body", "request_headers"}
        )


class CutSecretTests(SynchronousTestCase):
    def test_secret_across_the_cut_is_redacted(self) -> None:
        """A key that the field's cut would halve is redacted first: not even its start is kept."""
        h = Harness(
            "authorization: {alice: ck-alice-0123456789}\n"
            "records: {max_field_bytes: 100}\n"
            'upstreams: [{name: a, endpoint: "https://a.test/v1", sk: sk-a-0123456789}]\n'
        )
        client = h.chat(key="ck-alice-0123456789")
        text = "x" * 95 + "sk-a-0123456789 and more"
        answer = {"choices": [{"index": 0, "message": {"content": text}}]}
        h.agent.calls[0].respond(200, body=json.dumps(answer).encode())
        self.assertEqual(client.reply().status, 200)
        record = h.record()
        self.assertEqual(record["response_text"], "x" * 95 + "[reda")
        self.assertEqual(record["truncated"], ["response_text"])


class LaterFieldTests(SynchronousTestCase):
    """The text fields records gained with routing are kept as every other."""

    def harness(self) -> Harness:
        return Harness(
            "authorization: {alice: ck-alice-0123456789}\n"
            "records: {max_field_bytes: 100}\n"
            'upstreams: [{name: a, endpoint: "https://a.test/v1", sk: sk-a-0123456789}]\n'
        )

    def test_upstream_model_loses_secrets(self) -> None:
        """Without an alias the upstream is sent the client's model: a key sent
        as the model is in neither field."""
        h = self.harness()
        client = h.chat("model ck-alice-0123456789", key="ck-alice-0123456789")
        h.agent.calls[0].respond(200, body=CHAT_ANSWER)
        self.assertEqual(client.reply().status, 200)
        record = h.record()
        self.assertEqual(
            (record["model"], record["upstream_model"]), ("model [redacted]", "model [redacted]")
        )

    def test_upstream_model_is_capped(self) -> None:
        """A long model name is cut in upstream_model too, and both named in
        truncated (with the request body that holds it)."""
        h = self.harness()
        client = h.chat("m" * 1000, key="ck-alice-0123456789")
        h.agent.calls[0].respond(200, body=CHAT_ANSWER)
        self.assertEqual(client.reply().status, 200)
        record = h.record()
        self.assertEqual((record["model"], record["upstream_model"]), ("m" * 100, "m" * 100))
        self.assertEqual(record["truncated"], ["request_body", "model", "upstream_model"])
