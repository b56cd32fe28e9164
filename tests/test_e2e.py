"""End to end: the real service on a real socket, driven by the official SDK.

The service is built exactly as twistd builds it (``Options`` then
``makeService``) and listens on ``tcp:0:interface=127.0.0.1``; upstreams are
``FakeUpstream``s in the same reactor. The openai SDK is synchronous, so each
SDK call runs in the reactor's thread pool (``deferToThread``) while the
reactor serves both the proxy and the fakes.
"""

from __future__ import annotations

import hashlib
import json

import openai
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.fakeupstream import Drop, Hang, Status, Stream
from tests.live import (
    EndToEndCase,
    RawClient,
    chat,
    collect_stream,
    reactor,
    refused_endpoint,
)
from tests.payloads import (
    CLIENT_KEY,
    FAKE_MODEL,
    HI,
    OTHER_KEY,
    SK_BACKUP,
    SK_MAIN,
    chat_payload,
    raw_chat_request,
    upstream,
)


class HappyPathTests(EndToEndCase):
    async def test_chat(self) -> None:
        """A chat completion through the SDK comes back from the upstream with
        its usage; the upstream got the request as the SDK sent it."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        self.assertEqual(completion.usage.total_tokens, 11)
        [seen] = fake.requests
        self.assertEqual((seen.method, seen.path), (b"POST", b"/v1/chat/completions"))
        self.assertEqual(seen.json()["messages"], HI)

    async def test_upstream_gets_its_own_key_never_the_clients(self) -> None:
        """For chats, streams and model lists alike, the upstream gets its own
        key and the client's address, never the client's key in any header, and
        neither key is in a record."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint, sk=SK_MAIN)])
        await self.sdk(proxy, chat)
        await self.sdk(proxy, lambda c: collect_stream(c))
        await self.sdk(proxy, lambda c: c.models.list())
        self.assertEqual(len(fake.requests), 3)
        self.assertEqual(len(proxy.records.seen), 3)
        self.assertNotIn(CLIENT_KEY, json.dumps(proxy.records.seen))
        self.assertNotIn(SK_MAIN, json.dumps(proxy.records.seen))
        forwarded, listed = fake.requests[:2], fake.requests[2]
        # The models list is oaproxy's own request, on behalf of no one client.
        self.assertEqual((listed.method, listed.path), (b"GET", b"/v1/models"))
        self.assertIsNone(listed.headers.getRawHeaders(b"x-forwarded-for"))
        for seen in fake.requests:
            self.assertEqual(
                seen.headers.getRawHeaders(b"authorization"), [b"Bearer " + SK_MAIN.encode()]
            )
            if seen in forwarded:
                self.assertEqual(seen.headers.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
            for name, values in seen.headers.getAllRawHeaders():
                for value in values:
                    self.assertNotIn(CLIENT_KEY.encode(), value, name)

    async def test_stream(self) -> None:
        """A stream reaches the SDK chunk by chunk; the usage oaproxy asked for
        is recorded but not passed to a client that did not ask."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        deltas, usages = await self.sdk(proxy, lambda c: collect_stream(c))
        self.assertEqual("".join(deltas), "Hello, world!")
        self.assertEqual(deltas, ["Hel", "lo, ", "wor", "ld!"])
        # oaproxy asked the upstream for usage (for its records) but the
        # client did not: the usage chunk is not passed on.
        self.assertEqual(usages, [])
        [seen] = fake.requests
        self.assertEqual(seen.json().get("stream_options"), {"include_usage": True})
        # ...and recorded it.
        record = await proxy.records.nth(1)
        self.assertEqual(
            record["usage"], {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
        )
        self.assertEqual(record["response_text"], "Hello, world!")
        self.assertEqual((record["status"], record["outcome"], record["stream"]), (200, "ok", True))
        self.assertEqual(record["key_name"], "alice")

    async def test_stream_with_delays(self) -> None:
        """A stream whose chunks come with pauses reaches the SDK whole, in order."""
        fake = await self.fake(default=Stream(chunks=("a", "b", "c"), delay=0.02))
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        deltas, _ = await self.sdk(proxy, lambda c: collect_stream(c))
        self.assertEqual(deltas, ["a", "b", "c"])

    async def test_stream_usage_when_asked(self) -> None:
        """A client that asks for stream usage gets the usage chunk."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        deltas, usages = await self.sdk(proxy, lambda c: collect_stream(c, include_usage=True))
        self.assertEqual("".join(deltas), "Hello, world!")
        self.assertEqual(len(usages), 1)
        self.assertEqual(
            (usages[0].prompt_tokens, usages[0].completion_tokens, usages[0].total_tokens),
            (7, 4, 11),
        )

    async def test_embeddings(self) -> None:
        """Embeddings go through to the upstream's /v1/embeddings and come back."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        result = await self.sdk(
            proxy, lambda c: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        )
        self.assertEqual([d.embedding for d in result.data], [[0.25] * 4, [0.5] * 4])
        [seen] = fake.requests
        self.assertEqual(seen.path, b"/v1/embeddings")
        self.assertEqual(seen.json()["input"], ["a", "b"])

    async def test_models(self) -> None:
        """GET /v1/models goes through and the SDK reads the upstream's list."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        models = await self.sdk(proxy, lambda c: [m.id for m in c.models.list()])
        self.assertEqual(models, [FAKE_MODEL, "text-embedding-3-small", "whisper-1"])
        [seen] = fake.requests
        self.assertEqual((seen.method, seen.path), (b"GET", b"/v1/models"))

    async def _transcription(self, audio: bytes) -> None:
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        result = await self.sdk(
            proxy,
            lambda c: c.audio.transcriptions.create(
                file=("a.wav", audio, "audio/wav"), model="whisper-1"
            ),
        )
        echo = result.model_extra
        assert echo is not None
        self.assertEqual(result.text, "transcribed")
        self.assertEqual(echo["file_sha256"], hashlib.sha256(audio).hexdigest())
        self.assertEqual(echo["file_size"], len(audio))
        self.assertEqual(echo["file_content_type"], "audio/wav")
        self.assertEqual(echo["fields"].get("model"), "whisper-1")
        self.assertTrue(echo["content_type"].startswith("multipart/form-data; boundary="))
        [seen] = fake.requests
        self.assertEqual(seen.path, b"/v1/audio/transcriptions")
        self.assertEqual(int(seen.header(b"content-length") or b"-1"), len(seen.body))

    def test_transcription_small(self) -> Deferred[None]:
        """A small upload with every byte value and multipart-like CRLF
        sequences reaches the upstream byte for byte, with a correct
        Content-Length."""
        audio = bytes(range(256)) * 16 + b"\r\n--\r\n\r\n" + bytes(range(255, -1, -1))
        return Deferred.fromCoroutine(self._transcription(audio))

    def test_transcription_large(self) -> Deferred[None]:
        """An upload over the 1 MiB held in memory is forwarded from
        twisted.web's spool file, byte for byte."""
        audio = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32) + b"tail"
        return Deferred.fromCoroutine(self._transcription(audio))

    async def test_scoped_upstream_for_its_key(self) -> None:
        """A key scoped to an upstream is served by that upstream, under that upstream's own key."""
        fake = await self.fake()
        proxy = await self.proxy(
            [
                upstream("main", fake.endpoint, deny=["gpt-secret"]),
                upstream(
                    "secret",
                    fake.endpoint,
                    sk=SK_BACKUP,
                    allow=["gpt-secret"],
                    authorization=OTHER_KEY,
                ),
            ]
        )
        completion = await self.sdk(proxy, lambda c: chat(c, "gpt-secret"), key=OTHER_KEY)
        self.assertEqual(completion.model, "gpt-secret")
        [seen] = fake.requests
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + SK_BACKUP.encode())


