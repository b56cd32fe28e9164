"""Token limits and budgets through the real pipeline, in memory on a
``Clock``: reservations, their settlement with the real usage, refunds,
the 429s and 403, and the estimate itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.cli import UsageRow
from oaproxy.config import BackendErrorPolicy, Budget, BudgetPeriod
from oaproxy.record import CacheResult, record_document
from oaproxy.sinks.sql import insert_statement, migrate, open_database, record_row
from oaproxy.traffic import tokens as token_gate
from oaproxy.traffic.backend import BackendTrouble
from oaproxy.traffic.budgets import BudgetHistory, budget_counter, period_at, period_usage
from oaproxy.traffic.counters import Admission, Charge, Held
from oaproxy.traffic.estimate import estimate, text_characters, tokens
from oaproxy.traffic.memory import MemoryCounters
from oaproxy.traffic.tokens import TokenLimits
from tests.doubles import WALL_TIME, Client, Harness
from tests.payloads import multipart, sse
from tests.records import numbered, usage

# One message "hi" with role "user": 6 characters, 2 prompt tokens.
# max_tokens 298: each request reserves 300 tokens.
RESERVED = 300
EXTRA = {"max_tokens": 298}

CONFIG = """
dbtype: none
authorization:
  alice: sk-alice
  bob: {key: sk-bob, token_limit: "100000/minute", budget: {tokens: 1000, period: day}}
  carol: {key: sk-carol, token_limit: "100000/minute", budget: {usd: 0.0005, period: month}}
limits:
  tokens_per_key: "1000/minute"
  default_max_tokens: 100
prices:
  gpt-4o-mini: {input: 0.15, output: 0.60}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""


def answer(prompt: int = 7, completion: int = 4) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    ).encode()


def guess(body: dict[str, Any], path: str, default_max_tokens: int) -> Any:
    """The estimate of a parsed body, as the token gate makes it."""
    return estimate(text_characters(body), body, path, default_max_tokens)


class TokenCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def ask(self, key: str = "sk-alice", **extra: Any) -> Client:
        return self.h.chat(key=key, extra={**EXTRA, **extra})

    def answered(self, client: Client) -> Client:
        self.h.agent.calls[-1].respond(body=answer())
        return client

    def tokens_headers(self, client: Client) -> tuple[bytes | None, ...]:
        reply = client.reply()
        return tuple(
            reply.header(f"x-ratelimit-{name}-tokens".encode())
            for name in ("limit", "remaining", "reset")
        )


