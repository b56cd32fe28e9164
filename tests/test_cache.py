"""Tests for the response cache (``oaproxy.cache``) with the memory backend,
through the real site on an in-memory transport, with a ``Clock``."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaproxy import capture, exchange
from oaproxy import sse as sse_module
from oaproxy.cache.keys import cache_key, namespace
from oaproxy.cache.replay import StreamedAnswer, stream_from_completion
from oaproxy.cache.stores import AnswerStore, MemoryStore
from oaproxy.generation import build_generation
from oaproxy.inspection import WALK_AT_ONCE, parse_json
from oaproxy.largeanswer import MAX_PARSED_ANSWER
from oaproxy.record import record_document
from tests.doubles import Client, Harness, Reply, headers, make_config
from tests.payloads import api_path, sse, sse_events

CONFIG = """
authorization: {alice: sk-alice, bob: sk-bob}
prices: {gpt-4o-mini: {input: 1, output: 2}}
cache: {ttl: 60}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there"},
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}
CACHING = {"caching": True}


def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **more,
        }
    )


USAGE_CHUNK = json.dumps(
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
)
STREAM = sse(
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello"}),
    chunk({"content": " there"}),
    chunk({}, "stop"),
    USAGE_CHUNK,
    "[DONE]",
)


def streamed_text(body: bytes) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in sse_events(body)[:-1]
        for choice in event["choices"]
    )


class CacheCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)

    def ask(
        self,
        key: str = "sk-alice",
        stream: bool = False,
        extra: dict[str, Any] | None = None,
        path: bytes = b"/v1/chat/completions",
    ) -> Client:
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
        }
        if stream:
            body["stream"] = True
        body.update(CACHING if extra is None else extra)
        return self.h.request(
            b"POST",
            path,
            json.dumps(body).encode(),
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer " + key.encode())],
        )

    def answer_json(self, completion: dict[str, Any] = COMPLETION, status: int = 200) -> None:
        self.h.agent.calls[-1].respond(status, body=json.dumps(completion).encode())

    def answer_stream(self, body: bytes = STREAM) -> None:
        self.h.agent.calls[-1].respond(200, b"text/event-stream", body=body)

    def forwarded(self) -> int:
        return len(self.h.agent.calls)

    def cached(self, reply: Reply) -> bytes | None:
        return reply.header(b"x-oaproxy-cache")

    def count(self, result: str) -> float | None:
        return self.h.shared.metrics.registry.get_sample_value(
            "oaproxy_cache_total", {"result": result}
        )


