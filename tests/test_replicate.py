"""``type: replicate``: chat completions as Replicate predictions.

The first tests drive the real site with a ``Clock`` and a recording agent
standing for Replicate, so polling intervals and cancellation are exact; the
last ones run the service on a real socket against ``FakeReplicate`` and
the official SDK.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from oaproxy.circuits import CircuitState
from oaproxy.localresponse import LOCAL_BODY_BYTES
from oaproxy.relay import BytesProducer, small_body
from oaproxy.replicate import ReplicateAgent
from oaproxy.replicate_format import mistral_prompt
from tests.doubles import AgentCall, Harness, make_config, words_as_said
from tests.fakereplicate import FakeReplicate, Prediction
from tests.live import EndToEndCase, LiveCase, reactor, wait_for
from tests.payloads import sse_events

MODEL = "mistralai/mixtral-8x7b-instruct-v0.1"
TOKEN = "r8-secret-token-0123"
CONFIG = f"""
authorization: {{alice: sk-client}}
timeout: 60
upstreams:
  - name: mistral
    type: replicate
    endpoint: https://r.test/v1
    sk: {TOKEN}
    allow: ["{MODEL}", "owner/name:abc123"]
  - name: spare
    endpoint: https://spare.test/v1
    sk: sk-spare
"""
OK = b'{"choices": [{"message": {"content": "spare"}}]}'


def prediction(status: str, **more: Any) -> bytes:
    return json.dumps(
        {
            "id": "p1",
            "status": status,
            "urls": {
                "get": "https://r.test/v1/predictions/p1",
                "cancel": "https://r.test/v1/predictions/p1/cancel",
                "stream": "https://stream.r.test/v1/streams/p1",
            },
            **more,
        }
    ).encode()


class PromptTests(SynchronousTestCase):
    def test_mistral_template(self) -> None:
        """System text goes into the first user turn; turns are closed with </s>."""
        self.assertEqual(
            mistral_prompt(
                [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": [{"type": "text", "text": "And you?"}]},
                ]
            ),
            "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] And you? [/INST]",
        )
        self.assertEqual(mistral_prompt([{"role": "user", "content": "x"}]), "<s>[INST] x [/INST]")


class PollingTests(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)

    def calls_to(self, uri: bytes) -> list[AgentCall]:
        return [c for c in self.h.agent.calls if c.uri == uri]

    def assertBearer(self, call: AgentCall) -> None:
        self.assertEqual(call.header(b"authorization"), [b"Bearer " + TOKEN.encode()])

    def test_poll_until_succeeded(self) -> None:
        """The prediction is created with the translated input, then polled
        after 0.5, 1, 2 and 2 s on the clock; its output and token counts
        become one chat completion."""
        client = self.h.chat(
            MODEL,
            key="sk-client",
            extra={"max_tokens": 50, "temperature": 0.2, "top_k": 5, "stop": ["\n\n", "END"]},
        )
        create = self.h.agent.only()
        self.assertEqual(
            (create.method, create.uri),
            (b"POST", f"https://r.test/v1/models/{MODEL}/predictions".encode()),
        )
        self.assertBearer(create)
        self.assertEqual(
            create.json(),
            {
                "stream": False,
                "input": {
                    "prompt": "<s>[INST] hi [/INST]",
                    "prompt_template": "{prompt}",
                    "max_new_tokens": 50,
                    "temperature": 0.2,
                    "top_k": 5,
                    "stop_sequences": "\n\n,END",
                },
            },
        )
        create.respond(201, body=prediction("starting"))
        for index, delay in enumerate([0.5, 1.0, 2.0, 2.0]):
            self.h.clock.advance(delay - 0.01)
            self.assertEqual(len(self.h.agent.calls), 1 + index)
            self.h.clock.advance(0.01)
            poll = self.h.agent.calls[-1]
            self.assertEqual((poll.method, poll.uri), (b"GET", b"https://r.test/v1/predictions/p1"))
            self.assertBearer(poll)
            if index < 3:
                poll.respond(200, body=prediction("processing"))
        poll.respond(
            200,
            body=prediction(
                "succeeded",
                output=["Hel", "lo"],
                metrics={"input_token_count": 9, "output_token_count": 2},
            ),
        )
        reply = client.reply()
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header(b"x-oaproxy-upstream"), b"mistral")
        answer = reply.json()
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], MODEL)
        self.assertEqual(answer["choices"][0]["message"], {"role": "assistant", "content": "Hello"})
        self.assertEqual(
            answer["usage"], {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        )
        record = self.h.record()
        self.assertEqual((record["upstream"], record["response_text"]), ("mistral", "Hello"))
        self.assertEqual(record["usage"]["total_tokens"], 11)

    def test_version(self) -> None:
        """A model owner/name:version is created through /predictions with its version."""
        self.h.chat("owner/name:abc123", key="sk-client")
        create = self.h.agent.only()
        self.assertEqual(create.uri, b"https://r.test/v1/predictions")
        self.assertEqual(create.json()["version"], "abc123")

    def test_deadline_cancels_the_prediction(self) -> None:
        """When the attempt's deadline passes, the prediction is cancelled
        and the next upstream answers."""
        client = self.h.chat(MODEL, key="sk-client")
        self.h.agent.only().respond(201, body=prediction("starting"))
        for _ in range(40):
            self.h.clock.advance(2)
            last = self.h.agent.calls[-1]
            if last.uri == b"https://r.test/v1/predictions/p1" and last.response is None:
                last.respond(200, body=prediction("processing"))
        [cancel] = self.calls_to(b"https://r.test/v1/predictions/p1/cancel")
        self.assertEqual(cancel.method, b"POST")
        self.assertBearer(cancel)
        [spare] = self.calls_to(b"https://spare.test/v1/chat/completions")
        spare.respond(200, body=OK)
        self.assertEqual(client.reply().header(b"x-oaproxy-upstream"), b"spare")
        self.assertEqual(self.h.record()["attempts"][0]["error"], "timeout after 60s")

    def test_client_gone_cancels_the_prediction(self) -> None:
        """A client that goes away mid-poll stops the poll and the prediction."""
        client = self.h.chat(MODEL, key="sk-client")
        self.h.agent.only().respond(201, body=prediction("starting"))
        self.h.clock.advance(0.5)
        poll = self.h.agent.calls[-1]
        client.disconnect()
        self.assertTrue(poll.cancelled)
        [cancel] = self.calls_to(b"https://r.test/v1/predictions/p1/cancel")
        self.assertBearer(cancel)

    def test_failed_prediction_fails_over(self) -> None:
        """A failed prediction is a 502, and failover goes on."""
        client = self.h.chat(MODEL, key="sk-client")
        self.h.agent.only().respond(201, body=prediction("starting"))
        self.h.clock.advance(0.5)
        self.h.agent.calls[-1].respond(200, body=prediction("failed", error="CUDA out of memory"))
        [spare] = self.calls_to(b"https://spare.test/v1/chat/completions")
        spare.respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.assertEqual([a["status"] for a in self.h.record()["attempts"]], [502, 200])

    def test_polls_that_fail_are_tried_again(self) -> None:
        """A poll whose connection fails is tried at the next tick; three in a row fail the attempt."""
        client = self.h.chat(MODEL, key="sk-client")
        self.h.agent.only().respond(201, body=prediction("starting"))
        for delay in (0.5, 1.0, 2.0):
            self.h.clock.advance(delay)
            self.h.agent.calls[-1].fail(ConnectionResetError("reset"))
        [spare] = self.calls_to(b"https://spare.test/v1/chat/completions")
        self.assertTrue(self.calls_to(b"https://r.test/v1/predictions/p1/cancel"))
        spare.respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.assertIn("polling failed", self.h.record()["attempts"][0]["error"])


ALONE = CONFIG.split("  - name: spare")[0]


class ErrorMappingTests(SynchronousTestCase):
    def answer(self, status: int, body: bytes, headers: Headers | None = None) -> Any:
        h = Harness(ALONE)
        client = h.chat(MODEL, key="sk-client")
        h.agent.only().respond(status, body=body, headers=headers)
        self.h = h
        return client.reply()

    def test_table(self) -> None:
        """Replicate's statuses become the ones OpenAI's SDK and failover expect."""
        for theirs, ours, code in [
            (401, 401, "invalid_api_key"),
            (403, 401, "invalid_api_key"),
            (404, 404, "model_not_found"),
            (422, 400, None),
            (402, 429, "insufficient_quota"),
            (429, 429, "rate_limit_exceeded"),
            (500, 502, "upstream_unavailable"),
            (503, 502, "upstream_unavailable"),
        ]:
            reply = self.answer(theirs, b'{"detail": "nope"}')
            self.assertEqual(reply.status, ours, theirs)
            error = reply.json()["error"]
            self.assertEqual((error["code"], error["message"]), (code, "Replicate: nope"), theirs)

    def test_rate_limit_keeps_retry_after(self) -> None:
        """429's Retry-After reaches the client and holds the circuit open."""
        reply = self.answer(429, b'{"detail": "slow down"}', Headers({b"retry-after": [b"7"]}))
        self.assertEqual((reply.status, reply.header(b"retry-after")), (429, b"7"))
        circuits = self.h.shared.circuits
        self.assertIs(circuits.state("mistral"), CircuitState.OPEN)
        self.h.clock.advance(7)
        self.assertIs(circuits.state("mistral"), CircuitState.HALF_OPEN)

    def test_token_never_reaches_the_client(self) -> None:
        """Replicate's token, quoted in its error, is redacted in the answer and absent from the record."""
        reply = self.answer(401, json.dumps({"detail": f"bad token {TOKEN}"}).encode())
        self.assertNotIn(TOKEN.encode(), reply.body)
        self.assertIn(b"[redacted]", reply.body)
        self.assertNotIn(TOKEN, json.dumps(self.h.record()))

    def test_large_bodies_refused(self) -> None:
        """A body over 1 MiB would be parsed whole on the reactor: 413, and
        Replicate is never asked."""
        h = Harness(ALONE)
        messages = [{"role": "user", "content": "x" * LOCAL_BODY_BYTES}]
        client = h.chat(MODEL, key="sk-client", extra={"messages": messages})
        for _ in range(10):
            h.clock.advance(0)
        reply = client.reply()
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (413, "request_too_large"))
        self.assertEqual(h.agent.calls, [])

    def test_a_long_chat_is_sent(self) -> None:
        """A chat of 100 KiB (over what is parsed at once for routing) goes to Replicate."""
        h = Harness(ALONE)
        messages = [{"role": "user", "content": "x" * (100 * 1024)}]
        h.chat(MODEL, key="sk-client", extra={"messages": messages})
        for _ in range(10):
            h.clock.advance(0)
        self.assertIn("x" * (100 * 1024), h.agent.only().body.decode())

    def test_not_a_replicate_model(self) -> None:
        """A model name Replicate cannot have is a 404 without a request."""
        h = Harness(ALONE.replace(f'allow: ["{MODEL}", "owner/name:abc123"]', ""))
        reply = h.chat("gpt-4o", key="sk-client").reply()
        self.assertEqual((reply.status, h.agent.calls), (404, []))


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.start(CONFIG)

    def start(self, config: str) -> None:
        """A stream request to the replicate upstream, its prediction made and its stream asked."""
        self.h = Harness(config)
        self.client = self.h.chat(MODEL, key="sk-client", stream=True)
        create = self.h.agent.only()
        self.assertEqual(create.json()["stream"], True)
        create.respond(201, body=prediction("starting"))
        self.stream = self.h.agent.calls[-1]
        self.assertEqual(self.stream.uri, b"https://stream.r.test/v1/streams/p1")
        self.assertEqual(self.stream.header(b"accept"), [b"text/event-stream"])
        self.assertEqual(self.stream.header(b"cache-control"), [b"no-store"])
        self.assertEqual(self.stream.header(b"authorization"), [b"Bearer " + TOKEN.encode()])

    def test_output_becomes_chunks(self) -> None:
        """output events become chunks, done the last one and [DONE]."""
        events = self.stream.respond(200, content_type=b"text/event-stream")
        events.write(b"event: output\nid: p1:0\ndata: Hel\n\n")
        events.write(b"event: output\ndata: lo\ndata: you\n\n")
        events.write(b"event: done\ndata: {}\n\n")
        events.finish()
        body = self.client.reply().body
        chunks = sse_events(body)[:-1]
        self.assertEqual(
            [c["choices"][0]["delta"] for c in chunks],
            [{"role": "assistant", "content": "Hel"}, {"content": "lo\nyou"}, {}],
        )
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(self.h.record()["response_text"], "Hello\nyou")

    def spare_fails(self) -> None:
        """The spare, asked to continue the broken stream (oaproxy.resume),
        fails too: the stream ends with the break's error event."""
        spare = self.h.agent.calls[-1]
        self.assertEqual(spare.uri, b"https://spare.test/v1/chat/completions")
        spare.respond(500, body=b"{}")

    def test_error_text_hides_the_token(self) -> None:
        """An error event quoting the token ends the stream without it."""
        events = self.stream.respond(200, content_type=b"text/event-stream")
        events.write(b"event: output\ndata: Hel\n\n")
        events.write(b'event: error\ndata: {"detail": "token ' + TOKEN.encode() + b' revoked"}\n\n')
        self.spare_fails()
        body = self.client.reply().body
        self.assertIn(b"Replicate: token [redacted] revoked", body)
        self.assertNotIn(TOKEN.encode(), body)

    def test_error_before_output_fails_over(self) -> None:
        """An error event before any output: nothing reached the client yet,
        so the next upstream is tried."""
        events = self.stream.respond(200, content_type=b"text/event-stream")
        events.write(b'event: error\ndata: {"detail": "boom"}\n\n')
        spare = self.h.agent.calls[-1]
        self.assertEqual(spare.uri, b"https://spare.test/v1/chat/completions")
        spare.respond(200, body=OK)
        self.assertEqual(self.client.reply().header(b"x-oaproxy-upstream"), b"spare")
        self.assertIn("Replicate: boom", self.h.record()["attempts"][0]["error"])

    def test_endless_event_ends_the_stream(self) -> None:
        """Replicate's events are capped by max_event_bytes like an upstream's:
        one that never ends stops the stream with an error, and the prediction."""
        self.start(CONFIG.replace("timeout: 60\n", "timeout: 60\nmax_event_bytes: 256\n"))
        events = self.stream.respond(200, content_type=b"text/event-stream")
        events.write(b"event: output\ndata: Hel\n\n")
        events.write(b"event: output\ndata: " + b"x" * 256)
        self.assertTrue(events.transport.stopped)
        self.spare_fails()
        body = self.client.reply().body
        self.assertIn(b"Replicate: SSE event over 256 bytes", body)
        self.assertIn("SSE event over 256 bytes", self.h.record()["error"])

    def test_slow_client_pauses_and_gone_client_cancels(self) -> None:
        """A paused client pauses Replicate's stream; one that goes away stops
        it and cancels the prediction."""
        events = self.stream.respond(200, content_type=b"text/event-stream")
        events.write(b"event: output\ndata: Hel\n\n")
        self.client.pause()
        self.assertIn("pause", events.transport.events)
        self.client.resume()
        self.assertIn("resume", events.transport.events)
        self.client.disconnect()
        self.assertTrue(events.transport.stopped)
        cancels = [c for c in self.h.agent.calls if c.uri.endswith(b"/p1/cancel")]
        self.assertEqual(len(cancels), 1)


