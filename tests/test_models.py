"""oaproxy.models: ``GET /v1/models`` answered by oaproxy for each client key.

Through the real site with a ``Clock`` and a recording agent: upstreams'
own lists are fetched only when a client asks and the kept copy is due.
"""

from __future__ import annotations

import json

from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.circuits import CircuitState
from oaproxy.models import FETCH_TIMEOUT, LIST_LIFETIME, RETRY_LIFETIME, parse_list
from tests.doubles import AgentCall, Client, Harness, capture_log
from tests.payloads import bearer

CONFIG = """
authorization: {alice: sk-alice-000, bob: sk-bob-0000}
upstreams:
  - name: listed
    endpoint: https://listed.test/v1
    allow: [gpt-4o-mini, gpt-4o, /v1/audio/transcriptions]
    deny: [gpt-4o]
    models: {fast: gpt-4o-mini}
  - name: own
    endpoint: https://own.test/v1
    sk: sk-own-upstream-1
    models: {big: llama-3-70b}
    deny: [secret-model]
  - name: bobs
    endpoint: https://bobs.test/v1
    authorization: {bob: sk-bob-0000}
    allow: [bob-model]
  - name: routed
    endpoint: https://routed.test/v1
    route: /ollama
    allow: [llama3]
"""
OWN_LIST = {
    "object": "list",
    "data": [
        {"id": "llama-3-70b", "object": "model", "created": 1700000000, "owned_by": "meta"},
        {"id": "mixtral", "object": "model", "created": 1700000001, "owned_by": "mistral"},
        {"id": "secret-model", "object": "model", "created": 1, "owned_by": "x"},
        {"id": "gpt-4o-mini", "object": "model", "created": 2, "owned_by": "openai"},
    ],
}


class ModelsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def ask(self, key: str = "sk-alice-000", path: bytes = b"/v1/models") -> Client:
        return self.h.request(b"GET", path, b"", [bearer(key)])

    def fetch(self) -> AgentCall:
        """The one fetch of own's list the last ask made."""
        call = self.h.agent.calls[-1]
        self.assertEqual((call.method, call.uri), (b"GET", b"https://own.test/v1/models"))
        self.assertEqual(call.header(b"authorization"), [b"Bearer sk-own-upstream-1"])
        return call

    def ids(self, client: Client) -> list[str]:
        reply = client.reply()
        self.assertEqual(reply.status, 200, reply.body)
        document = reply.json()
        self.assertEqual(document["object"], "list")
        return [entry["id"] for entry in document["data"]]

    def test_per_key_union(self) -> None:
        """Each key sees the models of the upstreams it may use: allow lists
        and aliases, the upstream's own list with aliases shown instead of
        the names they stand for, the denied left out, each name once."""
        alice = self.ask()
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        self.assertEqual(self.ids(alice), ["gpt-4o-mini", "fast", "big", "mixtral"])
        bob = self.ask("sk-bob-0000")
        self.assertEqual(self.ids(bob), ["gpt-4o-mini", "fast", "big", "mixtral", "bob-model"])
        # One fetch: the kept copy served the second ask.
        self.assertEqual(len(self.h.agent.calls), 1)

    def test_openai_shape(self) -> None:
        """Entries are OpenAI's: id, object, created, owned_by (the upstream's own when listed)."""
        client = self.ask()
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        data = client.reply().json()["data"]
        self.assertEqual(
            data[:3],
            [
                {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "oaproxy"},
                {"id": "fast", "object": "model", "created": 0, "owned_by": "oaproxy"},
                {"id": "big", "object": "model", "created": 1700000000, "owned_by": "meta"},
            ],
        )

    def test_fetched_when_asked_and_due(self) -> None:
        """No fetch at start; the copy is kept 5 minutes; a failing upstream
        keeps its last good list, asked again 30 s later; 5 s deadline."""
        self.assertEqual(self.h.agent.calls, [])
        first = self.ask()
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        self.assertIn("mixtral", self.ids(first))
        self.h.clock.advance(LIST_LIFETIME - 1)
        self.ids(self.ask())
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.clock.advance(1)
        failing = self.ask()
        self.fetch().respond(500, body=b"{}")
        self.assertIn("mixtral", self.ids(failing))
        self.h.clock.advance(RETRY_LIFETIME - 1)
        self.ids(self.ask())
        self.assertEqual(len(self.h.agent.calls), 2)
        self.h.clock.advance(1)
        slow = self.ask()
        hanging = self.fetch()
        self.h.clock.advance(FETCH_TIMEOUT)
        self.assertTrue(hanging.cancelled)
        self.assertIn("mixtral", self.ids(slow))

    def test_failure_text_is_redacted_in_the_log(self) -> None:
        """A failed fetch's text is from outside: the log line quotes it without
        the upstream's key (nor anything shaped like one)."""
        events = capture_log(self)
        asked = self.ask()
        self.fetch().fail(ValueError("refused Bearer sk-own-upstream-1 and sk-unknown-0123456"))
        self.assertIn("big", self.ids(asked))
        [line] = [formatEvent(e) for e in events if "models list" in formatEvent(e)]
        self.assertIn("ValueError: refused Bearer [redacted]", line)
        self.assertNotIn("sk-own-upstream-1", line)
        self.assertNotIn("sk-unknown-0123456", line)

    def test_concurrent_asks_share_one_fetch(self) -> None:
        """Two clients asking at once wait for the same fetch; one going
        away leaves it to the other."""
        gone = self.ask()
        other = self.ask("sk-bob-0000")
        self.assertEqual(len(self.h.agent.calls), 1)
        gone.disconnect()
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        self.assertIn("bob-model", self.ids(other))

    def test_own_requests_are_no_attempts(self) -> None:
        """A failing list fetch counts for neither breakers nor readiness."""
        for _ in range(10):
            self.ask()
            self.fetch().respond(503, body=b"{}")
            self.h.clock.advance(RETRY_LIFETIME)
        circuits = self.h.shared.circuits
        self.assertEqual(circuits.view("own").failures, 0)
        self.assertIs(circuits.state("own"), CircuitState.CLOSED)
        self.assertTrue(all(record.attempts == () for record in self.h.records))
        self.assertEqual({record.status for record in self.h.records}, {200})

    def test_one_model(self) -> None:
        """``/v1/models/{id}``: the entry, or 404 model_not_found for a model
        this key may not use."""
        found = self.ask(path=b"/v1/models/big")
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        self.assertEqual(
            found.reply().json(),
            {"id": "big", "object": "model", "created": 1700000000, "owned_by": "meta"},
        )
        reply = self.ask(path=b"/v1/models/bob-model").reply()
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (404, "model_not_found"))

    def test_route_prefix(self) -> None:
        """Under a prefix, the route's upstreams' models only."""
        self.assertEqual(self.ids(self.ask(path=b"/ollama/v1/models")), ["llama3"])
        found = self.ask(path=b"/ollama/v1/models/llama3")
        self.assertEqual(found.reply().json()["id"], "llama3")

    def test_needs_a_key(self) -> None:
        """Without a key the listing is a 401, and no upstream is asked."""
        reply = self.h.request(b"GET", b"/v1/models").reply()
        self.assertEqual(reply.status, 401)
        self.assertEqual(self.h.agent.calls, [])

    def test_other_methods_are_forwarded(self) -> None:
        """Deleting a fine-tuned model is the upstream's business."""
        self.h.request(b"DELETE", b"/v1/models/ft-1", b"", [bearer("sk-alice-000")])
        self.assertEqual(self.h.agent.calls[0].method, b"DELETE")

    def test_record(self) -> None:
        """The answer is recorded like any request, without attempts."""
        client = self.ask(path=b"/v1/models/fast")
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        client.reply()
        record = self.h.record()
        self.assertEqual(
            (record["path"], record["status"], record["outcome"], record["attempts"]),
            ("/v1/models/fast", 200, "ok", []),
        )

    def test_after_the_head_gates(self) -> None:
        """Request limits count the listing and describe it in its headers;
        over the limit it is their 429, and no upstream is asked; the cache
        never looks at it."""
        self.h = Harness('limits: {per_key: "1/minute"}\ncache: {default: true}' + CONFIG)
        client = self.ask()
        self.fetch().respond(200, body=json.dumps(OWN_LIST).encode())
        reply = client.reply()
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header(b"x-ratelimit-limit-requests"), b"1")
        self.assertIsNone(reply.header(b"x-oaproxy-cache"))
        refused = self.ask().reply()
        self.assertEqual(
            (refused.status, refused.json()["error"]["code"]), (429, "rate_limit_exceeded")
        )
        self.assertEqual(len(self.h.agent.calls), 1)


class ParseTests(SynchronousTestCase):
    def test_lenient(self) -> None:
        """Entries without an id are skipped; missing fields get defaults."""
        entries = parse_list(
            json.dumps(
                {"data": [{"id": "a"}, {"name": "b"}, {"id": "c", "created": True}]}
            ).encode()
        )
        self.assertEqual(
            [(e.id, e.created, e.owned_by) for e in entries],
            [("a", 0, "oaproxy"), ("c", 0, "oaproxy")],
        )

    def test_not_a_list(self) -> None:
        """Anything but an OpenAI-shaped list is a failed fetch."""
        for body in (b"[]", b'{"data": {}}', b"nope"):
            self.assertRaises(ValueError, parse_list, body)