class HitAndMissTests(CacheCase):
    def test_non_stream_miss_then_hit(self) -> None:
        """A complete answer is stored on a miss and replayed on the next ask."""
        first = self.ask()
        self.answer_json()
        self.assertEqual(self.cached(first.reply()), b"miss")
        second = self.ask()
        reply = second.reply()
        self.assertEqual(self.forwarded(), 1)
        self.assertEqual((reply.status, self.cached(reply)), (200, b"hit"))
        self.assertEqual(reply.header(b"content-type"), b"application/json")
        self.assertEqual(reply.json(), COMPLETION)

    def test_a_miss_parses_its_answer_once(self) -> None:
        """The answer of a miss is parsed once, for its record and its entry."""
        parsed: list[object] = []

        def counted(data: bytes | str) -> object:
            parsed.append(data)
            return parse_json(data)

        self.patch(exchange, "parse_json", counted)
        self.patch(capture, "parse_json", counted)
        first = self.ask()
        self.answer_json()
        self.assertEqual(self.cached(first.reply()), b"miss")
        self.assertEqual(parsed, [json.dumps(COMPLETION).encode()])
        self.assertEqual(self.h.records[-1].response_text, "Hello there")
        self.assertEqual(self.count("store"), 1.0)

    def test_hit_is_recorded_without_upstream_at_no_cost(self) -> None:
        """A hit is recorded: outcome ok, cache hit, no upstream, the original usage, cost 0."""
        self.ask()
        self.answer_json()
        self.ask()
        miss, hit = map(record_document, self.h.records)
        self.assertEqual((miss["cache"], miss["upstream"], miss["cost"]), ("miss", "a", 9e-06))
        self.assertEqual(
            {k: hit[k] for k in ("outcome", "cache", "upstream", "attempts", "usage", "cost")},
            {
                "outcome": "ok",
                "cache": "hit",
                "upstream": None,
                "attempts": [],
                "usage": USAGE,
                "cost": 0.0,
            },
        )
        self.assertEqual((hit["status"], hit["response_text"]), (200, "Hello there"))

    def test_stream_miss_then_hit(self) -> None:
        """A stream that ended with [DONE] is stored and replayed as a well-formed stream."""
        first = self.ask(stream=True)
        self.answer_stream()
        self.assertEqual(self.cached(first.reply()), b"miss")
        reply = self.ask(stream=True).reply()
        self.assertEqual((self.forwarded(), self.cached(reply)), (1, b"hit"))
        self.assertEqual(reply.header(b"content-type"), b"text/event-stream")
        replayed = sse_events(reply.body)
        self.assertEqual(
            [e["choices"][0] for e in replayed[:-1]],
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                },
                {
                    "index": 0,
                    "delta": {"content": "Hello there"},
                    "logprobs": None,
                    "finish_reason": None,
                },
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
            ],
        )
        self.assertEqual(replayed[-1], "[DONE]")
        self.assertEqual(
            {(e["id"], e["object"], e["model"]) for e in replayed[:-1]},
            {("chatcmpl-1", "chat.completion.chunk", "gpt-4o-mini")},
        )
        record = record_document(self.h.records[1])
        self.assertEqual(record["usage"], USAGE)
        self.assertEqual(record["response_text"], "Hello there")

    def test_usage_chunk_only_when_asked(self) -> None:
        """A replayed stream ends with a usage chunk when the client asks for one."""
        self.ask(stream=True)
        self.answer_stream()
        asked = {**CACHING, "stream_options": {"include_usage": True}}
        reply = self.ask(stream=True, extra=asked).reply()
        self.assertEqual(self.cached(reply), b"hit")
        *_, usage, done = sse_events(reply.body)
        self.assertEqual((usage["choices"], usage["usage"], done), ([], USAGE, "[DONE]"))

    def test_stream_from_a_non_stream_entry(self) -> None:
        """A stream request is answered from a cached non-stream answer."""
        self.ask()
        self.answer_json()
        reply = self.ask(stream=True).reply()
        self.assertEqual((self.forwarded(), self.cached(reply)), (1, b"hit"))
        self.assertEqual(streamed_text(reply.body), "Hello there")
        self.assertEqual(sse_events(reply.body)[-2]["choices"][0]["finish_reason"], "stop")

    def test_non_stream_from_a_stream_entry(self) -> None:
        """A non-stream request is answered from a cached stream as one completion."""
        self.ask(stream=True)
        self.answer_stream()
        reply = self.ask().reply()
        self.assertEqual((self.forwarded(), self.cached(reply)), (1, b"hit"))
        self.assertEqual(reply.json(), COMPLETION)

    def test_tool_calls_both_ways(self) -> None:
        """Tool calls survive a stream stored as a completion and replayed as a stream."""
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"x":1}'},
        }
        stream = sse(
            chunk({"role": "assistant", "content": None}),
            chunk(
                {"tool_calls": [{"index": 0, **call, "function": {"name": "f", "arguments": ""}}]}
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":1}'}}]}),
            chunk({}, "tool_calls"),
            "[DONE]",
        )
        self.ask(stream=True)
        self.answer_stream(stream)
        completion = self.ask().reply().json()
        self.assertEqual(
            completion["choices"][0],
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            },
        )
        replayed = sse_events(self.ask(stream=True).reply().body)
        self.assertEqual(replayed[1]["choices"][0]["delta"], {"tool_calls": [{"index": 0, **call}]})
        self.assertEqual(self.forwarded(), 1)

    def test_legacy_completions_both_ways(self) -> None:
        """/v1/completions streams (choices[].text) are stored and replayed too."""
        text_chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
        stream = sse(
            json.dumps(
                {**text_chunk, "choices": [{"index": 0, "text": "Hi", "finish_reason": None}]}
            ),
            json.dumps(
                {**text_chunk, "choices": [{"index": 0, "text": "!", "finish_reason": "length"}]}
            ),
            "[DONE]",
        )
        path = b"/v1/completions"
        self.ask(stream=True, path=path)
        self.answer_stream(stream)
        completion = self.ask(path=path).reply().json()
        self.assertEqual(
            completion["choices"],
            [{"index": 0, "text": "Hi!", "logprobs": None, "finish_reason": "length"}],
        )
        replayed = sse_events(self.ask(stream=True, path=path).reply().body)
        self.assertEqual([c["choices"][0]["text"] for c in replayed[:-1]], ["Hi!", ""])
        self.assertEqual(self.forwarded(), 1)

    def test_embeddings_serve_non_stream_requests_only(self) -> None:
        """An entry that is no completion (embeddings) serves no stream request."""
        embedding = {"object": "list", "data": [{"embedding": [0.5]}], "model": "m"}
        path = b"/v1/embeddings"
        self.ask(path=path)
        self.answer_json(embedding)
        self.assertEqual(self.ask(path=path).reply().json(), embedding)
        streamed = self.ask(stream=True, path=path)
        self.assertEqual(self.forwarded(), 2)
        self.answer_json(embedding)
        self.assertEqual(self.cached(streamed.reply()), b"miss")

    def test_metrics(self) -> None:
        """oaproxy_cache_total counts hits, misses, bypasses and stores."""
        self.ask()
        self.answer_json()
        self.ask()
        self.ask(extra={})
        self.answer_json()
        self.assertEqual(
            [self.count(r) for r in ("hit", "miss", "bypass", "store")], [1.0, 1.0, 1.0, 1.0]
        )
        # A hit used no upstream's tokens.
        tokens = self.h.shared.metrics.registry.get_sample_value(
            "oaproxy_tokens_total", {"upstream": "a", "model": "gpt-4o-mini", "kind": "prompt"}
        )
        self.assertEqual(tokens, 10.0)


