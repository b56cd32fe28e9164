"""The built-in echo upstream: its answers, through the official SDK, and the
default etc/config.yaml answering at once with no key and no network."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import openai
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.echo import FINGERPRINT, MAX_EMBEDDING_VALUES, EchoAgent, embedding, pieces
from oaproxy.localresponse import LOCAL_BODY_BYTES, LocalResponse
from oaproxy.relay import BytesProducer, small_body
from tests.live import EndToEndCase, child_env, free_port, reachable, spawn_daemon, wait_for
from tests.payloads import sse_events

ROOT = Path(__file__).resolve().parent.parent


def answer(method: bytes, path: bytes, body: Any = None) -> tuple[int, bytes, bytes]:
    """The echo agent's status, content type and body for one request."""
    producer = None if body is None else BytesProducer(json.dumps(body).encode())
    results: list[Any] = []
    EchoAgent(lambda: 1_700_000_000.0).request(method, path, None, producer).addCallback(
        results.append
    )
    [response] = results
    assert isinstance(response, LocalResponse)
    bodies: list[bytes] = []
    small_body(response, 1 << 24).addCallback(bodies.append)
    [content_type] = response.headers.getRawHeaders(b"content-type") or [b""]
    return response.code, content_type, bodies[0]


class EchoAgentTests(SynchronousTestCase):
    def test_chat(self) -> None:
        """The last user message back, verbatim, with usage and the model as asked."""
        status, kind, body = answer(
            b"POST",
            b"/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [{"type": "text", "text": "Hé,  there\n!"}]},
                ],
            },
        )
        self.assertEqual((status, kind), (200, b"application/json"))
        completion = json.loads(body)
        self.assertEqual(completion["object"], "chat.completion")
        self.assertEqual(completion["model"], "gpt-4o-mini")
        self.assertEqual(completion["system_fingerprint"], FINGERPRINT)
        self.assertEqual(completion["choices"][0]["message"]["content"], "Hé,  there\n!")
        self.assertEqual(completion["choices"][0]["finish_reason"], "stop")
        self.assertEqual(
            completion["usage"], {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        )

    def test_stream(self) -> None:
        """Word by word, then the finish, the usage when asked, and [DONE]."""
        status, kind, body = answer(
            b"POST",
            b"/chat/completions",
            {
                "model": "m",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": " one two  three "}],
            },
        )
        self.assertEqual((status, kind), (200, b"text/event-stream"))
        *events, done = sse_events(body)
        self.assertEqual(done, "[DONE]")
        self.assertEqual(events[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
        self.assertEqual(contents, [" one", " two", "  three", " "])
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(events[-1]["choices"], [])
        self.assertEqual(events[-1]["usage"]["completion_tokens"], 3)
        self.assertEqual({e["system_fingerprint"] for e in events}, {FINGERPRINT})

    @given(st.text())
    def test_pieces_are_the_text(self, text: str) -> None:
        """Joined, the pieces are the text, whatever its whitespace."""
        self.assertEqual("".join(pieces(text)), text)

    def test_completion(self) -> None:
        """Text completions: each prompt back, one choice each."""
        status, _, body = answer(b"POST", b"/completions", {"model": "m", "prompt": ["a b", "c"]})
        self.assertEqual(status, 200)
        self.assertEqual([c["text"] for c in json.loads(body)["choices"]], ["a b", "c"])

    def test_embeddings(self) -> None:
        """Deterministic unit vectors from the input; base64 is the same floats."""
        request = {"model": "e", "input": ["a", "b", "a"], "dimensions": 8}
        status, _, body = answer(b"POST", b"/embeddings", request)
        self.assertEqual(status, 200)
        vectors = [d["embedding"] for d in json.loads(body)["data"]]
        self.assertEqual(vectors[0], vectors[2])
        self.assertNotEqual(vectors[0], vectors[1])
        self.assertAlmostEqual(math.sqrt(sum(v * v for v in vectors[0])), 1.0, places=5)
        _, _, body = answer(b"POST", b"/embeddings", {**request, "encoding_format": "base64"})
        decoded = base64.b64decode(json.loads(body)["data"][1]["embedding"])
        self.assertEqual(list(struct.unpack("<8f", decoded)), vectors[1])
        self.assertEqual(len(embedding("x", 256)), 256)

    def test_large_bodies_refused(self) -> None:
        """A body over 1 MiB would be parsed whole on the reactor: 413, unread;
        a long chat of 100 KiB is answered."""
        large = {"messages": [{"role": "user", "content": "x" * LOCAL_BODY_BYTES}]}
        status, _, body = answer(b"POST", b"/chat/completions", large)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (413, "request_too_large"))
        small = {"messages": [{"role": "user", "content": "x" * (100 * 1024)}]}
        self.assertEqual(answer(b"POST", b"/chat/completions", small)[0], 200)

    def test_refusals(self) -> None:
        """Bad input is a 400; what echo does not serve is a 404 (failed over)."""
        for path, body in [
            (b"/chat/completions", {"messages": "hi"}),
            (b"/embeddings", {"input": 3}),
            (b"/embeddings", {"input": "a", "dimensions": 0}),
            (b"/embeddings", {"input": ["a"] * 2049, "dimensions": MAX_EMBEDDING_VALUES // 2048}),
            (b"/completions", {"prompt": []}),
        ]:
            self.assertEqual(answer(b"POST", path, body)[0], 400, (path, body))
        self.assertEqual(answer(b"POST", b"/chat/completions", None)[0], 400)
        self.assertEqual(answer(b"POST", b"/audio/speech", {})[0], 404)

    def test_models(self) -> None:
        """The echo model is listed; any model asked for exists."""
        _, _, body = answer(b"GET", b"/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["echo"])
        _, _, body = answer(b"GET", b"/models/gpt-4o")
        self.assertEqual(json.loads(body)["id"], "gpt-4o")


class EchoThroughTheSDKTests(EndToEndCase):
    async def test_sdk(self) -> None:
        """The official SDK gets chat, stream, embeddings and models from echo,
        each answer naming its upstream."""
        proxy = await self.proxy([{"name": "echo", "type": "echo"}])

        def use(client: openai.OpenAI) -> dict[str, Any]:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}]
            )
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "one two three"}],
                stream=True,
            )
            deltas = [c.choices[0].delta.content for c in stream if c.choices]
            embedded = client.embeddings.create(model="text-embedding-3-small", input="x")
            return {
                "header": raw.headers.get("x-oaproxy-upstream"),
                "text": raw.parse().choices[0].message.content,
                "fingerprint": raw.parse().system_fingerprint,
                "deltas": deltas,
                "dimensions": len(embedded.data[0].embedding),
                "models": [m.id for m in client.models.list()],
            }

        seen = await self.sdk(proxy, use)
        self.assertEqual(seen["header"], "echo")
        self.assertEqual((seen["text"], seen["fingerprint"]), ("Hello there", FINGERPRINT))
        self.assertEqual("".join(d or "" for d in seen["deltas"]), "one two three")
        self.assertEqual(seen["dimensions"], 256)
        self.assertEqual(seen["models"], ["echo"])
        records = proxy.records.seen
        # The stream's usage, which oaproxy asked echo for, is in its record.
        self.assertEqual(records[1]["usage"]["completion_tokens"], 3)
        self.assertEqual({r["upstream"] for r in records[:3]}, {"echo"})

    async def test_fails_over_past_echo(self) -> None:
        """What echo does not serve goes on to the next upstream."""
        fake = await self.fake()
        proxy = await self.proxy(
            [{"name": "echo", "type": "echo"}, {"name": "main", "endpoint": fake.endpoint}]
        )
        result = await self.sdk(
            proxy,
            lambda c: c.audio.transcriptions.with_raw_response.create(
                file=("a.wav", b"RIFF", "audio/wav"), model="whisper-1"
            ),
        )
        self.assertEqual(result.headers.get("x-oaproxy-upstream"), "main")
        self.assertEqual(result.parse().text, "transcribed")
        self.assertEqual(
            [a["upstream"] for a in proxy.records.seen[0]["attempts"]], ["echo", "main"]
        )


