"""oaproxy.balancing: each lb_policy's order over many requests, backups last.

Unit tests give the candidate filter the router's candidates; the others
drive the real site (a ``Clock``, a recording agent answered by hand), so
latencies and attempts in flight are those the forwarder saw.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.balancing import Balancer, UpstreamLoad
from oaproxy.config import Config, Upstream
from tests.doubles import Harness, bare_exchange, make_config
from tests.payloads import CHAT_ANSWER


def config(policy: str, *weights: float, backups: str = "", more: str = "") -> Config:
    lines = [f"lb_policy: {policy}", "upstreams:"]
    for index, weight in enumerate(weights):
        name = "abcdefgh"[index]
        backup = "true" if name in backups else "false"
        lines.append(
            f"  - {{name: {name}, endpoint: 'https://{name}.test/v1', weight: {weight:g},"
            f" backup: {backup}}}"
        )
    return make_config("\n".join(lines) + "\n" + more)


def names(upstreams: list[Upstream]) -> str:
    return "".join(u.name for u in upstreams)


class PolicyOrderTests(SynchronousTestCase):
    def orders(self, cfg: Config, count: int, rng: random.Random | None = None) -> list[str]:
        balancer = Balancer(cfg, UpstreamLoad(), rng or random.Random(0))
        return [names(balancer(bare_exchange(), list(cfg.upstreams))) for _ in range(count)]

    def test_order(self) -> None:
        """order keeps the config's order, backups after the others."""
        cfg = config("order", 1, 1, 1, 1, backups="b")
        self.assertEqual(set(self.orders(cfg, 20)), {"acdb"})

    def test_random(self) -> None:
        """random shuffles with the injected Random: seeded, the same orders;
        backups are shuffled among themselves, after the others."""
        cfg = config("random", 1, 1, 1, 1, 1, backups="de")
        first = self.orders(cfg, 200, random.Random(7))
        self.assertEqual(first, self.orders(cfg, 200, random.Random(7)))
        self.assertEqual({order[3:] for order in first}, {"de", "ed"})
        self.assertEqual(len({order[:3] for order in first}), 6)
        leaders = Counter(order[0] for order in first)
        self.assertEqual(set(leaders), {"a", "b", "c"})
        self.assertTrue(all(40 < n < 95 for n in leaders.values()), leaders)

    def test_round_robin(self) -> None:
        """round_robin rotates the first candidate request by request."""
        cfg = config("round_robin", 1, 1, 1, 1, backups="d")
        self.assertEqual(self.orders(cfg, 7), ["abcd", "bcad", "cabd"] * 2 + ["abcd"])

    def test_round_robin_per_candidate_set(self) -> None:
        """Each set of candidates (a model only some upstreams serve) rotates on its own."""
        cfg = config("round_robin", 1, 1, 1)
        balancer = Balancer(cfg, UpstreamLoad(), random.Random(0))
        every, two = list(cfg.upstreams), list(cfg.upstreams[:2])
        seen = [
            names(balancer(bare_exchange(), group)) for group in (every, two, every, two, every)
        ]
        self.assertEqual(seen, ["abc", "ab", "bca", "ba", "cab"])

    def test_weighted(self) -> None:
        """weighted is smooth weighted round robin: deterministic, spread out,
        each upstream first in proportion to its weight."""
        cfg = config("weighted", 5, 1, 1)
        orders = self.orders(cfg, 700)
        self.assertEqual("".join(order[0] for order in orders[:7]), "aabacaa")
        self.assertEqual(orders[:7], self.orders(cfg, 7))
        self.assertEqual(Counter(order[0] for order in orders), {"a": 500, "b": 100, "c": 100})
        # The rest of each order follows the current weights: all are tried.
        self.assertTrue(all(sorted(order) == ["a", "b", "c"] for order in orders))

    def test_weighted_fractions_and_backups(self) -> None:
        """Weights need not be integers; backups are weighted among themselves."""
        cfg = config("weighted", 0.5, 1.5, 2, 2, backups="cd")
        orders = self.orders(cfg, 400)
        self.assertEqual(Counter(order[0] for order in orders), {"b": 300, "a": 100})
        self.assertEqual(Counter(order[2] for order in orders), {"c": 200, "d": 200})

    def test_least_latency(self) -> None:
        """least_latency: never-timed upstreams first (config order), then
        the lowest moving average of time to first byte."""
        cfg = config("least_latency", 1, 1, 1, 1, backups="d")
        load = UpstreamLoad()
        balancer = Balancer(cfg, load, random.Random(0))

        def order() -> str:
            return names(balancer(bare_exchange(), list(cfg.upstreams)))

        self.assertEqual(order(), "abcd")
        load.finished("b", 0.5)
        self.assertEqual(order(), "acbd")
        load.finished("a", 2.0)
        load.finished("c", 1.0)
        self.assertEqual(order(), "bcad")
        # The average moves: c gets faster, b slower.
        for _ in range(10):
            load.finished("c", 0.1)
            load.finished("b", 3.0)
        self.assertEqual(order(), "cabd")

    def test_least_busy(self) -> None:
        """least_busy: fewest attempts in flight first, ties in config order."""
        cfg = config("least_busy", 1, 1, 1)
        load = UpstreamLoad()
        balancer = Balancer(cfg, load, random.Random(0))
        self.assertEqual(names(balancer(bare_exchange(), list(cfg.upstreams))), "abc")
        load.started("a")
        load.started("a")
        load.started("b")
        self.assertEqual(names(balancer(bare_exchange(), list(cfg.upstreams))), "cba")
        load.finished("a", None)
        load.finished("a", None)
        self.assertEqual(names(balancer(bare_exchange(), list(cfg.upstreams))), "acb")

    def test_route_policy(self) -> None:
        """A route's own policy orders its upstreams; /v1 keeps the global one."""
        cfg = make_config(
            """
lb_policy: order
routes:
  /pool: {lb_policy: round_robin}
upstreams:
  - {name: a, endpoint: "https://a.test/v1"}
  - {name: b, endpoint: "https://b.test/v1"}
  - {name: x, endpoint: "https://x.test/v1", route: /pool}
  - {name: y, endpoint: "https://y.test/v1", route: /pool}
"""
        )
        balancer = Balancer(cfg, UpstreamLoad(), random.Random(0))
        plain, pool = list(cfg.upstreams[:2]), list(cfg.upstreams[2:])
        self.assertEqual(
            [names(balancer(bare_exchange("/pool"), pool)) for _ in range(3)], ["xy", "yx", "xy"]
        )
        self.assertEqual([names(balancer(bare_exchange(), plain)) for _ in range(3)], ["ab"] * 3)