class KeyTests(CacheCase):
    def test_key_order_and_user_do_not_change_the_key(self) -> None:
        """The same body with its keys in another order, or another user, is a hit."""
        self.ask(extra={"user": "u1", "temperature": 0.5, **CACHING})
        self.answer_json()
        body = (
            b'{"caching": true, "temperature": 0.5, "user": "u2",'
            b' "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o-mini"}'
        )
        reply = self.h.request(
            b"POST",
            b"/v1/chat/completions",
            body,
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-alice")],
        ).reply()
        self.assertEqual((self.cached(reply), self.forwarded()), (b"hit", 1))

    def test_temperature_changes_the_key(self) -> None:
        """A parameter that changes the answer makes another entry."""
        self.ask(extra={"temperature": 0.5, **CACHING})
        self.answer_json()
        other = self.ask(extra={"temperature": 0.7, **CACHING})
        self.assertEqual(self.forwarded(), 2)
        self.answer_json()
        self.assertEqual(self.cached(other.reply()), b"miss")

    def test_keys_are_isolated(self) -> None:
        """One client key's entries are not served to another."""
        self.ask(key="sk-alice")
        self.answer_json()
        bob = self.ask(key="sk-bob")
        self.assertEqual(self.forwarded(), 2)
        self.answer_json()
        self.assertEqual(self.cached(bob.reply()), b"miss")
        self.assertEqual(self.cached(self.ask(key="sk-bob").reply()), b"hit")

    def test_namespaces_and_keys(self) -> None:
        """Namespaces are key names (never keys); the key is a hex SHA-256."""
        self.assertEqual(namespace("alice", shared=False), "key:alice")
        self.assertEqual(namespace(None, shared=False), "anonymous")
        self.assertEqual(namespace("alice", shared=True), "shared")
        key = cache_key("key:alice", "/v1/embeddings", {"input": "\ud800", "stream": True})
        self.assertEqual(len(key or ""), 64)
        self.assertEqual(key, cache_key("key:alice", "/v1/embeddings", {"input": "\ud800"}))
        self.assertNotEqual(key, cache_key("key:bob", "/v1/embeddings", {"input": "\ud800"}))

    def test_the_key_stays_what_it_was(self) -> None:
        """Keys stored in Redis by an earlier oaproxy are still found: the
        hash of the namespace, the path and the sorted compact JSON, each
        followed by a NUL."""
        body = {"z": [1, {"b": "é", "a": None}], "model": "m", "user": "u", "caching": True}
        canonical = '{"model":"m","z":[1,{"a":null,"b":"\\u00e9"}]}'
        named = "\0".join(("key:alice", "/v1/chat/completions", canonical, ""))
        self.assertEqual(
            cache_key("key:alice", "/v1/chat/completions", body),
            hashlib.sha256(named.encode()).hexdigest(),
        )
        self.assertEqual(
            cache_key("key:alice", "/v1/chat/completions", body),
            cache_key("key:alice", "/v1/chat/completions", {"z": body["z"], "model": "m"}),
        )

    def test_routes_match_under_any_prefix(self) -> None:
        """cache.routes are API paths, matched on what follows a route prefix."""
        self.assertEqual(api_path(b"/v1/chat/completions"), "/v1/chat/completions")
        self.assertEqual(
            api_path(b"/ollama/v1/chat/completions", ["/ollama"]), "/v1/chat/completions"
        )
        self.assertEqual(api_path(b"/v2/chat"), None)