class DefaultConfigTests(EndToEndCase):
    timeout = 40

    async def test_answers_offline_without_a_key(self) -> None:
        """The sample config under the installed twistd, with no OPENAI_API_KEY:
        echo answers the SDK at once, and the log says so as a warning."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(cwd, "etc"))
        shutil.copy(ROOT / "etc" / "config.yaml", os.path.join(cwd, "etc", "config.yaml"))
        port = free_port()
        env = child_env()
        env.pop("OPENAI_API_KEY", None)
        daemon = spawn_daemon(
            self,
            [
                "-n",
                "--pidfile=",
                "oaproxy",
                "--config",
                "etc/config.yaml",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            cwd,
            env=env,
        )
        await wait_for(lambda: reachable("127.0.0.1", port) or not daemon.running, timeout=30)
        await daemon.wait_for("oaproxy started")

        def ask() -> tuple[str | None, str | None]:
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key="anything",
                max_retries=0,
                timeout=10,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]
                )
                return raw.headers.get("x-oaproxy-upstream"), raw.parse().choices[0].message.content

        got: Deferred[tuple[str | None, str | None]] = deferToThread(ask)
        self.assertEqual(await got, ("echo", "Hello!"))
        await daemon.wait_for(
            "#warn]   WARNING: answers from upstream echo come from the built-in echo"
        )
        self.assertIn("upstream openai: disabled (enabled: false)", daemon.text)