class PolicyThroughTheSiteTests(SynchronousTestCase):
    def test_round_robin_spreads_requests(self) -> None:
        """Over many requests through the site, each upstream is asked first in turn."""
        h = Harness(config("round_robin", 1, 1, 1))
        for _ in range(9):
            h.chat(key=None)
            h.agent.calls[-1].respond(200, body=CHAT_ANSWER)
        self.assertEqual("".join(c.host for c in h.agent.calls), "abc" * 3)

    def test_failover_walks_the_whole_order(self) -> None:
        """Failing upstreams are left in policy order, the backup last."""
        h = Harness(config("round_robin", 1, 1, 1, backups="a"))
        for _ in range(2):
            client = h.chat(key=None)
            for _ in range(3):
                h.agent.calls[-1].respond(500, body=b"{}")
            self.assertEqual(client.reply().status, 500)
        self.assertEqual("".join(c.host for c in h.agent.calls), "bca" + "cba")

    def test_least_latency_follows_measured_latency(self) -> None:
        """Times to first byte measured on the clock decide the next order."""
        h = Harness(config("least_latency", 1, 1, 1))
        delays = {"a": 3.0, "b": 1.0, "c": 2.0}
        for _ in range(3):
            h.chat(key=None)
            call = h.agent.calls[-1]
            h.clock.advance(delays[call.host])
            call.respond(200, body=CHAT_ANSWER)
        self.assertEqual([c.host for c in h.agent.calls], ["a", "b", "c"])
        h.chat(key=None)
        self.assertEqual(h.agent.calls[-1].host, "b")

    def test_least_busy_counts_attempts_in_flight(self) -> None:
        """Unanswered attempts keep their upstream busy; answered ones free it."""
        h = Harness(config("least_busy", 1, 1))
        h.chat(key=None)
        h.chat(key=None)
        h.chat(key=None)
        self.assertEqual([c.host for c in h.agent.calls], ["a", "b", "a"])
        h.agent.calls[1].respond(200, body=CHAT_ANSWER)
        h.chat(key=None)
        self.assertEqual(h.agent.calls[-1].host, "b")
        shared: Any = h.shared
        self.assertEqual((shared.load.in_flight("a"), shared.load.in_flight("b")), (2, 1))