class SharedTests(CacheCase):
    config = CONFIG.replace("cache: {ttl: 60}", "cache: {ttl: 60, shared: true}")

    def test_shared_serves_every_key(self) -> None:
        """With shared: true one key's entry serves another."""
        self.ask(key="sk-alice")
        self.answer_json()
        reply = self.ask(key="sk-bob").reply()
        self.assertEqual((self.cached(reply), self.forwarded()), (b"hit", 1))


class ExpiryTests(CacheCase):
    def test_ttl(self) -> None:
        """An entry is served for ttl seconds, then the request is a miss again."""
        self.ask()
        self.answer_json()
        self.h.clock.advance(59)
        self.assertEqual(self.cached(self.ask().reply()), b"hit")
        self.h.clock.advance(1)
        self.ask()
        self.assertEqual(self.forwarded(), 2)

    def test_lru_bounded_by_entries_and_bytes(self) -> None:
        """The memory store drops the least recently used entries past either bound."""
        store = MemoryStore(Clock(), ttl=60, max_entries=2, max_bytes=10)
        # Stored at once: nothing to wait for.
        self.assertIsNone(cast(AnswerStore, store).put("a", b"1234"))
        store.put("b", b"1234")
        self.assertEqual(store.get("a"), b"1234")  # b is now the oldest
        store.put("c", b"1234")
        self.assertEqual((store.get("b"), len(store)), (None, 2))
        store.put("d", b"123456789")
        self.assertEqual(
            (store.get("a"), store.get("c"), store.get("d")), (None, None, b"123456789")
        )
        self.assertEqual(store.bytes, 9)
        store.put("e", b"x" * 11)  # larger than the whole store
        self.assertEqual((store.get("e"), store.get("d")), (None, b"123456789"))


