"""The ``limits:`` section and the per-key settings in the config file:
what they read into, and the located errors for what is wrong."""

from __future__ import annotations

from oaproxy.config import (
    BackendErrorPolicy,
    Budget,
    BudgetPeriod,
    ClientKey,
    LimiterBackend,
    Limits,
    Rate,
    WindowStrategy,
)
from oaproxy.summary import summary
from tests.test_config import Helpers, parse

UPSTREAM = """
upstreams:
  - {endpoint: "https://a.test/v1"}
"""
# For the indented samples, which parse() dedents.
INDENTED_UPSTREAM = UPSTREAM.replace("\n", "\n            ")


class LimitsSectionTests(Helpers):
    def test_defaults(self) -> None:
        """Nothing is limited by default."""
        limits = parse(UPSTREAM).limits
        self.assertEqual(limits, Limits())
        self.assertEqual(
            (limits.backend, limits.strategy, limits.on_backend_error, limits.default_max_tokens),
            (
                LimiterBackend.MEMORY,
                WindowStrategy.MOVING,
                BackendErrorPolicy.OPEN,
                1024,
            ),
        )
        self.assertEqual((limits.global_, limits.per_key, dict(limits.routes)), ((), (), {}))

    def test_every_setting(self) -> None:
        """The issue's example reads as written."""
        config = parse(
            """
            redis: redis://127.0.0.1:6379/0
            limits:
              backend: redis
              strategy: fixed-window
              on_backend_error: closed
              global: "1000/minute"
              per_key: "60/minute; 1000 per day"
              routes:
                /v1/chat/completions: "100/2minutes"
                /v1/files/: "5/second"
              tokens_per_key: "100000/minute"
              default_max_tokens: 512
              stream_pace:
                /v1/chat/completions: "60/second"
            """
            + INDENTED_UPSTREAM
        )
        limits = config.limits
        self.assertEqual(limits.backend, LimiterBackend.REDIS)
        self.assertEqual(limits.strategy, WindowStrategy.FIXED)
        self.assertEqual(limits.on_backend_error, BackendErrorPolicy.CLOSED)
        self.assertEqual(limits.global_, (Rate(1000, 60, "1000/minute"),))
        self.assertEqual(limits.per_key, (Rate(60, 60, "60/minute"), Rate(1000, 86400, "1000/day")))
        self.assertEqual(
            dict(limits.routes),
            {
                "/v1/chat/completions": (Rate(100, 120, "100/2minutes"),),
                "/v1/files": (Rate(5, 1, "5/second"),),
            },
        )
        self.assertEqual(limits.default_max_tokens, 512)
        self.assertEqual(
            dict(limits.stream_pace), {"/v1/chat/completions": Rate(60, 1, "60/second")}
        )

    def test_bad_limit_string(self) -> None:
        """A limit string in no known unit, or of zero, is a config error on its line."""
        self.fails(
            'limits: {per_key: "10/fortnight"}' + UPSTREAM,
            1,
            "limits.per_key",
            "expected a limit such as 10/minute",
        )
        self.fails('limits: {global: "0/minute"}' + UPSTREAM, 1, "limits.global", "greater than 0")

    def test_routes_are_api_paths(self) -> None:
        """Keys of limits.routes must be API paths starting /v1."""
        self.fails(
            'limits:\n  routes:\n    chat/completions: "1/second"' + UPSTREAM,
            3,
            "limits.routes.chat/completions",
            "not an API path",
        )

    def test_a_pace_is_one_rate(self) -> None:
        """A stream pace is one rate, not several joined with ";"."""
        self.fails(
            'limits:\n  stream_pace:\n    /v1/chat/completions: "1/second;10/minute"' + UPSTREAM,
            3,
            "limits.stream_pace./v1/chat/completions",
            "expected one rate",
        )

    def test_redis_backend_needs_redis(self) -> None:
        """limits.backend: redis without a top-level redis: is refused on its line."""
        self.fails(
            "limits:\n  strategy: moving-window\n  backend: redis" + UPSTREAM,
            3,
            "limits.backend",
            "needs the top-level redis:",
        )

    def test_unknown_words(self) -> None:
        """An unknown strategy is refused with the allowed ones listed."""
        self.fails(
            "limits: {strategy: token-bucket}" + UPSTREAM,
            1,
            "limits.strategy",
            "expected one of: moving-window, fixed-window",
        )


