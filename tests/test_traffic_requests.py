"""Request limits through the real pipeline, in memory on a ``Clock``: who
counts where, the 429, OpenAI's headers on every answer, records, metrics."""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaproxy.record import (
    BadRecord,
    LimitKind,
    LimitRefusal,
    LimitScope,
    Outcome,
    record_document,
    record_from_document,
)
from oaproxy.traffic import request_limits
from oaproxy.traffic.counters import Reading
from oaproxy.traffic.headers import openai_duration, retry_after, set_rate_headers
from oaproxy.traffic.rediscounters import REDIS_TIMEOUT
from oaproxy.traffic.routes import RouteTable
from tests.doubles import Client, Harness, headers
from tests.payloads import api_path, sse

CONFIG = """
dbtype: none
authorization:
  alice: sk-alice
  bob: {key: sk-bob, rate_limit: "3/minute"}
limits:
  per_key: "2/minute"
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a, allow: [gpt-4o-mini]}
"""

ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()

# OpenAI's formats (as its API answers them): counts, and Go durations.
COUNT = re.compile(rb"\A[0-9]+\Z")
DURATION = re.compile(rb"\A(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+(?:\.[0-9]+)?s|[0-9]+ms)\Z")


class Limited(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)

    def served(self, client: Client, **respond: object) -> Client:
        """Answer the request in flight (the last agent call) with ANSWER."""
        self.h.agent.calls[-1].respond(body=ANSWER, **respond)  # type: ignore[arg-type]
        return client

    def ratelimit(self, client: Client, what: str = "requests") -> tuple[bytes, bytes, bytes]:
        reply = client.reply()
        values = tuple(
            reply.header(f"x-ratelimit-{name}-{what}".encode())
            for name in ("limit", "remaining", "reset")
        )
        assert all(value is not None for value in values), reply.headers
        return values  # type: ignore[return-value]