class TokenLimitTests(TokenCase):
    def test_concurrent_requests_never_pass_the_limit(self) -> None:
        """Reservations are made when a request arrives: requests in flight
        together cannot overspend (3 x 300 fit in 1000, the fourth does not)."""
        clients = [self.ask() for _ in range(5)]
        self.assertEqual(len(self.h.agent.calls), 3)
        self.assertEqual([c.written != b"" for c in clients], [False, False, False, True, True])
        refused = clients[3].reply()
        self.assertEqual(refused.status, 429)
        error = refused.json()["error"]
        self.assertEqual((error["type"], error["code"]), ("tokens", "rate_limit_exceeded"))
        self.assertIn("needs about 300, 100 remain", error["message"])
        self.assertEqual(refused.header(b"retry-after"), b"60")
        self.assertEqual(self.tokens_headers(clients[3]), (b"1000", b"100", b"1m0s"))
        self.assertEqual(
            record_document(self.h.records[0])["limit"],
            {"kind": "tokens", "scope": "key", "limit": "1000/minute"},
        )

    def test_callers_past_the_counters_kept_still_count(self) -> None:
        """The counters made per caller are let go past COUNTERS_KEPT
        (callers by address are without number); a caller seen before still
        counts what it used before."""
        self.patch(token_gate, "COUNTERS_KEPT", 2)
        for _ in range(3):
            self.answered(self.ask())
        for other in ("sk-bob", "sk-carol"):
            self.assertEqual(self.answered(self.ask(key=other)).reply().status, 200)
        # alice used 3 x 11 tokens, then reserves 300 more of her 1000.
        self.assertEqual(self.tokens_headers(self.answered(self.ask())), (b"1000", b"667", b"1m0s"))
        # 44 used: 962 more do not fit.
        self.assertEqual(self.ask(max_tokens=960).reply().status, 429)

    def test_real_usage_replaces_the_reservation(self) -> None:
        """Once answered, a request counts what it used, not its estimate."""
        first = self.ask()
        self.h.agent.calls[0].respond(body=answer(7, 4))
        self.assertEqual(self.tokens_headers(first), (b"1000", b"700", b"1m0s"))
        # 11 used, so three more reservations of 300 fit.
        for _ in range(3):
            self.ask()
        self.assertEqual(len(self.h.agent.calls), 4)
        self.assertEqual(self.ask().reply().status, 429)

    def test_a_failed_request_is_refunded(self) -> None:
        """No answer, or an error answer, uses nothing: the reservation is given back."""
        self.ask()
        self.ask()
        self.ask()
        self.h.agent.calls[0].respond(500, body=b'{"error": {"message": "down"}}')
        self.h.agent.calls[1].respond(400, body=b'{"error": {"message": "bad"}}')
        self.assertEqual([r["status"] for r in map(record_document, self.h.records)], [500, 400])
        for _ in range(2):
            self.ask()
        self.assertEqual(len(self.h.agent.calls), 5)

    def test_a_client_that_leaves_is_refunded(self) -> None:
        """A client gone before the answer gives its reservation back."""
        for _ in range(3):
            gone = self.ask()
        gone.disconnect()
        self.assertEqual(record_document(self.h.records[-1])["outcome"], "client_disconnected")
        self.ask()
        self.assertEqual(len(self.h.agent.calls), 4)

    def test_an_answer_without_usage_keeps_the_estimate(self) -> None:
        """A stream cut before its usage chunk counts as estimated."""
        stream = self.h.chat(key="sk-alice", stream=True, extra=EXTRA)
        response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        response.write(sse('{"choices":[{"delta":{"content":"hi"}}]}'))
        response.fail()
        self.assertEqual(stream.reply().status, 200)
        self.assertEqual(record_document(self.h.records[-1])["outcome"], "stream_failed")
        self.ask()
        self.ask()
        self.assertEqual(len(self.h.agent.calls), 3)
        self.assertEqual(self.ask().reply().status, 429)

    def test_a_stream_counts_its_usage_chunk(self) -> None:
        """Streams count too: the usage oaproxy asked for settles them."""
        stream = self.h.chat(key="sk-alice", stream=True, extra=EXTRA)
        response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        response.write(
            sse(
                '{"choices":[{"delta":{"content":"hi"}}]}',
                '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}',
                "[DONE]",
            )
        )
        response.finish()
        self.assertEqual(stream.reply().status, 200)
        self.assertEqual(self.tokens_headers(self.answered(self.ask()))[1], b"690")

    def test_a_request_larger_than_the_limit(self) -> None:
        """A request whose estimate alone passes the limit is refused, told not to retry."""
        reply = self.ask(max_tokens=5000).reply()
        self.assertEqual(reply.status, 429)
        self.assertIn(
            "Request too large for tokens: about 5002 tokens", reply.json()["error"]["message"]
        )
        self.assertEqual(reply.header(b"x-should-retry"), b"false")
        self.assertIsNone(reply.header(b"retry-after"))

    def test_requests_without_a_model_are_not_counted(self) -> None:
        """Listing files (a request without a model) spends no tokens."""
        for _ in range(10):
            client = self.h.request(
                b"GET", b"/v1/files", header_lines=[(b"Authorization", b"Bearer sk-alice")]
            )
            self.h.agent.calls[-1].respond(body=b'{"data": []}')
            self.assertIsNone(client.reply().header(b"x-ratelimit-limit-tokens"))
        self.assertEqual(len(self.h.agent.calls), 10)

    def test_the_keys_own_token_limit(self) -> None:
        """A key's token_limit replaces tokens_per_key."""
        self.assertEqual(self.tokens_headers(self.answered(self.ask("sk-bob")))[0], b"100000")


