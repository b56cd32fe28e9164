"""Route prefixes and model aliases, through the real site.

``/ollama/v1/…`` goes to the upstreams with ``route: /ollama`` only, as
``{endpoint}/…``; ``/v1/…`` to those without a route. Aliases rename the
model for one upstream only.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.headers import UPSTREAM_HEADER
from oaproxy.record import record_document
from tests.doubles import Client, Harness
from tests.payloads import CHAT_ANSWER, bearer, chat_body, sse, sse_event

ROUTES = """
authorization: {alice: sk-alice-000, bob: sk-bob-0000}
upstreams:
  - {name: main, endpoint: "https://main.test/v1", sk: sk-main}
  - {name: ollama, endpoint: "http://ollama.test:11434/v1", route: /ollama}
  - {name: team, endpoint: "https://team.test/api/v1", route: /team/a, authorization: {bob: sk-bob-0000}}
"""
OK = CHAT_ANSWER
JSON = (b"Content-Type", b"application/json")


class PrefixTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(ROUTES)

    def post(self, path: bytes, key: str = "sk-alice-000") -> Client:
        return self.h.request(b"POST", path, chat_body(), [JSON, bearer(key)])

    def test_prefix_goes_to_its_upstreams(self) -> None:
        """A prefixed path reaches its route's upstream only, the API path
        appended to its endpoint, and the answer names it."""
        client = self.h.request(
            b"POST", b"/ollama/v1/chat/completions?x=1", chat_body(), [JSON, bearer("sk-alice-000")]
        )
        call = self.h.agent.only()
        self.assertEqual(call.uri, b"http://ollama.test:11434/v1/chat/completions?x=1")
        call.respond(200, body=OK)
        reply = client.reply()
        self.assertEqual((reply.status, reply.header(UPSTREAM_HEADER)), (200, b"ollama"))
        record = self.h.record()
        self.assertEqual(
            (record["path"], record["route"], record["upstream"]),
            ("/ollama/v1/chat/completions?x=1", "/ollama", "ollama"),
        )

    def test_plain_v1_never_reaches_a_route(self) -> None:
        """/v1 is served by the upstreams without a route; a failing one does
        not fail over into a route's upstreams."""
        client = self.post(b"/v1/chat/completions")
        call = self.h.agent.only()
        self.assertEqual(call.uri, b"https://main.test/v1/chat/completions")
        call.respond(500, body=b"{}")
        self.assertEqual(client.reply().status, 500)
        self.assertEqual(len(self.h.agent.calls), 1)
        self.assertIsNone(self.h.record()["route"])

    def test_multi_segment_route_with_its_keys(self) -> None:
        """A route of two segments; the upstream's own key scope applies under it."""
        refused = self.post(b"/team/a/v1/chat/completions")
        self.assertEqual(refused.reply().status, 403)
        client = self.post(b"/team/a/v1/chat/completions", key="sk-bob-0000")
        call = self.h.agent.only()
        self.assertEqual(call.uri, b"https://team.test/api/v1/chat/completions")
        call.respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)

    def test_keys_required_under_a_prefix(self) -> None:
        """No key, no answer: the same 401 as under /v1."""
        reply = self.h.request(b"POST", b"/ollama/v1/chat/completions", chat_body(), [JSON]).reply()
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(self.h.agent.calls, [])

    def test_path_rules_under_a_prefix(self) -> None:
        """Climbing or escaped paths under a prefix are refused like under /v1;
        a prefix that is no route is not found."""
        for path in (b"/ollama/v1/../../x", b"/ollama/v1/%2e%2e/x", b"/ollama/v1/./models"):
            reply = self.h.request(b"GET", path, b"", [bearer("sk-alice-000")]).reply()
            self.assertEqual(reply.status, 400, path)
        for path in (
            b"/ollama/%761/models",
            b"/%6Fllama/v1/models",
            b"/other/v1/models",
            b"/ollama/models",
        ):
            reply = self.h.request(b"GET", path, b"", [bearer("sk-alice-000")]).reply()
            self.assertEqual(reply.status, 404, path)
        self.assertEqual(self.h.agent.calls, [])

    def test_metrics_carry_the_prefix(self) -> None:
        """Prefixed requests count under their API route and their prefix."""
        client = self.post(b"/ollama/v1/chat/completions")
        self.h.agent.only().respond(200, body=OK)
        client.reply()
        text = generate_latest(self.h.shared.metrics.registry).decode()
        self.assertIn(
            'oaproxy_requests_total{route="/v1/chat/completions",status_class="2xx",'
            'upstream="ollama"} 1.0',
            text,
        )
        self.assertIn(
            'oaproxy_prefix_requests_total{prefix="/ollama",status_class="2xx"} 1.0', text
        )


ALIASES = """
authorization: {alice: sk-alice-000}
upstreams:
  - name: azure
    endpoint: "https://azure.test/v1"
    allow: [gpt-4o-mini]
    models: {gpt-4o: my-deployment-4o}
  - name: plain
    endpoint: "https://plain.test/v1"
    deny: [my-deployment-4o]
"""


class AliasTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(ALIASES)

    def test_upstream_sees_its_own_name(self) -> None:
        """The alias's upstream gets its own name; the next candidate gets the
        body as the client sent it; the record keeps both names."""
        client = self.h.chat("gpt-4o", key="sk-alice-000", extra={"temperature": 0.5})
        first = self.h.agent.calls[0]
        self.assertEqual(first.json()["model"], "my-deployment-4o")
        self.assertEqual(first.json()["temperature"], 0.5)
        self.assertEqual(first.producer.length, len(first.body))  # type: ignore[union-attr]
        first.respond(500, body=b"{}")
        second = self.h.agent.calls[1]
        self.assertEqual(second.json()["model"], "gpt-4o")
        # The answer's model is passed on as the upstream wrote it.
        second.respond(200, body=b'{"model": "gpt-4o-2024-08-06", "choices": []}')
        self.assertEqual(client.reply().json()["model"], "gpt-4o-2024-08-06")
        record = self.h.record()
        self.assertEqual((record["model"], record["upstream_model"]), ("gpt-4o", "gpt-4o"))

    def test_record_keeps_the_upstream_name(self) -> None:
        """Served by the alias's upstream, the record has the client's and the upstream's names."""
        client = self.h.chat("gpt-4o", key="sk-alice-000")
        self.h.agent.calls[0].respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        record = self.h.record()
        self.assertEqual(
            (record["model"], record["upstream_model"], record["upstream"]),
            ("gpt-4o", "my-deployment-4o", "azure"),
        )

    def test_alias_serves_through_an_allow_list(self) -> None:
        """An alias is allowed by being one; deny and allow name client names."""
        self.h.chat("my-deployment-4o", key="sk-alice-000")
        self.assertEqual(self.h.agent.calls, [])
        self.assertEqual(self.h.record()["status"], 404)

    def test_stream_usage_and_alias_together(self) -> None:
        """A stream's body gets both rewrites for the alias's upstream."""
        self.h.chat("gpt-4o", key="sk-alice-000", stream=True)
        sent = self.h.agent.calls[0].json()
        self.assertEqual(
            (sent["model"], sent["stream_options"]), ("my-deployment-4o", {"include_usage": True})
        )


PREFIXED = """
authorization: {alice: sk-alice-000}
upstreams:
  - {name: main, endpoint: "https://main.test/v1", sk: sk-main}
  - {name: ollama, endpoint: "http://ollama.test:11434/v1", route: /ollama}
"""


class TrafficUnderAPrefixTests(SynchronousTestCase):
    """Limits and the cache match API paths, so they work under a prefix."""

    def post(self, h: Harness, path: bytes, body: bytes | None = None) -> Client:
        return h.request(b"POST", path, body or chat_body(), [JSON, bearer("sk-alice-000")])

    def test_a_route_limit_under_a_prefix(self) -> None:
        """limits.routes' /v1/chat/completions counts /ollama/v1/chat/completions
        too, with the limit's headers beside the upstream's name; the route's
        counter is one for the API path, whatever the prefix."""
        h = Harness('limits: {routes: {/v1/chat/completions: "1/minute"}}' + PREFIXED)
        client = self.post(h, b"/ollama/v1/chat/completions")
        h.agent.only().respond(200, body=OK)
        reply = client.reply()
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header(UPSTREAM_HEADER), b"ollama")
        self.assertEqual(reply.header(b"x-ratelimit-limit-requests"), b"1")
        self.assertEqual(reply.header(b"x-ratelimit-remaining-requests"), b"0")
        for path in (b"/ollama/v1/chat/completions", b"/v1/chat/completions"):
            refused = self.post(h, path).reply()
            self.assertEqual(refused.status, 429, path)
            self.assertIsNone(refused.header(UPSTREAM_HEADER))
        self.assertEqual(len(h.agent.calls), 1)
        record = record_document(h.records[1])
        self.assertEqual(
            (record["route"], record["outcome"], record["limit"]),
            (
                "/ollama",
                "rate_limited",
                {"kind": "requests", "scope": "route", "limit": "1/minute"},
            ),
        )

    def test_the_cache_under_a_prefix(self) -> None:
        """A prefix's answers are cached and served under it; /v1 has entries
        of its own, since other upstreams serve it."""
        h = Harness("cache: {default: true}" + PREFIXED)
        miss = self.post(h, b"/ollama/v1/chat/completions")
        h.agent.only().respond(200, body=OK)
        self.assertEqual(miss.reply().header(b"x-oaproxy-cache"), b"miss")
        hit = self.post(h, b"/ollama/v1/chat/completions").reply()
        self.assertEqual((hit.header(b"x-oaproxy-cache"), hit.body), (b"hit", OK))
        self.assertEqual(len(h.agent.calls), 1)
        plain = self.post(h, b"/v1/chat/completions")
        call = h.agent.calls[-1]
        self.assertEqual(call.uri, b"https://main.test/v1/chat/completions")
        call.respond(200, body=OK)
        self.assertEqual(plain.reply().header(b"x-oaproxy-cache"), b"miss")
        self.assertEqual(
            [(r.route, r.cache.value if r.cache else None) for r in h.records],
            [("/ollama", "miss"), ("/ollama", "hit"), (None, "miss")],
        )

    def test_a_stream_paced_under_a_prefix(self) -> None:
        """limits.stream_pace's /v1/chat/completions paces a prefix's streams too."""
        h = Harness('limits: {stream_pace: {/v1/chat/completions: "2/second"}}' + PREFIXED)
        body = chat_body(stream=True)
        client = self.post(h, b"/ollama/v1/chat/completions", body)
        response = h.agent.only().respond(200, b"text/event-stream")
        first, second = (sse_event({"choices": [{"delta": {"content": t}}]}) for t in "ab")
        response.write(first + second + sse("[DONE]"))
        response.finish()
        self.assertEqual(client.reply().body, first)
        h.clock.advance(0.5)
        self.assertEqual(client.reply().body, first + second + sse("[DONE]"))