class KeySettingsTests(Helpers):
    def test_a_key_with_its_own_limits(self) -> None:
        """A name may carry key, rate_limit, token_limit and budget; the other forms still work."""
        config = parse(
            """
            authorization:
              alice: k1
              bob:
                key: k2
                rate_limit: "10/minute;100/hour"
                token_limit: "20000/minute"
                budget: {usd: 50, period: month}
              carol: {key: k3, budget: {tokens: 1000000, period: day}}
            """
            + INDENTED_UPSTREAM
        )
        alice, bob, carol = config.keys
        self.assertEqual(alice, ClientKey("alice", "k1"))
        self.assertEqual(bob.secret, "k2")
        self.assertEqual(bob.rate_limit, (Rate(10, 60, "10/minute"), Rate(100, 3600, "100/hour")))
        self.assertEqual(bob.token_limit, (Rate(20000, 60, "20000/minute"),))
        self.assertEqual(bob.budget, Budget(usd=50.0, period=BudgetPeriod.MONTH))
        self.assertEqual(carol.budget, Budget(tokens=1000000, period=BudgetPeriod.DAY))
        self.assertNotIn("k2", repr(config))

    def test_the_same_limits_on_an_upstream(self) -> None:
        """A key under an upstream may carry its limits; given twice, they must agree."""
        config = parse(
            """
            authorization:
              bob: {key: k2, rate_limit: "1/second"}
            upstreams:
              - endpoint: "https://a.test/v1"
                authorization: {bob: {key: k2, rate_limit: "1/second"}}
            """
        )
        self.assertEqual(config.keys, config.upstreams[0].keys)
        self.fails(
            """
            authorization:
              bob: {key: k2, rate_limit: "1/second"}
            upstreams:
              - endpoint: "https://a.test/v1"
                authorization: {bob: {key: k2, rate_limit: "2/second"}}
            """,
            6,
            "upstreams[0].authorization.bob",
            "this key's limits are already given on line 3",
        )

    def test_budget_errors(self) -> None:
        """A budget in both usd and tokens, or over an unknown period, is refused."""
        self.fails(
            "authorization:\n  bob: {key: k, budget: {usd: 5, tokens: 9}}" + UPSTREAM,
            2,
            "authorization.bob.budget",
            "either usd or tokens",
        )
        self.fails(
            "authorization:\n  bob: {key: k, budget: {period: week, usd: 1}}" + UPSTREAM,
            2,
            "authorization.bob.budget.period",
            "expected one of: day, month",
        )
        self.fails(
            "authorization:\n  bob: {rate_limit: 1/second}" + UPSTREAM,
            2,
            "authorization.bob.key",
            "needs key",
        )
        self.fails(
            "authorization:\n  bob: {key: k, burst: 5}" + UPSTREAM,
            2,
            "authorization.bob.burst",
            "unknown",
        )


class SummaryTests(Helpers):
    def test_the_startup_summary_says_what_is_limited(self) -> None:
        """The start and reload summary has one line of limits, keys by name only."""
        config = parse(
            """
            authorization:
              alice: k1-secret
              bob: {key: k2-secret, rate_limit: "10/minute", budget: {usd: 50}}
            limits:
              per_key: "60/minute"
              routes: {/v1/embeddings: "5/second"}
              stream_pace: {/v1/chat/completions: "60/second"}
            """
            + INDENTED_UPSTREAM
        )
        line = summary(config, [], [], [])[-2]
        self.assertEqual(
            line,
            "limits (memory, moving-window, on backend error open): per key 60/minute;"
            " route /v1/embeddings 5/second; key bob: requests 10/minute,"
            " budget 50 usd/month; pace /v1/chat/completions 60/second",
        )
        self.assertNotIn("secret", line)
        self.assertEqual(summary(parse(UPSTREAM), [], [], [])[-2], "limits: none")