class BudgetTests(TokenCase):
    def test_tokens_budget(self) -> None:
        """A budget in tokens: three reservations of 300 fit in 1000, the
        fourth gets insufficient_quota, saying which budget and when it resets."""
        for _ in range(3):
            self.ask("sk-bob")
        reply = self.ask("sk-bob").reply()
        self.assertEqual(reply.status, 429)
        error = reply.json()["error"]
        self.assertEqual((error["type"], error["code"]), ("insufficient_quota", "budget_exceeded"))
        self.assertEqual(
            error["message"],
            "Budget exceeded: key bob has a budget of 1000 tokens/day; 900 tokens of it is"
            " used. It resets at 2023-11-15T00:00:00Z.",
        )
        # WALL_TIME is 2023-11-14T22:13:20Z: 6400 s before midnight.
        self.assertEqual(reply.header(b"retry-after"), b"6400")
        self.assertEqual(reply.header(b"x-should-retry"), b"false")
        self.assertEqual(
            record_document(self.h.records[-1])["limit"],
            {"kind": "budget", "scope": "key", "limit": "1000 tokens/day"},
        )
        registry = self.h.shared.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "oaproxy_rate_limited_total", {"kind": "budget", "scope": "key"}
            ),
            1.0,
        )

    def test_dollar_budget_counts_the_price(self) -> None:
        """A budget in dollars reserves the estimate at the model's price
        (2 x $0.15 + 298 x $0.60 per million: 180 micro-dollars) and settles
        with the real cost (7 x 0.15 + 4 x 0.60: 4 micro-dollars)."""
        self.ask("sk-carol")
        self.ask("sk-carol")
        self.assertEqual(self.ask("sk-carol").reply().status, 429)
        self.h.agent.calls[0].respond(body=answer(7, 4))
        self.ask("sk-carol")
        self.assertEqual(len(self.h.agent.calls), 3)
        error = self.ask("sk-carol").reply().json()["error"]
        self.assertEqual(
            error["message"],
            "Budget exceeded: key carol has a budget of 0.0005 usd/month; $0.000364 of it is"
            " used. It resets at 2023-12-01T00:00:00Z.",
        )

    def test_dollar_budget_needs_a_price(self) -> None:
        """A key whose budget is in dollars may not use a model without a price."""
        reply = self.h.chat(model="gpt-4o", key="sk-carol").reply()
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["error"]["code"], "model_not_priced")
        self.assertEqual(self.h.agent.calls, [])
        self.assertEqual(self.h.chat(model="gpt-4o", key="sk-alice").written, b"")

    def transcribe(self, key: str, model: str) -> Client:
        """An audio transcription: a form whose model is a text field."""
        boundary = b"b0undary"
        body = multipart(
            boundary,
            [
                (b'Content-Disposition: form-data; name="model"', model.encode()),
                (b'Content-Disposition: form-data; name="file"; filename="a.wav"', b"RIFF" * 64),
            ],
        )
        lines = [
            (b"Content-Type", b"multipart/form-data; boundary=" + boundary),
            (b"Authorization", b"Bearer " + key.encode()),
        ]
        return self.h.request(b"POST", b"/v1/audio/transcriptions", body, lines)

    def test_a_forms_model_needs_a_price_too(self) -> None:
        """A form names its model too: a key with a budget in dollars may not
        use one without a price; with one, the form reserves nothing (its
        audio is no prompt) and counts what its answer's usage says."""
        reply = self.transcribe("sk-carol", "whisper-1").reply()
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (403, "model_not_priced"))
        self.assertEqual(self.h.agent.calls, [])
        client = self.transcribe("sk-carol", "gpt-4o-mini")
        self.assertEqual(len(self.h.agent.calls), 1)
        self.h.agent.calls[0].respond(body=answer(1000, 200))
        self.assertEqual(client.reply().status, 200)
        # 1000 x $0.15 + 200 x $0.60 per million: 270 of the 500
        # micro-dollars, so one chat reservation (180) fits, not two.
        self.ask("sk-carol")
        self.assertEqual(len(self.h.agent.calls), 2)
        self.assertEqual(self.ask("sk-carol").reply().status, 429)

    def test_history_counts_before_the_first_check(self) -> None:
        """In memory, a period's earlier spending (from the SQL store) is
        added before the budget is first checked, once per period."""
        counters = MemoryCounters(self.h.clock)
        history = BudgetHistory(counters)
        budget = Budget(tokens=1000, period=BudgetPeriod.DAY)
        period = period_at(budget.period, WALL_TIME)
        counter = budget_counter("bob", budget, period, WALL_TIME)
        asked: list[tuple[str, float, float]] = []
        pending: Deferred[UsageRow | None] = Deferred()

        def read(key: str, since: float, until: float) -> Deferred[UsageRow | None]:
            asked.append((key, since, until))
            return pending

        first = history.ready(counter, "bob", budget, period, read)
        second = history.ready(counter, "bob", budget, period, read)
        assert first is not None and second is not None
        self.assertFalse(first.called)
        pending.callback(UsageRow({"key": "bob"}, 3, 3, 500, 400, 900, None))
        self.assertTrue(first.called and second.called)
        self.assertEqual(asked, [("bob", period.start, period.end)])
        self.assertIsNone(history.ready(counter, "bob", budget, period, read))
        admission = counters.acquire([Charge(counter, 200)])
        self.assertFalse(admission.admitted)
        self.assertEqual(admission.readings[0].used, 900)
        self.assertIsNone(
            BudgetHistory(counters).ready(counter, "bob", budget, period, lambda *a: succeed(None))
        )

    def test_history_leaves_out_cache_hits(self) -> None:
        """What the records of a period spent counts the answers upstreams
        gave, not the cache's hits (which carry the original answer's usage
        but spent nothing, as they spend nothing while the daemon runs)."""
        dbaddr = self.mktemp() + ".sqlite"
        connection = open_database("sqlite", dbaddr)
        cursor = connection.cursor()
        migrate(cursor, "sqlite")
        forwarded = numbered(1, key_name="bob", usage=usage(7, 4))
        hit = numbered(
            2, key_name="bob", usage=usage(7, 4), upstream=None, attempts=(), cache=CacheResult.HIT
        )
        for record in (forwarded, hit):
            cursor.execute(insert_statement("sqlite"), record_row(record, "sqlite"))
        connection.commit()
        connection.close()
        row = period_usage("sqlite", dbaddr, "bob", forwarded.time - 1, hit.time + 1)
        assert row is not None
        self.assertEqual((row.requests, row.total_tokens), (1, 11))


