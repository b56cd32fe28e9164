"""Tests for the content filter (``oaproxy.contentfilter``): RE2 patterns and
whole words on the text a model would read, exempt upstreams, and linear
time on input that makes backtracking engines hang."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy import jsonscan
from oaproxy.circuits import CircuitState
from oaproxy.config import ContentFilterConfig
from oaproxy.contentfilter import ContentFilter, item_texts, model_texts
from oaproxy.inspection import WALK_AT_ONCE, Inspected
from oaproxy.requestbody import RequestBody
from tests.doubles import Client, Harness
from tests.payloads import CHAT_ANSWER
from tests.test_inspection import fields

CONFIG = r"""
authorization: {alice: sk-client}
content_filter:
  patterns: ['\bpass(word)?\b', 'sk-[a-z0-9]{20}']
  words: [project-x, 秘密]
upstreams:
  - {name: checked, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: internal, endpoint: "https://b.test/v1", sk: sk-b, content_filter: false}
"""

ONLY_CHECKED = CONFIG.replace(
    '  - {name: internal, endpoint: "https://b.test/v1", sk: sk-b, content_filter: false}\n', ""
)


def rules(*, patterns: tuple[str, ...] = (), words: tuple[str, ...] = ()) -> ContentFilter:
    return ContentFilter(ContentFilterConfig(patterns=patterns, words=words))


class MatchingTests(SynchronousTestCase):
    def test_patterns_and_words(self) -> None:
        """Patterns are RE2 and case-insensitive; words match whole words only."""
        f = rules(patterns=(r"\bpass(word)?\b",), words=("project-x", "秘密"))
        self.assertEqual(f.first_match(iter(["My PASSWORD is"])), "patterns[0]")
        self.assertEqual(f.first_match(iter(["on Project-X."])), "words[0]")
        self.assertEqual(f.first_match(iter(["project-x"])), "words[0]")
        self.assertEqual(f.first_match(iter(["这是 秘密 吗"])), "words[1]")
        self.assertEqual(f.first_match(iter(["project-xy", "passport", "my_project-x"])), None)

    def test_first_rule_in_config_order(self) -> None:
        """When several rules match, the first in the config is named."""
        f = rules(patterns=("b", "a"), words=("a",))
        self.assertEqual(f.first_match(iter(["a b"])), "patterns[0]")
        self.assertEqual(f.first_match(iter(["a"])), "patterns[1]")

    def test_pathological_input_is_linear(self) -> None:
        """(a+)+$ on 100 000 a's and a '!', exponential for Python's re, is instant in RE2."""
        f = rules(patterns=("(a+)+$", "(x+x+)+y"))
        hostile = ["a" * 100_000 + "!", "x" * 100_000]
        started = time.perf_counter()
        self.assertEqual(f.first_match(iter(hostile)), None)
        self.assertLess(time.perf_counter() - started, 1.0)

    def test_lone_surrogates(self) -> None:
        """Text that is no valid UTF-8 (a "\\ud800" escape) is checked, not raised on."""
        self.assertEqual(
            rules(words=("password",)).first_match(iter(["\ud800 password"])), "words[0]"
        )

    def test_texts_a_model_reads(self) -> None:
        """Checked: messages content and text parts and tool call arguments,
        prompt, input (with function calls and their outputs), instructions;
        nothing else."""
        body: dict[str, Any] = {
            "model": "password",
            "messages": [
                {"role": "system", "content": "one"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "two"},
                        {"type": "image_url", "image_url": {"url": "https://x/password"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "password",
                            "type": "function",
                            "function": {"name": "password", "arguments": '{"a": "called"}'},
                        }
                    ],
                    "function_call": {"name": "password", "arguments": "legacy"},
                },
                {"role": "tool", "content": "three", "name": "password", "tool_call_id": "x"},
            ],
            "prompt": ["four", [1, 2, 3]],
            "input": [
                "five",
                {"role": "user", "content": [{"type": "input_text", "text": "six"}]},
                {"type": "input_text", "text": "seven"},
                {"type": "function_call", "call_id": "password", "arguments": "args"},
                {"type": "function_call_output", "call_id": "password", "output": "out"},
            ],
            "instructions": "eight",
            "user": "password",
        }
        self.assertEqual(
            list(model_texts(body)),
            [
                *("one", "two", '{"a": "called"}', "legacy", "three", "four", "five"),
                *("six", "seven", "args", "out", "eight"),
            ],
        )
        self.assertEqual(list(model_texts({"input": "alone", "prompt": "p"})), ["p", "alone"])


class ThroughTheSiteTests(SynchronousTestCase):
    def ask(self, h: Harness, text: str, **more: Any) -> Client:
        return h.chat(extra={"messages": [{"role": "user", "content": text}], **more})

    def test_hit_is_refused_naming_the_rule(self) -> None:
        """A match with no exempt candidate is 400 content_filter naming the rule, not the text."""
        h = Harness(ONLY_CHECKED)
        reply = self.ask(h, "here is sk-abcdefghij0123456789 for you").reply()
        self.assertEqual(reply.status, 400)
        error = reply.json()["error"]
        self.assertEqual(
            (error["code"], error["type"]), ("content_filter", "invalid_request_error")
        )
        self.assertIn("patterns[1]", error["message"])
        self.assertNotIn("sk-abcdefghij", reply.body.decode())
        self.assertEqual(h.agent.calls, [])
        self.assertEqual((h.record()["status"], h.record()["outcome"]), (400, "client_error"))

    def test_miss_goes_to_every_candidate(self) -> None:
        """A request that matches nothing is served as usual, checked upstreams first."""
        h = Harness(CONFIG)
        self.ask(h, "hello")
        self.assertEqual(h.agent.only().uri, b"https://a.test/v1/chat/completions")

    def test_hit_goes_to_exempt_candidates_only(self) -> None:
        """A match is served by the exempt upstreams only."""
        h = Harness(CONFIG)
        client = self.ask(h, "the Password")
        call = h.agent.only()
        self.assertEqual(call.uri, b"https://b.test/v1/chat/completions")
        call.respond(200, body=json.dumps({"choices": []}).encode())
        self.assertEqual(client.reply().status, 200)
        self.assertEqual(h.record()["upstream"], "internal")

    def test_all_exempt_is_not_checked(self) -> None:
        """When every candidate is exempt the text is not even read."""
        h = Harness(CONFIG.replace("sk: sk-a}", "sk: sk-a, content_filter: false}"))
        content_filter = h.pipeline._candidate_filters[0]
        assert isinstance(content_filter, ContentFilter)

        def never(texts: Any) -> str:
            raise AssertionError("the text was checked")

        self.patch(content_filter, "first_match", never)
        self.ask(h, "password")
        self.assertEqual(h.agent.only().uri, b"https://a.test/v1/chat/completions")

    def test_no_rules_no_filter(self) -> None:
        """A content_filter without patterns or words filters nothing."""
        h = Harness(ONLY_CHECKED.replace("patterns:", "#").replace("words:", "#"))
        self.assertFalse([f for f in h.pipeline._candidate_filters if isinstance(f, ContentFilter)])


ORDERED = """
authorization: {alice: sk-client}
breaker: {failures: 1, cooldown: 10}
content_filter: {words: [project-x]}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b, content_filter: false}
  - {name: c, endpoint: "https://c.test/v1", sk: sk-c, content_filter: false}