class PerKeyTests(Limited):
    def test_the_limit_then_429(self) -> None:
        """A key gets its limit, then a 429 (with its standard reason phrase,
        which Twisted lacks) that never reaches an upstream."""
        first = self.served(self.h.chat(key="sk-alice"))
        self.assertEqual(self.ratelimit(first), (b"2", b"1", b"1m0s"))
        self.h.clock.advance(15)
        second = self.served(self.h.chat(key="sk-alice"))
        self.assertEqual(self.ratelimit(second), (b"2", b"0", b"1m0s"))
        self.h.clock.advance(5)
        refused = self.h.chat(key="sk-alice")
        self.assertEqual(len(self.h.agent.calls), 2)
        reply = refused.reply()
        self.assertEqual((reply.status, reply.phrase), (429, b"Too Many Requests"))
        self.assertEqual(
            reply.json(),
            {
                "error": {
                    "message": "Rate limit reached for requests: 2/minute for this key."
                    " Please try again in 40s.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        )
        # The first request leaves the window 40 s from now, the second 55 s.
        self.assertEqual(reply.header(b"retry-after"), b"40")
        self.assertEqual(self.ratelimit(refused), (b"2", b"0", b"55s"))
        self.h.clock.advance(40)
        self.assertEqual(self.served(self.h.chat(key="sk-alice")).reply().status, 200)

    def test_refusals_are_recorded_and_counted(self) -> None:
        """A refused request has its record (outcome rate_limited, which limit) and its count."""
        for _ in range(2):
            self.served(self.h.chat(key="sk-alice"))
        self.h.chat(key="sk-alice")
        record = record_document(self.h.records[-1])
        self.assertEqual((record["status"], record["outcome"]), (429, "rate_limited"))
        self.assertEqual(record["limit"], {"kind": "requests", "scope": "key", "limit": "2/minute"})
        self.assertEqual(record["attempts"], [])
        self.assertIsNone(self.h.records[0].limit)
        registry = self.h.shared.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "oaproxy_rate_limited_total", {"kind": "requests", "scope": "key"}
            ),
            1.0,
        )

    def test_keys_count_apart_and_a_key_may_have_its_own(self) -> None:
        """Each key has its own counter; bob's rate_limit replaces per_key."""
        for _ in range(2):
            self.served(self.h.chat(key="sk-alice"))
        self.assertEqual(self.h.chat(key="sk-alice").reply().status, 429)
        for _ in range(3):
            self.assertEqual(self.served(self.h.chat(key="sk-bob")).reply().status, 200)
        refused = self.h.chat(key="sk-bob")
        self.assertEqual(refused.reply().status, 429)
        self.assertEqual(record_document(self.h.records[-1])["limit"]["limit"], "3/minute")

    def test_headers_on_every_answer_over_the_upstreams(self) -> None:
        """Errors, relayed answers and streams all carry the client's own limit,
        replacing the upstream's headers (which describe the upstream key)."""
        theirs = headers(
            {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999"}
        )
        relayed = self.served(self.h.chat(key="sk-alice"), headers=theirs)
        self.assertEqual(self.ratelimit(relayed)[:2], (b"2", b"1"))
        self.h.clock.advance(60)
        stream = self.h.chat(key="sk-alice", stream=True)
        response = self.h.agent.calls[-1].respond(
            200,
            b"text/event-stream",
            headers=headers({"x-ratelimit-limit-requests": "10000"}),
        )
        response.write(sse('{"choices":[{"delta":{"content":"hi"}}]}', "[DONE]"))
        response.finish()
        self.assertEqual(stream.reply().status, 200)
        self.assertEqual(self.ratelimit(stream)[:2], (b"2", b"1"))
        unknown = self.h.chat(model="no-such-model", key="sk-alice")
        self.assertEqual(unknown.reply().status, 404)
        self.assertEqual(self.ratelimit(unknown)[:2], (b"2", b"0"))

    def test_headers_in_openai_format(self) -> None:
        """The headers' values are what OpenAI's SDKs and tools parse."""
        client = self.served(self.h.chat(key="sk-alice"))
        limit, remaining, reset = self.ratelimit(client)
        self.assertRegex(limit, COUNT)
        self.assertRegex(remaining, COUNT)
        self.assertRegex(reset, DURATION)
        for seconds, text in [
            (0.02, "20ms"),
            (1, "1s"),
            (59.5, "59.5s"),
            (86.4, "1m26.4s"),
            (360, "6m0s"),
            (3600, "1h0m0s"),
            (0.0001, "1ms"),
        ]:
            self.assertEqual(openai_duration(seconds), text)
            self.assertRegex(text.encode(), DURATION)
        self.assertEqual([retry_after(s) for s in (0.1, 1, 1.5, 40)], ["1", "1", "2", "40"])

    def test_unauthorized_requests_are_not_counted(self) -> None:
        """The 401 comes first: a wrong key uses up no one's limit."""
        for _ in range(3):
            self.assertEqual(self.h.chat(key="sk-wrong").reply().status, 401)
        self.assertEqual(self.served(self.h.chat(key="sk-alice")).reply().status, 200)


class ScopeTests(Limited):
    config = """
dbtype: none
authorization: {alice: sk-alice, bob: sk-bob}
limits:
  global: "3/minute"
  routes:
    /v1/embeddings: "1/minute"
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: open, endpoint: "https://open.test/v1", noauth: true, allow: [open-model]}
"""

    def embed(self, key: str) -> Client:
        body = json.dumps({"model": "text-embedding-3-small", "input": "hi"}).encode()
        lines = [
            (b"Content-Type", b"application/json"),
            (b"Authorization", b"Bearer " + key.encode()),
        ]
        return self.h.request(b"POST", b"/v1/embeddings", body, lines)

    def test_global_counts_everyone(self) -> None:
        """The global limit is shared by every key."""
        self.served(self.h.chat(key="sk-alice"))
        self.served(self.h.chat(key="sk-bob"))
        self.served(self.h.chat(key="sk-alice"))
        refused = self.h.chat(key="sk-bob")
        self.assertEqual(refused.reply().status, 429)
        self.assertEqual(record_document(self.h.records[-1])["limit"]["scope"], "global")

    def test_route_limit_per_key(self) -> None:
        """A route's limit counts each key on that route only."""
        self.assertEqual(self.served(self.embed("sk-alice")).reply().status, 200)
        refused = self.embed("sk-alice")
        self.assertEqual(refused.reply().status, 429)
        self.assertEqual(
            record_document(self.h.records[-1])["limit"],
            {"kind": "requests", "scope": "route", "limit": "1/minute"},
        )
        self.assertIn(b"for this key on /v1/embeddings", refused.reply().body)
        # A refusal by the route uses up nothing of the global limit.
        self.assertEqual(self.served(self.embed("sk-bob")).reply().status, 200)
        self.assertEqual(self.served(self.h.chat(key="sk-alice")).reply().status, 200)
        self.assertEqual(self.h.chat(key="sk-bob").reply().status, 429)
        self.assertEqual(record_document(self.h.records[-1])["limit"]["scope"], "global")

    def test_requests_without_a_key_count_per_address(self) -> None:
        """Without a key, a client's address is whom the limit counts."""
        config = self.config.replace('global: "3/minute"', 'per_key: "1/minute"')
        self.h = Harness(config)
        first = self.served(self.h.chat(model="open-model", key=None, peer="10.0.0.1"))
        self.assertEqual(first.reply().status, 200)
        self.assertEqual(
            self.h.chat(model="open-model", key=None, peer="10.0.0.1").reply().status, 429
        )
        self.assertIn(
            b"for this client address",
            self.h.chat(model="open-model", key=None, peer="10.0.0.1").reply().body,
        )
        other = self.served(self.h.chat(model="open-model", key=None, peer="10.0.0.2"))
        self.assertEqual(other.reply().status, 200)

    def test_addresses_past_the_plans_kept_still_count(self) -> None:
        """The checks made per address are let go past PLANS_KEPT (addresses
        are without number); an address seen before still counts as before."""
        config = self.config.replace('global: "3/minute"', 'per_key: "1/minute"')
        self.h = Harness(config)
        self.patch(request_limits, "PLANS_KEPT", 3)
        self.served(self.h.chat(model="open-model", key=None, peer="10.0.0.1"))
        for last in range(2, 6):
            peer = f"10.0.0.{last}"
            self.assertEqual(
                self.served(self.h.chat(model="open-model", key=None, peer=peer)).reply().status,
                200,
            )
        self.assertEqual(
            self.h.chat(model="open-model", key=None, peer="10.0.0.1").reply().status, 429
        )


class FixedWindowTests(Limited):
    config = CONFIG.replace('per_key: "2/minute"', 'per_key: "2/minute"\n  strategy: fixed-window')

    def test_the_count_starts_over_with_each_window(self) -> None:
        """Fixed windows start over at their boundary, whenever the uses came."""
        self.h.clock.advance(50)
        self.served(self.h.chat(key="sk-alice"))
        refused_later = self.served(self.h.chat(key="sk-alice"))
        self.assertEqual(self.ratelimit(refused_later), (b"2", b"0", b"10s"))
        self.assertEqual(self.h.chat(key="sk-alice").reply().status, 429)
        self.h.clock.advance(10)
        self.assertEqual(self.served(self.h.chat(key="sk-alice")).reply().status, 200)


class RateHeaderTests(SynchronousTestCase):
    def test_reset_values_kept_are_those_written(self) -> None:
        """The reset values kept from earlier requests are what the format
        gives, for the same value again as for a new one."""
        for reset in (60.0, 60.0, 0.5, 86.4, 1.25, 60.0, 3600.0, 0.5):
            written = Headers()
            set_rate_headers(written, "requests", Reading(7, 2, reset, 0.0))
            self.assertEqual(
                [
                    written.getRawHeaders(f"x-ratelimit-{part}-requests".encode())
                    for part in ("limit", "remaining", "reset")
                ],
                [[b"7"], [b"5"], [openai_duration(reset).encode()]],
            )


class RouteMatchTests(SynchronousTestCase):
    def test_api_path_under_a_prefix(self) -> None:
        """Routes match a request's API path (what follows its route prefix,
        without the query), on whole segments."""
        self.assertEqual(
            api_path(b"/ollama/v1/chat/completions", ["/ollama"]), "/v1/chat/completions"
        )
        self.assertIsNone(api_path(b"/healthz"))
        table = RouteTable({"/v1/files": 1, "/v1/files/special": 2, "/v1/chat": 3})
        self.assertEqual(table.match("/v1/files/abc"), ("/v1/files", 1))
        self.assertEqual(table.match("/v1/files/special/x"), ("/v1/files/special", 2))
        self.assertEqual(table.match(api_path(b"/v1/chat/completions?x=1") or ""), ("/v1/chat", 3))
        self.assertIsNone(table.match("/v1/filesystem"))
        self.assertEqual(
            table.match(api_path(b"/team/v1/files", ["/team"]) or ""), ("/v1/files", 1)
        )


class RefusalRecordTests(Limited):
    def test_the_stored_form_of_a_refusal(self) -> None:
        """A refusal's record stores its limit, reads back the same, and other
        records are stored as they always were (no "limit" at all)."""
        for _ in range(2):
            self.served(self.h.chat(key="sk-alice"))
        self.h.chat(key="sk-alice")
        served, refused = self.h.records[0], self.h.records[-1]
        self.assertEqual(refused.outcome, Outcome.RATE_LIMITED)
        self.assertEqual(
            refused.limit, LimitRefusal(LimitKind.REQUESTS, LimitScope.KEY, "2/minute")
        )
        self.assertNotIn("limit", record_document(served))
        self.assertEqual(record_from_document(record_document(refused)), refused)
        document = record_document(refused)
        document["limit"] = {"kind": "wishes", "scope": "key", "limit": "1/day"}
        self.assertRaises(BadRecord, record_from_document, document)


class HungRedisTests(SynchronousTestCase):
    """A Redis that takes the connection but never answers holds a request
    for the limiter's timeout only, then ``on_backend_error`` decides."""

    CONFIG = """
dbtype: none
authorization: {alice: sk-alice}
redis: redis://127.0.0.1:1/0
limits: {backend: redis, per_key: "10/minute", on_backend_error: POLICY}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

    def hung(self, policy: str) -> tuple[Harness, list[Deferred[Any]]]:
        h = Harness(self.CONFIG.replace("POLICY", policy))
        redis = h.generation.shared_redis
        assert redis is not None
        pending: list[Deferred[Any]] = []

        def command(*arguments: object) -> Deferred[Any]:
            pending.append(Deferred())
            return pending[-1]

        redis.command = command  # type: ignore[method-assign]
        return h, pending

    def test_closed_answers_503_after_the_timeout(self) -> None:
        """closed: nothing is forwarded; after REDIS_TIMEOUT a 503
        limiter_unavailable, counted, and nothing left waiting."""
        h, pending = self.hung("closed")
        client = h.chat(key="sk-alice")
        h.clock.advance(REDIS_TIMEOUT - 0.1)
        self.assertEqual((client.written, h.agent.calls), (b"", []))
        h.clock.advance(0.1)
        reply = client.reply()
        self.assertEqual(
            (reply.status, reply.json()["error"]["code"]), (503, "limiter_unavailable")
        )
        self.assertEqual(h.agent.calls, [])
        self.assertTrue(all(d.called for d in pending))
        self.assertEqual(
            h.shared.metrics.registry.get_sample_value("oaproxy_limiter_backend_errors_total"), 1
        )

    def test_open_serves_after_the_timeout(self) -> None:
        """open: after REDIS_TIMEOUT the request goes on, without rate headers."""
        h, _ = self.hung("open")
        client = h.chat(key="sk-alice")
        self.assertEqual(h.agent.calls, [])
        h.clock.advance(REDIS_TIMEOUT)
        h.agent.only().respond(body=ANSWER)
        reply = client.reply()
        self.assertEqual(reply.status, 200)
        self.assertIsNone(reply.header(b"x-ratelimit-remaining-requests"))