class PollingOnASocketTests(LiveCase):
    """The agent alone, over a real HTTP client to FakeReplicate, its polls on a Clock."""

    async def test_polls_until_done(self) -> None:
        """Created, polled three times (0.5, 1 and 2 s apart on the clock),
        answered as one completion; every call carries the token."""
        fake = FakeReplicate(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        fake.next = Prediction(status="starting", processing_polls=2)
        upstream = make_config(
            f"upstreams:\n  - {{type: replicate, endpoint: '{fake.endpoint}', sk: {TOKEN}}}\n"
        ).upstreams[0]
        clock = Clock()
        http = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        agent = ReplicateAgent(
            upstream,
            http,
            clock,
            lambda: 1_700_000_000.0,
            max_event_bytes=1 << 20,
            words=words_as_said,
        )
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        answered = agent.request(
            b"POST",
            upstream.url(b"/chat/completions"),
            Headers({b"authorization": [b"Bearer " + TOKEN.encode()]}),
            BytesProducer(body.encode()),
        )
        for delay, polls in ((0.5, 1), (1.0, 2), (2.0, 3)):
            await wait_for(lambda: bool(clock.getDelayedCalls()), timeout=5)
            clock.advance(delay)
            await wait_for(lambda polls=polls: len(fake.requests) == 1 + polls, timeout=5)  # type: ignore[misc]
        response = await answered
        completion = json.loads(await small_body(response, 1 << 20))
        self.assertEqual(completion["choices"][0]["message"]["content"], "Hello!")
        self.assertEqual(completion["usage"]["total_tokens"], 12)
        self.assertEqual(
            fake.paths(),
            [(b"POST", f"/v1/models/{MODEL}/predictions".encode())]
            + [(b"GET", b"/v1/predictions/p1")] * 3,
        )
        for seen in fake.requests:
            self.assertEqual(seen.header(b"authorization"), b"Bearer " + TOKEN.encode())


class ReplicateThroughTheSDKTests(EndToEndCase):
    async def replicate(self, *more: dict[str, Any]) -> tuple[FakeReplicate, Any]:
        fake = FakeReplicate(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        proxy = await self.proxy(
            [
                {
                    "name": "mistral",
                    "type": "replicate",
                    "endpoint": fake.endpoint,
                    "sk": TOKEN,
                    "allow": [MODEL],
                },
                *more,
            ]
        )
        return fake, proxy

    def chat(self, client: openai.OpenAI, **more: Any) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **more
        )

    async def test_non_stream(self) -> None:
        """A non-stream completion through the SDK, with the token on every call and in no record."""
        fake, proxy = await self.replicate()
        completion = await self.sdk(proxy, self.chat)
        self.assertEqual(completion.choices[0].message.content, "Hello!")
        self.assertEqual(completion.usage.total_tokens, 12)
        self.assertEqual(fake.paths()[0], (b"POST", f"/v1/models/{MODEL}/predictions".encode()))
        for seen in fake.requests:
            self.assertEqual(seen.header(b"authorization"), b"Bearer " + TOKEN.encode())
        self.assertNotIn(TOKEN, json.dumps(proxy.records.seen))

    async def test_stream_with_usage(self) -> None:
        """The SSE stream, translated, with usage asked for by the client."""
        fake, proxy = await self.replicate()

        def collect(client: openai.OpenAI) -> tuple[str, Any]:
            stream = self.chat(client, stream=True, stream_options={"include_usage": True})
            text, usage = "", None
            for chunk in stream:
                usage = chunk.usage or usage
                text += "".join(c.delta.content or "" for c in chunk.choices)
            return text, usage

        text, usage = await self.sdk(proxy, collect)
        self.assertEqual(text, "Hello!")
        self.assertEqual((usage.prompt_tokens, usage.completion_tokens), (9, 3))
        self.assertEqual(
            [p for p in fake.paths()][1:],
            [(b"GET", b"/stream/p1"), (b"GET", b"/v1/predictions/p1")],
        )

    async def test_error_event_fails_over(self) -> None:
        """An error before the first output goes on to the next upstream."""
        main = await self.fake()
        fake, proxy = await self.replicate({"name": "main", "endpoint": main.endpoint})
        fake.next = Prediction(stream_error_after=0)
        text = await self.sdk(
            proxy,
            lambda c: "".join(
                ch.choices[0].delta.content or "" for ch in self.chat(c, stream=True) if ch.choices
            ),
        )
        self.assertEqual(text, "Hello, world!")
        attempts = proxy.records.seen[0]["attempts"]
        self.assertEqual([a["upstream"] for a in attempts], ["mistral", "main"])
        self.assertIn("Replicate: CUDA out of memory", attempts[0]["error"])

    async def test_error_after_output_raises(self) -> None:
        """A stream that broke after its start makes the SDK raise."""
        fake, proxy = await self.replicate()
        fake.next = Prediction(stream_error_after=1)
        error = await self.sdk_error(
            proxy, lambda c: list(self.chat(c, stream=True)), openai.APIError
        )
        self.assertIn("Replicate: CUDA out of memory", str(error))

    async def test_failed_prediction_fails_over(self) -> None:
        """A failed prediction (502) goes on to the next upstream."""
        main = await self.fake()
        fake, proxy = await self.replicate({"name": "main", "endpoint": main.endpoint})
        fake.next = Prediction(status="failed", error="the model crashed")
        completion = await self.sdk(proxy, self.chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        self.assertEqual([a["status"] for a in proxy.records.seen[0]["attempts"]], [502, 200])

    async def test_bad_token(self) -> None:
        """Replicate's 401 is the SDK's AuthenticationError."""
        fake, proxy = await self.replicate()
        fake.next = Prediction(create_status=401, create_body=b'{"detail": "Invalid token."}')
        error = await self.sdk_error(proxy, self.chat, openai.AuthenticationError)
        self.assertIn("Replicate: Invalid token.", str(error))