"""


class FilterOrderTests(SynchronousTestCase):
    """The content filter narrows the candidates before the balancing policy
    orders them and before the breakers choose a probe."""

    def ask(self, h: Harness, text: str) -> Client:
        return h.chat(extra={"messages": [{"role": "user", "content": text}]})

    def test_the_policy_rotates_over_the_exempt(self) -> None:
        """round_robin over a matching request's candidates: the exempt b and c
        take turns (rotating over a, b and c first would give b, b, c)."""
        h = Harness("lb_policy: round_robin\n" + ORDERED)
        for _ in range(3):
            client = self.ask(h, "about project-x")
            h.agent.calls[-1].respond(200, body=CHAT_ANSWER)
            self.assertEqual(client.reply().status, 200)
        self.assertEqual([call.host for call in h.agent.calls], ["b", "c", "b"])

    def test_no_probe_for_an_upstream_filtered_out(self) -> None:
        """A matching request never takes the probe of a half-open upstream it
        may not use: a request that may, sent while the first is in flight,
        probes it."""
        h = Harness(ORDERED)
        opened = self.ask(h, "hello")
        h.agent.calls[-1].respond(500, body=b"{}")
        h.agent.calls[-1].respond(200, body=CHAT_ANSWER)
        self.assertEqual(opened.reply().status, 200)
        self.assertIs(h.shared.circuits.state("a"), CircuitState.OPEN)
        h.clock.advance(10)
        matching = self.ask(h, "about project-x")
        waiting = h.agent.calls[-1]
        self.assertEqual(waiting.host, "b")
        probe = self.ask(h, "hello")
        self.assertEqual(h.agent.calls[-1].host, "a")
        h.agent.calls[-1].respond(200, body=CHAT_ANSWER)
        self.assertEqual(probe.reply().status, 200)
        self.assertIs(h.shared.circuits.state("a"), CircuitState.CLOSED)
        waiting.respond(200, body=CHAT_ANSWER)
        self.assertEqual(matching.reply().status, 200)


def padding(size: int) -> list[dict[str, Any]]:
    """Harmless messages of about ``size`` bytes in all."""
    return [{"role": "user", "content": "lorem ipsum " * 80}] * (size // 1000)


class LargeBodyTests(SynchronousTestCase):
    """A body too large to parse at once is checked all the same: walked a
    step at a time, in memory or in its spool file, one item at a time."""

    def ask(self, h: Harness, messages: list[dict[str, Any]]) -> Client:
        client = h.chat(extra={"messages": messages})
        # The inspection's walk, then the filter's, a step at a time.
        self.assertEqual(client.written, b"")
        for _ in range(50):
            h.clock.advance(0)
        return client

    def test_match_deep_in_a_spooled_body(self) -> None:
        """A text part of the last of 2 MiB of messages matches: 400, nothing sent."""
        h = Harness(ONLY_CHECKED)
        last = {"role": "user", "content": [{"type": "text", "text": "my password"}]}
        reply = self.ask(h, [*padding(2 << 20), last]).reply()
        self.assertEqual(reply.status, 400)
        self.assertIn("patterns[0]", reply.json()["error"]["message"])
        self.assertEqual(h.agent.calls, [])

    def test_tool_call_arguments_in_a_large_body(self) -> None:
        """A tool call's arguments are read by the walk too: 400, nothing sent."""
        h = Harness(ONLY_CHECKED)
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "password"}}
        last = {"role": "assistant", "content": None, "tool_calls": [call]}
        reply = self.ask(h, [*padding(2 << 20), last]).reply()
        self.assertEqual(reply.status, 400)
        self.assertIn("patterns[0]", reply.json()["error"]["message"])
        self.assertEqual(h.agent.calls, [])

    def test_miss_in_a_large_body_is_forwarded(self) -> None:
        """Nothing matching in 200 KiB of messages: sent on to the checked upstream, whole."""
        h = Harness(CONFIG)
        client = self.ask(h, padding(200 << 10))
        call = h.agent.only()
        self.assertEqual(call.uri, b"https://a.test/v1/chat/completions")
        self.assertEqual(len(call.json()["messages"]), 204)
        call.respond(200, body=CHAT_ANSWER)
        self.assertEqual(client.reply().status, 200)

    def test_more_than_a_walk_reads(self) -> None:
        """A body with more values than a walk reads counts as a match: the
        exempt upstreams only, else 400."""
        self.patch(jsonscan, "MAX_BRACKETS", 100)
        # Strings cost routing's walk nothing; the filter's reads each one.
        messages = [{"role": "user", "content": ["fine"] * 200}]
        extra = {"messages": messages, "metadata": "x" * (2 * WALK_AT_ONCE)}
        h = Harness(ONLY_CHECKED)
        client = h.chat(extra=extra)
        for _ in range(10):
            h.clock.advance(0)
        reply = client.reply()
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (400, "content_filter"))
        self.assertIn("the content filter cannot check it", reply.json()["error"]["message"])
        h = Harness(CONFIG)
        h.chat(extra=extra)
        for _ in range(10):
            h.clock.advance(0)
        self.assertEqual(h.agent.only().uri, b"https://b.test/v1/chat/completions")

    def test_walked_items_are_the_parsed_ones(self) -> None:
        """What the walk gives of each item yields the texts the parsed body does."""
        body: dict[str, Any] = {
            "messages": [
                {"role": "system", "content": "one"},
                {"content": [{"type": "text", "text": "two"}, {"type": "image_url"}]},
                "not a message",
            ],
            "prompt": ["four", [1, 2]],
            "input": [{"content": "five"}, {"text": "six"}, "seven"],
            "instructions": "eight",
        }
        small = json.dumps(body).encode()
        large = json.dumps({**body, "metadata": "x" * (2 * WALK_AT_ONCE)}).encode()
        texts: list[list[str]] = [[], []]
        for data, found in zip((small, large), texts, strict=True):

            def read(name: str, item: Any, listed: bool, found: list[str] = found) -> bool:
                found.extend(item_texts(name, item, listed))
                return False

            Inspected(RequestBody(len(data), data), fields(data)).model_read_items(
                frozenset({"content", "text"}), read
            )
        self.assertIsNone(Inspected(RequestBody(len(large), large), fields(large)).parsed())
        self.assertEqual(texts, [list(model_texts(body))] * 2)