class FailoverTests(EndToEndCase):
    async def test_connection_refused_then_answer(self) -> None:
        """An upstream that refuses the connection is passed over for the next,
        which answers under its own key."""
        refused = refused_endpoint()
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("dead", refused), upstream("live", fake.endpoint, sk=SK_BACKUP)]
        )
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        [seen] = fake.requests
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + SK_BACKUP.encode())

    async def test_503_then_answer(self) -> None:
        """A 503 moves the same body on to the next upstream, each under its own key."""
        first = await self.fake(default=Status(503, "overloaded"))
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint, sk=SK_BACKUP)]
        )
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        self.assertEqual(len(first.requests), 1)
        self.assertEqual(len(second.requests), 1)
        # The same body was replayed to the second upstream, with its own key.
        self.assertEqual(first.requests[0].body, second.requests[0].body)
        self.assertEqual(first.requests[0].header(b"authorization"), b"Bearer " + SK_MAIN.encode())
        self.assertEqual(
            second.requests[0].header(b"authorization"), b"Bearer " + SK_BACKUP.encode()
        )

    async def test_stream_503_then_stream(self) -> None:
        """A stream refused with a 503 is served by the next upstream."""
        first = await self.fake(default=Status(503, "overloaded"))
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        deltas, _ = await self.sdk(proxy, lambda c: collect_stream(c))
        self.assertEqual("".join(deltas), "Hello, world!")
        self.assertEqual((len(first.requests), len(second.requests)), (1, 1))

    async def test_stream_ending_before_its_first_event(self) -> None:
        """An upstream that closes a stream before its first event is passed over for the next."""
        first = await self.fake(default=Stream(role_chunk=False, close_after=0))
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        deltas, _ = await self.sdk(proxy, lambda c: collect_stream(c))
        self.assertEqual("".join(deltas), "Hello, world!")
        self.assertEqual((len(first.requests), len(second.requests)), (1, 1))

    async def test_upstream_dropping_the_request_gets_it_once(self) -> None:
        """An upstream that reads a request and closes the connection without an
        answer (a crash, a proxy in front of it) may have done the work: the
        POST is not sent to it again but to the next upstream. Only a pooled
        connection the upstream had closed while idle is worth a retry."""
        first = await self.fake(default=Drop())
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        self.assertEqual((len(first.requests), len(second.requests)), (1, 1))

    async def test_stream_silent_before_its_first_event(self) -> None:
        """An upstream that sends stream headers and then nothing is failed over
        at its stream_timeout, and its connection closed."""
        # 200 and headers, then nothing: not committed, so failed over after
        # stream_timeout (a real deadline over real I/O: kept short).
        first = await self.fake(default=Stream(role_chunk=False, hang_after=0))
        second = await self.fake()
        proxy = await self.proxy(
            [
                upstream("first", first.endpoint, stream_timeout=0.3),
                upstream("second", second.endpoint),
            ]
        )
        deltas, _ = await self.sdk(proxy, lambda c: collect_stream(c))
        self.assertEqual("".join(deltas), "Hello, world!")
        self.assertEqual(await first.requests[0].ended(), "lost")

    async def test_large_upload_replayed_to_the_next_upstream(self) -> None:
        """An upload over 1 MiB, forwarded from twisted.web's spool file, is
        read again from its start for the next upstream, which gets the same
        bytes."""
        audio = hashlib.sha256(b"replay").digest() * (2 * 1024 * 1024 // 32) + b"end"
        first = await self.fake(default=Status(503, "overloaded"))
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        result = await self.sdk(
            proxy,
            lambda c: c.audio.transcriptions.create(
                file=("a.wav", audio, "audio/wav"), model="whisper-1"
            ),
        )
        echo = result.model_extra
        assert echo is not None
        self.assertEqual(echo["file_sha256"], hashlib.sha256(audio).hexdigest())
        self.assertEqual(first.requests[0].body, second.requests[0].body)

    async def test_400_is_answered_at_once(self) -> None:
        """A 400 from the first upstream is the SDK's BadRequestError, and the
        next upstream is never asked."""
        first = await self.fake(default=Status(400, "bad messages", "invalid_request_error"))
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        error = await self.sdk_error(proxy, chat, openai.BadRequestError)
        self.assertEqual(error.body["message"], "bad messages")
        self.assertEqual((len(first.requests), len(second.requests)), (1, 0))

    async def test_hanging_upstream_times_out_and_is_hung_up_on(self) -> None:
        """An upstream that never answers is given up at its timeout, its
        connection closed, and the next answers."""
        # A real deadline over real I/O: kept short.
        first = await self.fake(default=Hang())
        second = await self.fake()
        proxy = await self.proxy(
            [upstream("slow", first.endpoint, timeout=0.3), upstream("second", second.endpoint)]
        )
        completion = await self.sdk(proxy, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        # Cancelling the attempt aborted the upstream connection.
        self.assertEqual(await first.requests[0].ended(), "lost")


class ErrorTests(EndToEndCase):
    async def test_wrong_client_key(self) -> None:
        """A wrong client key is the SDK's AuthenticationError with OpenAI's
        code, and reaches no upstream."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        error = await self.sdk_error(proxy, chat, openai.AuthenticationError, key="ck-wrong")
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.code, "invalid_api_key")
        self.assertEqual(fake.requests, [])

    async def test_all_429_passes_the_last_upstreams_answer(self) -> None:
        """When every upstream answers 429 the SDK gets the last one's answer,
        its message and type."""
        first = await self.fake(
            default=Status(429, "first is rate limited", "requests", "rate_limit_exceeded")
        )
        second = await self.fake(
            default=Status(429, "second is rate limited", "tokens", "rate_limit_exceeded")
        )
        proxy = await self.proxy(
            [upstream("first", first.endpoint), upstream("second", second.endpoint)]
        )
        error = await self.sdk_error(proxy, chat, openai.RateLimitError)
        self.assertEqual(error.status_code, 429)
        self.assertEqual(error.body["message"], "second is rate limited")
        self.assertEqual(error.type, "tokens")
        self.assertEqual((len(first.requests), len(second.requests)), (1, 1))

    async def test_every_upstream_unreachable(self) -> None:
        """With every upstream unreachable the SDK gets a 502 naming each
        upstream's connect error."""
        proxy = await self.proxy(
            [upstream("a", refused_endpoint()), upstream("b", refused_endpoint())]
        )
        error = await self.sdk_error(proxy, chat, openai.APIStatusError)
        self.assertEqual(error.status_code, 502)
        self.assertEqual(error.code, "upstream_unavailable")
        self.assertIn("a: connect error", error.message)
        self.assertIn("b: connect error", error.message)

    async def test_key_not_allowed(self) -> None:
        """A model only another key's upstream serves is the SDK's
        PermissionDeniedError, and reaches no upstream."""
        fake = await self.fake()
        proxy = await self.proxy(
            [
                upstream("main", fake.endpoint, deny=["gpt-secret"]),
                upstream("secret", fake.endpoint, allow=["gpt-secret"], authorization=OTHER_KEY),
            ]
        )
        error = await self.sdk_error(
            proxy, lambda c: chat(c, "gpt-secret"), openai.PermissionDeniedError
        )
        self.assertEqual(error.status_code, 403)
        self.assertEqual(fake.requests, [])

    async def test_model_not_found(self) -> None:
        """A model no upstream serves is the SDK's NotFoundError with
        model_not_found, and reaches no upstream."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint, allow=[FAKE_MODEL])])
        error = await self.sdk_error(
            proxy, lambda c: chat(c, "no-such-model"), openai.NotFoundError
        )
        self.assertEqual(error.status_code, 404)
        self.assertEqual(error.code, "model_not_found")
        self.assertEqual(fake.requests, [])

    async def test_stream_failing_midway_raises(self) -> None:
        """A stream whose upstream breaks off makes the SDK raise after the chunks that came."""
        fake = await self.fake(default=Stream(chunks=("one ", "two ", "three"), close_after=2))
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        deltas: list[str] = []

        def read(client: openai.OpenAI) -> None:
            stream = client.chat.completions.create(model=FAKE_MODEL, messages=HI, stream=True)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        deltas.append(choice.delta.content)

        error = await self.sdk_error(proxy, read, openai.APIError)
        self.assertIn("upstream stream failed", error.message)
        self.assertEqual(deltas, ["one ", "two "])

    async def test_stream_falling_silent_raises(self) -> None:
        """A stream whose upstream falls silent makes the SDK raise an idle
        error, and the upstream's connection is closed."""
        # A real idle deadline over real I/O: kept short.
        fake = await self.fake(default=Stream(chunks=("one ", "two ", "three"), hang_after=2))
        proxy = await self.proxy([upstream("main", fake.endpoint)], stream_idle_timeout=0.3)
        error = await self.sdk_error(proxy, lambda c: collect_stream(c), openai.APIError)
        self.assertIn("idle", error.message)
        [seen] = fake.requests
        self.assertEqual(await seen.ended(), "lost")


class HeaderTests(EndToEndCase):
    async def test_forwarded_for_from_a_trusted_proxy(self) -> None:
        """A loopback client's X-Forwarded-For is extended with its address, and
        its cookie is not passed on."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        await self.sdk(
            proxy,
            lambda c: c.chat.completions.create(
                model=FAKE_MODEL,
                messages=HI,
                extra_headers={"X-Forwarded-For": "203.0.113.9", "Cookie": "session=secret"},
            ),
        )
        [seen] = fake.requests
        self.assertEqual(
            seen.headers.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.9, 127.0.0.1"]
        )
        self.assertIsNone(seen.header(b"cookie"))

    async def test_body_too_large(self) -> None:
        """A body over max_body_bytes is the SDK's 413, and reaches no upstream."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)], max_body_bytes=1000)
        error = await self.sdk_error(
            proxy,
            lambda c: c.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": "x" * 5000}]
            ),
            openai.APIStatusError,
        )
        self.assertEqual(error.status_code, 413)
        self.assertEqual(fake.requests, [])


class ClientDisconnectTests(EndToEndCase):
    async def test_client_hangs_up_while_waiting(self) -> None:
        """A client that hangs up while the upstream thinks makes the proxy
        close the upstream connection at once; the record says the client
        went."""
        fake = await self.fake(default=Hang())
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        client = RawClient(raw_chat_request(chat_payload(), CLIENT_KEY))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        seen = await fake.received()
        hung_up = reactor.seconds()
        await client.hang_up()
        self.assertEqual(await seen.ended(), "lost")
        assert seen.lost_at is not None
        self.assertLess(seen.lost_at - hung_up, 2.0)
        self.assertEqual(client.received, b"")
        record = await proxy.records.nth(1)
        self.assertEqual(record["outcome"], "client_disconnected")

    async def test_client_hangs_up_mid_stream(self) -> None:
        """A client that hangs up mid-stream makes the proxy close the upstream
        connection at once, not at a timeout; the record says the client
        went."""
        fake = await self.fake(default=Stream(hang_after=1))
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        client = RawClient(raw_chat_request(chat_payload(stream=True), CLIENT_KEY))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        await client.enough
        self.assertIn(b"HTTP/1.1 200", client.received)
        [seen] = fake.requests
        self.assertIsNone(seen.lost_at)
        self.assertEqual(proxy.records.seen, [])
        hung_up = reactor.seconds()
        await client.hang_up()
        # The upstream request is cancelled at once, not left to time out.
        self.assertEqual(await seen.ended(), "lost")
        assert seen.lost_at is not None
        self.assertLess(seen.lost_at - hung_up, 2.0)
        record = await proxy.records.nth(1)
        self.assertEqual(record["outcome"], "client_disconnected")