class WhatIsStoredTests(CacheCase):
    def test_errors_are_not_stored(self) -> None:
        """Only 200 answers are stored: an upstream error passes, marked miss."""
        first = self.ask()
        self.answer_json({"error": {"message": "bad"}}, status=400)
        self.assertEqual((first.reply().status, self.cached(first.reply())), (400, b"miss"))
        self.ask()
        self.answer_json({"error": {"message": "bad"}})  # a 200 that is an error
        self.ask()
        self.assertEqual(self.forwarded(), 3)
        self.assertEqual(self.count("store"), None)

    def test_stream_without_done_is_not_stored(self) -> None:
        """A stream that ends without [DONE] is relayed but not stored."""
        self.ask(stream=True)
        self.answer_stream(STREAM.replace(b"data: [DONE]\n\n", b""))
        self.ask(stream=True)
        self.assertEqual(self.forwarded(), 2)

    def test_broken_stream_is_not_stored(self) -> None:
        """A stream cut off mid-way is not stored."""
        self.ask(stream=True)
        response = self.h.agent.calls[-1].respond(200, b"text/event-stream")
        response.write(sse(chunk({"role": "assistant", "content": "Hel"})))
        response.fail()
        self.ask(stream=True)
        self.assertEqual(self.forwarded(), 2)

    def test_client_gone_is_not_stored(self) -> None:
        """A stream whose client left before the end is not stored."""
        client = self.ask(stream=True)
        response = self.h.agent.calls[-1].respond(200, b"text/event-stream")
        response.write(sse(chunk({"role": "assistant", "content": "Hel"})))
        client.disconnect()
        self.ask(stream=True)
        self.assertEqual(self.forwarded(), 2)

    def test_large_answers_are_not_stored(self) -> None:
        """Answers over max_entry_bytes are passed on, not stored."""
        h = Harness(CONFIG.replace("cache: {ttl: 60}", "cache: {max_entry_bytes: 100}"))
        self.h = h
        self.ask()
        self.answer_json({**COMPLETION, "id": "x" * 100})
        self.ask()
        self.assertEqual(self.forwarded(), 2)

    def test_answers_too_large_to_parse_are_not_stored(self) -> None:
        """A non-stream answer over 1 MiB (never joined nor parsed) is passed
        on whole but not stored, even under a larger max_entry_bytes."""
        self.h = Harness(CONFIG.replace("cache: {ttl: 60}", "cache: {max_entry_bytes: 4194304}"))
        large = {**COMPLETION, "id": "x" * (MAX_PARSED_ANSWER + 1)}
        first = self.ask()
        self.answer_json(large)
        self.assertEqual(first.reply().body, json.dumps(large).encode())
        self.assertEqual(self.cached(first.reply()), b"miss")
        self.ask()
        self.assertEqual((self.forwarded(), self.count("store")), (2, None))

    def test_large_stream_entry_is_not_parsed_for_a_hits_record(self) -> None:
        """A stream stored as a completion over 1 MiB (max_entry_bytes allows
        it) answers a non-stream hit whole; its record, like a large answer's,
        keeps the usage and marks the text truncated."""
        self.h = Harness(CONFIG.replace("cache: {ttl: 60}", "cache: {max_entry_bytes: 4194304}"))
        text = "x" * (MAX_PARSED_ANSWER + 1)
        self.ask(stream=True)
        self.answer_stream(
            sse(chunk({"role": "assistant", "content": text}), chunk({}, "stop"), USAGE_CHUNK)
            + sse("[DONE]")
        )
        reply = self.ask().reply()
        self.assertEqual(
            (self.cached(reply), reply.json()["choices"][0]["message"]["content"]), (b"hit", text)
        )
        record = record_document(self.h.records[1])
        self.assertEqual(
            (record["response_text"], record["truncated"], record["usage"]),
            (None, ["response_text"], USAGE),
        )


class BypassTests(CacheCase):
    def test_not_asked_is_a_bypass(self) -> None:
        """With default: false a request without "caching": true is not looked up."""
        client = self.ask(extra={})
        self.answer_json()
        self.assertEqual(self.cached(client.reply()), b"bypass")
        self.assertEqual(record_document(self.h.records[0])["cache"], "bypass")
        self.ask()  # nothing was stored
        self.assertEqual(self.forwarded(), 2)

    def test_default_true(self) -> None:
        """With default: true every request is looked up unless "caching": false."""
        self.h = Harness(CONFIG.replace("cache: {ttl: 60}", "cache: {default: true}"))
        self.ask(extra={})
        self.answer_json()
        self.assertEqual(self.cached(self.ask(extra={}).reply()), b"hit")
        refused = self.ask(extra={"caching": False})
        self.answer_json()
        self.assertEqual((self.cached(refused.reply()), self.forwarded()), (b"bypass", 2))

    def test_caching_never_reaches_the_upstream(self) -> None:
        """ "caching" is removed from every JSON body, with or without a cache."""
        for config in (CONFIG, CONFIG.replace("cache: {ttl: 60}", "")):
            self.h = Harness(config)
            self.ask(extra={"caching": False, "temperature": 1})
            call = self.h.agent.calls[-1]
            self.assertEqual(
                call.json(),
                {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 1,
                },
            )
            self.assertEqual(call.producer.length, len(call.body))  # type: ignore[union-attr]

    def test_large_bodies_are_not_looked_up(self) -> None:
        """A body too large to parse at once is a bypass, "caching" cut all the same."""
        long = [{"role": "user", "content": "x" * (2 * WALK_AT_ONCE)}]
        client = self.ask(extra={"messages": long, **CACHING})
        self.h.clock.advance(0)
        self.assertNotIn("caching", self.h.agent.calls[-1].json())
        self.answer_json()
        self.assertEqual(self.cached(client.reply()), b"bypass")

    def test_other_routes_say_nothing(self) -> None:
        """Routes not in cache.routes, and methods other than POST, carry no header."""
        moderation = self.ask(path=b"/v1/moderations")
        self.answer_json({"results": []})
        models = self.h.request(
            b"GET", b"/v1/models", b"", [(b"Authorization", b"Bearer sk-alice")]
        )
        self.h.agent.calls[-1].respond(200, body=b'{"data": []}')
        self.assertEqual(
            (self.cached(moderation.reply()), self.cached(models.reply())), (None, None)
        )
        self.assertEqual([r.cache for r in self.h.records], [None, None])

    def test_our_header_wins_over_the_upstreams(self) -> None:
        """An upstream (another oaproxy) saying X-Oaproxy-Cache does not decide ours."""
        client = self.ask()
        self.h.agent.calls[-1].respond(
            200, body=json.dumps(COMPLETION).encode(), headers=headers({"X-Oaproxy-Cache": "hit"})
        )
        self.assertEqual(self.cached(client.reply()), b"miss")