class EstimateTests(SynchronousTestCase):
    def test_prompt_characters_over_four(self) -> None:
        """The prompt is the body's text / 4: every string but the model and inline media."""
        body = {
            "model": "gpt-4o-mini-with-a-long-name",
            "messages": [
                {"role": "system", "content": "x" * 94},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "y" * 100},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + "A" * 9999},
                        },
                    ],
                },
            ],
            "max_completion_tokens": 50,
            "n": 2,
        }
        # system(6) + 94 + user(4) + text(4) + 100 + image_url(9) = 217 -> 55
        self.assertEqual(guess(body, "/v1/chat/completions", 1024), tokens(55, 100))

    def test_completion_default_and_embeddings(self) -> None:
        """Without max_tokens the default applies; embeddings complete nothing."""
        self.assertEqual(guess({"prompt": "abcd"}, "/v1/completions", 64), tokens(1, 64))
        self.assertEqual(guess({"input": "abcd" * 10}, "/v1/embeddings", 64), tokens(10, 0))
        self.assertEqual(
            guess({"input": "x", "max_output_tokens": 9}, "/v1/responses", 64), tokens(1, 9)
        )

    def test_deep_bodies_do_not_exhaust_the_stack(self) -> None:
        """A hostile, deeply nested body is walked without recursion."""
        body: Any = "z"
        for _ in range(100_000):
            body = [body]
        self.assertEqual(guess({"input": body}, "/v1/embeddings", 64), tokens(1, 0))


class SlowCounters:
    """A store whose answers the test gives, as Redis would, later."""

    def __init__(self) -> None:
        self.asked: list[Deferred[Admission]] = []
        self.settled: list[tuple[Held, list[int]]] = []

    def acquire(self, charges: Sequence[Charge]) -> Deferred[Admission]:
        self.asked.append(Deferred())
        self.charges = tuple(charges)
        return self.asked[-1]

    def settle(self, held: Held, amounts: Sequence[int]) -> None:
        self.settled.append((held, list(amounts)))


class AbandonedReservationTests(TokenCase):
    def test_a_reservation_made_for_a_client_gone_is_refunded(self) -> None:
        """A client that leaves while the store answers cancels only its wait:
        the reservation the store made meanwhile is given back."""
        slow = SlowCounters()
        trouble = BackendTrouble(BackendErrorPolicy.OPEN, self.h.clock, lambda: None)
        gate = TokenLimits(self.h.config, slow, trouble, self.h.clock, lambda: WALL_TIME)
        self.h.pipeline._gates = (gate,)
        client = self.ask()
        [asked] = slow.asked
        client.disconnect()
        self.assertEqual(self.h.agent.calls, [])
        held = Held("m", slow.charges)
        asked.callback(Admission(True, (), held))
        self.assertEqual(slow.settled, [(held, [0])])
        self.assertEqual(self.h.agent.calls, [])
