"""The response cache and the limits on one request: the lookup comes after
the request limits and before the token limits, and both say so through the
same answer headers."""

from __future__ import annotations

from oaproxy.record import CacheResult, Outcome
from tests.doubles import Harness, Reply
from tests.test_cache import CONFIG, CacheCase

LIMITED = CONFIG + 'limits: {per_key: "10/minute", tokens_per_key: "10000/minute"}\n'


def remaining(reply: Reply, what: str) -> int | None:
    value = reply.header(b"x-ratelimit-remaining-" + what.encode())
    return None if value is None else int(value)


class CacheWithLimitsTests(CacheCase):
    config = LIMITED

    def test_a_hit_counts_a_request_and_no_tokens(self) -> None:
        """A hit counts against the request limit and carries its headers
        beside X-Oaproxy-Cache, but reserves and settles no tokens."""
        first = self.ask()
        self.answer_json()
        miss = first.reply()
        self.assertEqual((self.cached(miss), remaining(miss, "requests")), (b"miss", 9))
        estimate = 10000 - (remaining(miss, "tokens") or 0)

        hit = self.ask().reply()
        self.assertEqual(self.forwarded(), 1)
        self.assertEqual((self.cached(hit), remaining(hit, "requests")), (b"hit", 8))
        self.assertIsNone(remaining(hit, "tokens"))
        self.assertIsNone(self.h.exchanges[-1].reservation)
        record = self.h.records[-1]
        self.assertEqual(
            (record.outcome, record.cache, record.cost), (Outcome.OK, CacheResult.HIT, 0)
        )

        # Forwarded again: only the miss's real usage (7 tokens) was spent.
        bypass = self.ask(extra={"caching": False})
        self.answer_json()
        self.assertEqual(remaining(bypass.reply(), "tokens"), 10000 - 7 - estimate)

    def test_a_request_limit_refuses_before_the_lookup(self) -> None:
        """Over the request limit a cached request gets 429, without X-Oaproxy-Cache."""
        self.h = Harness(LIMITED.replace('per_key: "10/minute"', 'per_key: "1/minute"'))
        self.ask()
        self.answer_json()
        refused = self.ask().reply()
        self.assertEqual((refused.status, self.cached(refused)), (429, None))
        self.assertEqual(refused.header(b"x-ratelimit-remaining-requests"), b"0")
        record = self.h.records[-1]
        self.assertEqual((record.outcome, record.cache), (Outcome.RATE_LIMITED, None))