class ReplayTests(SynchronousTestCase):
    def test_several_choices_replayed_each(self) -> None:
        """A completion with n > 1 choices is replayed choice by choice."""
        completion = {
            **COMPLETION,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "A"},
                    "finish_reason": "stop",
                },
                {
                    "index": 1,
                    "message": {"role": "assistant", "content": "B"},
                    "finish_reason": "length",
                },
            ],
        }
        stream = stream_from_completion(completion, include_usage=False)
        assert stream is not None
        parts = [e["choices"][0] for e in sse_events(stream)[:-1]]
        self.assertEqual(
            [(p["index"], p["delta"].get("content"), p["finish_reason"]) for p in parts],
            [
                (0, "", None),
                (0, "A", None),
                (0, None, "stop"),
                (1, "", None),
                (1, "B", None),
                (1, None, "length"),
            ],
        )

    def test_streams_that_are_not_stored(self) -> None:
        """Streams with several choices or an error chunk amount to no completion."""
        several = StreamedAnswer(1000)
        for data in (
            json.dumps(
                {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": "A"}}],
                }
            ),
            json.dumps(
                {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 1, "delta": {"content": "B"}}],
                }
            ),
            "[DONE]",
        ):
            several.feed(data.encode())
        self.assertEqual(several.completion(), None)
        failed = StreamedAnswer(1000)
        for data in (chunk({"content": "A"}), json.dumps({"error": {"message": "x"}}), "[DONE]"):
            failed.feed(data.encode())
        self.assertEqual(failed.completion(), None)
        cut = StreamedAnswer(3)
        for data in (chunk({"content": "ABCD"}), "[DONE]"):
            cut.feed(data.encode())
        self.assertEqual(cut.completion(), None)

    def test_an_event_parsed_once_for_record_and_cache(self) -> None:
        """A stream's event fed to the record's capture and the cache's answer
        is parsed once, and both get all of it."""
        parses: list[bytes | str] = []
        real = sse_module.event_json

        def counted(data: bytes | str) -> Any:
            parses.append(data)
            return real(data)

        self.patch(sse_module, "event_json", counted)
        record = capture.StreamCapture(1000)
        answer = StreamedAnswer(1000)
        events = [chunk({"role": "assistant", "content": "Hi"}), chunk({"content": " there"})]
        for data in [e.encode() for e in events] + [b"[DONE]"]:
            answer.feed(data)
            record.feed(data)
        self.assertEqual(len(parses), 2)
        self.assertEqual(record.result().text, "Hi there")
        stored = answer.completion()
        assert stored is not None
        self.assertEqual(json.loads(stored)["choices"][0]["message"]["content"], "Hi there")
        # A new bytes object with the same text is parsed again (never a stale parse).
        record.feed(events[1].encode())
        self.assertEqual(len(parses), 3)


class ReloadTests(CacheCase):
    def test_entries_outlive_a_reload_that_keeps_the_cache(self) -> None:
        """A reload with the same cache: section keeps the cache; another makes a new one."""
        same = build_generation(make_config(CONFIG), self.h.shared, self.h.generation)
        self.assertIs(same.response_cache, self.h.generation.response_cache)
        other = make_config(CONFIG.replace("ttl: 60", "ttl: 61"))
        changed = build_generation(other, self.h.shared, self.h.generation)
        self.assertIsNot(changed.response_cache, self.h.generation.response_cache)
