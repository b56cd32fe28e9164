"""oaproxy.breaker and oaproxy.circuits: circuits that open on failures and
Retry-After, probe once when half-open, close on an answer; the order they
give the candidates; their state in metrics, /readyz and the log.

The in-memory tests drive the real site with a ``Clock`` and a recording
agent; the shared ones run the Lua scripts on the shared Redis, and two
real twistd processes share one state through it.
"""

from __future__ import annotations

import email.utils
import os
import random
import uuid
from functools import partial
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool

from oaproxy.breaker import Breakers, circuit_evidence
from oaproxy.circuits import MAX_RETRY_AFTER, Circuits, CircuitState, retry_after
from oaproxy.config import BreakerConfig, Upstream
from oaproxy.exchange import AttemptLog, Exchange
from oaproxy.health import FAILING_AFTER
from oaproxy.record import Evidence, FailureKind, evidence
from oaproxy.sharedredis import SharedRedis
from tests.doubles import Client, Harness, bare_exchange, capture_log, headers, make_config
from tests.live import (
    SHARED_REDIS,
    LiveCase,
    PrivateRedis,
    child_env,
    free_port,
    post_json,
    reachable,
    reactor,
    read_body,
    refused_endpoint,
    spawn_daemon,
    unavailable,
    wait_for,
    write_yaml,
)
from tests.payloads import CHAT_ANSWER, chat_body, proxy_config

CONFIG = """
authorization: {alice: sk-client}
timeout: 30
breaker: {failures: 2, cooldown: 10}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b}
  - {name: c, endpoint: "https://c.test/v1", sk: sk-c, backup: true}
"""
OK = CHAT_ANSWER


class LogLines:
    """The daemon's log lines while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self._events = capture_log(case)

    @property
    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self._events]

    def transitions(self, name: str = "a") -> list[str]:
        """The circuit transitions of upstream ``name``, after "circuit "."""
        start = f"upstream {name}: circuit "
        return [line[len(start) :] for line in self.lines if line.startswith(start)]


class BreakerCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)
        self.log = LogLines(self)

    def chat(self, *answers: int | bytes) -> tuple[Client, list[str]]:
        """A request whose attempts get ``answers`` in turn (a status, or a
        200 with that body); the upstreams it tried."""
        before = len(self.h.agent.calls)
        client = self.h.chat()
        for answer in answers:
            call = self.h.agent.calls[-1]
            if isinstance(answer, bytes):
                call.respond(200, body=answer)
            else:
                call.respond(answer, body=b'{"error": {"message": "no"}}')
        return client, [c.host for c in self.h.agent.calls[before:]]

    def state(self, name: str) -> CircuitState:
        return self.h.shared.circuits.state(name)

    def gauge(self, name: str) -> float:
        text = generate_latest(self.h.shared.metrics.registry).decode()
        for line in text.splitlines():
            if line.startswith(f'oaproxy_upstream_state{{upstream="{name}"}}'):
                return float(line.split()[-1])
        raise AssertionError(f"no state for {name}")


class LifecycleTests(BreakerCase):
    def test_closed_open_half_open_closed(self) -> None:
        """Failures open a circuit (tried after the others), the cooldown
        makes it half-open, one probe in its normal place closes it."""
        for _ in range(2):
            _, tried = self.chat(500, OK)
            self.assertEqual(tried, ["a", "b"])
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.assertEqual(self.gauge("a"), 2)
        self.assertEqual(self.h.shared.readiness.state()[1]["circuits"]["a"], "open")
        # Open: a comes after b and even after the backup c.
        _, tried = self.chat(500, 500, 500)
        self.assertEqual(tried, ["b", "c", "a"])
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.h.clock.advance(10)
        self.assertIs(self.state("a"), CircuitState.HALF_OPEN)
        self.assertEqual(self.gauge("a"), 1)
        # The probe: a in its normal place, first.
        probe = self.h.chat()
        self.assertEqual(self.h.agent.calls[-1].host, "a")
        probing = self.h.agent.calls[-1]
        # Meanwhile another request finds a among the open ones.
        _, tried = self.chat(500, OK)
        self.assertEqual(tried, ["b", "c"])
        probing.respond(200, body=OK)
        self.assertEqual(probe.reply().status, 200)
        self.assertIs(self.state("a"), CircuitState.CLOSED)
        self.assertEqual(self.gauge("a"), 0)
        _, tried = self.chat(OK)
        self.assertEqual(tried, ["a"])
        self.assertEqual(
            self.log.transitions(),
            [
                "closed -> open (2 failed in a row, the last: status 500)",
                "half_open, one request probes it",
                "half_open -> closed (it answered)",
            ],
        )

    def test_failed_probe_opens_again(self) -> None:
        """A probe that fails opens the circuit for another cooldown."""
        self.chat(500, OK)
        self.chat(500, OK)
        self.h.clock.advance(10)
        _, tried = self.chat(503, OK)
        self.assertEqual(tried, ["a", "b"])
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.h.clock.advance(9)
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.h.clock.advance(1)
        self.assertIs(self.state("a"), CircuitState.HALF_OPEN)

    def test_full_outage_heals(self) -> None:
        """With every circuit open each request still tries them all, and
        the first answer closes its upstream's circuit."""
        for _ in range(2):
            self.chat(500, 500, 500)
        self.assertEqual([self.state(n) for n in "abc"], [CircuitState.OPEN] * 3)
        client, tried = self.chat(500, OK)
        self.assertEqual(tried, ["a", "b"])
        self.assertEqual(client.reply().status, 200)
        self.assertIs(self.state("b"), CircuitState.CLOSED)
        _, tried = self.chat(OK)
        self.assertEqual(tried, ["b"])

    def test_what_counts(self) -> None:
        """5xx, 429, a 401 to the upstream's own key, timeouts and connection
        errors count; a 400 or 404 is an answer (it resets the count); a
        client gone says nothing."""
        self.chat(500, OK)
        _, tried = self.chat(400)
        self.assertEqual(tried, ["a"])
        self.chat(429, OK)
        self.assertIs(self.state("a"), CircuitState.CLOSED)
        self.chat(404, OK)
        self.assertEqual(self.h.shared.circuits.view("a").failures, 0)
        self.chat(401, OK)
        client = self.h.chat()
        self.h.agent.calls[-1].fail(ConnectionRefusedError())
        self.h.agent.calls[-1].respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.assertIs(self.state("a"), CircuitState.OPEN)

    def test_timeout_counts_and_disconnect_does_not(self) -> None:
        """A deadline that passes is a failure; a client that hangs up is not."""
        self.h.chat()
        self.h.clock.advance(30)
        self.h.agent.calls[-1].respond(200, body=OK)
        client = self.h.chat()
        client.disconnect()
        self.assertEqual(self.h.shared.circuits.view("a").failures, 1)
        self.assertTrue(self.h.agent.calls[-1].cancelled)


class RetryAfterTests(BreakerCase):
    config = CONFIG.replace("breaker: {failures: 2, cooldown: 10}\n", "")

    def test_seconds(self) -> None:
        """A 429 with Retry-After opens the circuit for that long, without a
        breaker block and at the first failure."""
        client = self.h.chat()
        self.h.agent.calls[-1].respond(429, body=b"{}", headers=headers({"retry-after": "120"}))
        self.h.agent.calls[-1].respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.assertIs(self.state("a"), CircuitState.OPEN)
        _, tried = self.chat(OK)
        self.assertEqual(tried, ["b"])
        self.h.clock.advance(119)
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.h.clock.advance(1)
        self.assertIs(self.state("a"), CircuitState.HALF_OPEN)
        self.assertIn("Retry-After 120s", self.log.transitions()[0])

    def test_a_probe_after_a_hold_is_held_as_asked(self) -> None:
        """A circuit open only for a Retry-After (fewer failures than
        breaker.failures) is probed when the hold ends; a probe that gets
        another Retry-After holds it that long, not for the cooldown, and
        one that fails without leaves it to the next request's probe."""
        for asked in ("120", "5"):
            client = self.h.chat()
            self.h.agent.calls[-1].respond(429, body=b"{}", headers=headers({"retry-after": asked}))
            self.h.agent.calls[-1].respond(200, body=OK)
            self.assertEqual(client.reply().status, 200)
            self.assertIs(self.state("a"), CircuitState.OPEN)
            self.h.clock.advance(int(asked) - 1)
            self.assertIs(self.state("a"), CircuitState.OPEN)
            self.h.clock.advance(1)
            self.assertIs(self.state("a"), CircuitState.HALF_OPEN)
        # The probe fails with a 500: a is probed again by the next request.
        _, tried = self.chat(500, OK)
        self.assertEqual(tried, ["a", "b"])
        self.assertIs(self.state("a"), CircuitState.HALF_OPEN)
        _, tried = self.chat(OK)
        self.assertEqual(tried, ["a"])
        self.assertIs(self.state("a"), CircuitState.CLOSED)

    def test_http_date_on_503(self) -> None:
        """A 503's Retry-After may be a date, read against the wall clock."""
        wall = self.h.shared.wall_clock()
        date = email.utils.formatdate(wall + 45, usegmt=True)
        client = self.h.chat()
        self.h.agent.calls[-1].respond(503, body=b"{}", headers=headers({"retry-after": date}))
        self.h.agent.calls[-1].respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.h.clock.advance(44)
        self.assertIs(self.state("a"), CircuitState.OPEN)
        self.h.clock.advance(1)
        self.assertIs(self.state("a"), CircuitState.HALF_OPEN)

    def test_parse(self) -> None:
        """Delta seconds or an HTTP date; junk and past dates are no hold;
        a hold is capped."""
        now = 1_700_000_000.0
        self.assertEqual(retry_after("30", now), 30.0)
        self.assertEqual(retry_after(" 1.5 ", now), 1.5)
        self.assertEqual(retry_after(email.utils.formatdate(now + 60, usegmt=True), now), 60.0)
        self.assertIsNone(retry_after(email.utils.formatdate(now - 60, usegmt=True), now))
        for junk in (None, "", "0", "-5", "soon", "Fri, 99 Foo 2024"):
            self.assertIsNone(retry_after(junk, now), junk)
        self.assertEqual(retry_after("999999999", now), MAX_RETRY_AFTER)


class ProbeTests(BreakerCase):
    config = CONFIG.replace(
        "upstreams:\n  - {name: a",
        'upstreams:\n  - {name: x, endpoint: "https://x.test/v1", sk: sk-x}\n  - {name: a',
    )

    def test_unused_probe_is_released(self) -> None:
        """A request given the probe but served before reaching it gives
        the probe back when it ends."""
        self.h.chat()
        self.h.agent.calls[-1].respond(500, body=b"{}")
        self.h.agent.calls[-1].respond(429, body=b"{}", headers=headers({"retry-after": "5"}))
        self.h.agent.calls[-1].respond(200, body=OK)
        self.h.clock.advance(5)
        circuits = self.h.shared.circuits
        self.assertIs(circuits.state("a"), CircuitState.HALF_OPEN)
        _, tried = self.chat(OK)
        self.assertEqual(tried, ["x"])
        self.assertTrue(circuits.claim("a", "another request", 1))

    def test_stale_claim_expires(self) -> None:
        """A probe whose request never ends holds only for its deadlines."""
        circuits = Circuits(self.h.clock)
        circuits.failed("a", threshold=1, cooldown=5, hold=None, probe_id=None, why="x")
        self.h.clock.advance(5)
        self.assertTrue(circuits.claim("a", "first", 40))
        self.assertFalse(circuits.claim("a", "second", 40))
        self.h.clock.advance(40)
        self.assertTrue(circuits.claim("a", "second", 40))


class EvidenceTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Which attempts count as failures, answers, or nothing."""
        table = [
            (200, None, Evidence.ANSWERED),
            (400, None, Evidence.ANSWERED),
            (404, FailureKind.STATUS, Evidence.ANSWERED),
            (401, FailureKind.STATUS, Evidence.FAILED),
            (403, FailureKind.STATUS, Evidence.FAILED),
            (429, FailureKind.STATUS, Evidence.ANSWERED),
            (500, FailureKind.STATUS, Evidence.FAILED),
            (503, FailureKind.STATUS, Evidence.FAILED),
            (None, FailureKind.TIMEOUT, Evidence.FAILED),
            (None, FailureKind.CONNECT_ERROR, Evidence.FAILED),
            (None, FailureKind.DNS_ERROR, Evidence.FAILED),
            (None, FailureKind.TLS_ERROR, Evidence.FAILED),
            (200, FailureKind.UPSTREAM_ENDED_EARLY, Evidence.FAILED),
            (200, FailureKind.STREAM_IDLE, Evidence.FAILED),
            (200, FailureKind.EVENT_TOO_LARGE, Evidence.FAILED),
            (None, FailureKind.CANCELLED, Evidence.NOTHING),
            (200, FailureKind.CLIENT_STOPPED_READING, Evidence.NOTHING),
            (200, FailureKind.BODY_TOO_LARGE, Evidence.NOTHING),
        ]
        for status, failure, expected in table:
            attempt = AttemptLog("a", 0.0, status=status, failure=failure)
            self.assertIs(evidence(attempt), expected, (status, failure))

    def test_a_429_opens_circuits_not_readiness(self) -> None:
        """A 429 to the upstream's own key fails its circuit (readiness calls
        it an answer); to the client's own key (sk: asis) it is an answer."""
        quota = AttemptLog("a", 0.0, status=429, failure=FailureKind.STATUS)
        self.assertIs(circuit_evidence(quota), Evidence.FAILED)
        self.assertIs(evidence(quota), Evidence.ANSWERED)
        own = AttemptLog("a", 0.0, status=429, failure=FailureKind.STATUS, client_key_sent=True)
        self.assertIs(circuit_evidence(own), Evidence.ANSWERED)

    def test_the_clients_own_key_refused(self) -> None:
        """With sk: asis a 401 or 403 refuses the client's key: the upstream answered."""
        for status in (401, 403):
            attempt = AttemptLog(
                "a", 0.0, status=status, failure=FailureKind.STATUS, client_key_sent=True
            )
            self.assertIs(evidence(attempt), Evidence.ANSWERED, status)


JUDGED_CONFIG = """
authorization: {alice: sk-client}
breaker: {failures: 3, cooldown: 10}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: asis}
  - {name: c, endpoint: "https://c.test/v1", sk: sk-c, backup: true}
"""


class OneJudgementTests(BreakerCase):
    """Readiness and the circuit breakers judge attempts one way."""

    config = JUDGED_CONFIG

    def judged(self) -> tuple[list[str], list[CircuitState]]:
        failing = self.h.shared.readiness.state()[1]["failing_upstreams"]
        return failing, [self.state(name) for name in "abc"]

    def test_what_the_client_asked_for_counts_for_neither(self) -> None:
        """404s for a model the upstream lacks and 401s to the client's own
        key (sk: asis) neither make /readyz list an upstream nor open its circuit."""
        for _ in range(FAILING_AFTER):
            _, tried = self.chat(404, 401, OK)
            self.assertEqual(tried, ["a", "b", "c"])
        self.assertEqual(self.judged(), ([], [CircuitState.CLOSED] * 3))

    def test_the_upstreams_own_failures_count_for_both(self) -> None:
        """401s to the upstream's own key and 503s make /readyz list it and
        open its circuit, at the same attempts."""
        for _ in range(FAILING_AFTER):
            self.chat(401, 503, OK)
        self.assertEqual(
            self.judged(),
            (["a", "b"], [CircuitState.OPEN, CircuitState.OPEN, CircuitState.CLOSED]),
        )

    def test_retry_after_to_the_clients_key_holds_nothing(self) -> None:
        """A 429 with Retry-After to the client's own key speaks of that key:
        the upstream's circuit stays closed; to the upstream's own key it holds."""
        client = self.h.chat()
        self.h.agent.calls[-1].respond(429, body=b"{}", headers=headers({"retry-after": "60"}))
        self.h.agent.calls[-1].respond(429, body=b"{}", headers=headers({"retry-after": "60"}))
        self.h.agent.calls[-1].respond(200, body=OK)
        self.assertEqual(client.reply().status, 200)
        self.assertEqual(
            self.judged(), (["a"], [CircuitState.OPEN, CircuitState.CLOSED, CircuitState.CLOSED])
        )


# -- shared state --------------------------------------------------------------------


def _upstreams() -> list[Upstream]:
    config = make_config(
        "upstreams:\n"
        "  - {name: a, endpoint: 'https://a.test/v1', timeout: 20}\n"
        "  - {name: b, endpoint: 'https://b.test/v1'}\n"
    )
    return list(config.upstreams)


def _is_open(circuits: Circuits) -> bool:
    return circuits.state("a") is CircuitState.OPEN


class SharedBreakerTests(LiveCase):
    """Two Breakers on one Redis are two processes: each sees the other's state."""

    timeout = 20

    async def setUp(self) -> None:  # type: ignore[override]
        if not reachable(*SHARED_REDIS):
            unavailable("the shared Redis on 127.0.0.1:6379 is not running")
        self.prefix = f"oaproxy-test-{uuid.uuid4().hex[:8]}:"
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.upstreams = _upstreams()
        self.first = await self.breakers()
        self.second = await self.breakers()

    async def breakers(
        self, port: int = SHARED_REDIS[1], failures: int = 2
    ) -> tuple[Breakers, Circuits]:
        redis = SharedRedis(f"redis://127.0.0.1:{port}/0", self.prefix, reactor)
        redis.startService()
        self.addCleanup(redis.stopService)
        await wait_for(lambda: redis.connected, timeout=10)
        self.addCleanup(self.forget, redis)
        self.redis = redis
        circuits = Circuits(self.clock)
        config = BreakerConfig(failures=failures, cooldown=10, shared=True)
        return Breakers(
            config, circuits, wall_clock=lambda: 0.0, rng=random.Random(), redis=redis
        ), circuits

    async def forget(self, redis: SharedRedis) -> None:
        if redis.connected:
            for name in ("a", "b"):
                await redis.command("DEL", redis.key("breaker", name))

    async def order(self, breakers: Breakers, exchange: Exchange) -> str:
        ordered = breakers.order(exchange, list(self.upstreams))
        assert isinstance(ordered, Deferred), "shared breakers ask Redis"
        return "".join(u.name for u in await ordered)

    async def failed(self, process: tuple[Breakers, Circuits], name: str) -> None:
        """A failed attempt seen by ``process``, once Redis counted it."""
        breakers, circuits = process
        before = circuits.view(name).failures
        attempt = AttemptLog(name, 0.0, status=500, failure=FailureKind.STATUS)
        breakers.attempt_finished(bare_exchange(), attempt)
        await wait_for(lambda: circuits.view(name).failures > before, timeout=5)

    async def test_one_state_for_two_processes(self) -> None:
        """Failures counted by one open the circuit for the other; the
        half-open probe is given to one request of either; its answer
        closes the circuit for both."""
        (first, first_circuits), (second, second_circuits) = self.first, self.second
        await self.failed(self.first, "a")
        await self.failed(self.second, "a")
        self.assertIs(second_circuits.state("a"), CircuitState.OPEN)
        self.assertIs(first_circuits.state("a"), CircuitState.CLOSED)
        self.assertEqual(await self.order(first, bare_exchange()), "ba")
        self.assertIs(first_circuits.state("a"), CircuitState.OPEN)
        self.clock.advance(10)
        probe = bare_exchange()
        self.assertEqual(await self.order(first, probe), "ab")
        self.assertEqual(await self.order(second, bare_exchange()), "ba")
        first.attempt_finished(probe, AttemptLog("a", 0.0, status=200))
        await wait_for(lambda: first_circuits.state("a") is CircuitState.CLOSED)
        self.assertEqual(await self.order(second, bare_exchange()), "ab")
        self.assertIs(second_circuits.state("a"), CircuitState.CLOSED)

    async def test_a_probe_after_a_hold_is_held_as_asked(self) -> None:
        """Shared too: a circuit open only for a Retry-After, probed when the
        hold ends, is held for the probe's own Retry-After, not the cooldown."""
        self.first = await self.breakers(failures=5)
        self.second = await self.breakers(failures=5)
        first, second_circuits = self.first[0], self.second[1]
        for asked, (process, circuits) in (("30", self.first), ("5", self.second)):
            probe = bare_exchange()
            self.assertEqual((await self.order(process, probe))[0], "a")
            attempt = AttemptLog(
                "a", 0.0, status=429, failure=FailureKind.STATUS, retry_after=asked
            )
            process.attempt_finished(probe, attempt)
            await wait_for(partial(_is_open, circuits))
            self.clock.advance(int(asked) - 1)
            self.assertEqual(await self.order(first, bare_exchange()), "ba")
            self.clock.advance(1)
        self.assertEqual(await self.order(first, bare_exchange()), "ab")
        self.assertEqual(second_circuits.view("a").failures, 2)

    async def test_unused_probe_released(self) -> None:
        """A probe not used goes back to Redis when its request ends."""
        (first, _), (second, _) = self.first, self.second
        await self.failed(self.first, "a")
        await self.failed(self.first, "a")
        self.clock.advance(10)
        probe = bare_exchange()
        self.assertEqual(await self.order(first, probe), "ab")
        self.assertEqual(await self.order(second, bare_exchange()), "ba")
        first.request_finished(probe, None)
        key = self.redis.key("breaker", "a")
        probe_id: list[Any] = ["unknown"]

        async def look() -> None:
            probe_id[0] = await self.redis.command("HGET", key, "probe_id")

        while probe_id[0] is not None:
            await look()
        self.assertEqual(await self.order(second, bare_exchange()), "ab")

    async def test_redis_down(self) -> None:
        """Without Redis each process goes on with its own circuits."""
        private = PrivateRedis(os.path.abspath(self.mktemp()))
        await private.start()
        self.addCleanup(private.kill)
        breakers, circuits = await self.breakers(private.port)
        log = LogLines(self)
        private.kill()
        await wait_for(lambda: not breakers._redis.connected)  # type: ignore[union-attr]
        for _ in range(2):
            breakers.attempt_finished(
                bare_exchange(), AttemptLog("a", 0.0, status=500, failure=FailureKind.STATUS)
            )
        self.assertIs(circuits.state("a"), CircuitState.OPEN)
        self.assertEqual(await self.order(breakers, bare_exchange()), "ba")
        self.assertEqual(
            len([line for line in log.lines if "redis unavailable" in line]), 1, log.lines
        )


class TwoDaemonsTests(LiveCase):
    """Two real twistd processes with ``breaker.shared`` on one Redis."""

    timeout = 60

    async def test_circuit_opened_by_one_is_open_for_the_other(self) -> None:
        """The daemon that saw the failures and the one that did not agree:
        the second skips the broken upstream it never tried."""
        if not reachable(*SHARED_REDIS):
            unavailable("the shared Redis on 127.0.0.1:6379 is not running")
        fake = await self.fake()
        prefix = f"oaproxy-test-{uuid.uuid4().hex[:8]}:"
        broken = refused_endpoint()
        ports = [free_port(), free_port()]
        for port in ports:
            cwd = os.path.abspath(self.mktemp())
            os.makedirs(cwd)
            config = proxy_config(
                "shared",
                {"alice": "ck-shared-0123456789"},
                [
                    {"name": "broken", "endpoint": broken, "sk": "sk-x"},
                    {"name": "good", "endpoint": fake.endpoint, "sk": "sk-y"},
                ],
                listen=f"tcp:{port}:interface=127.0.0.1",
                redis=f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/0",
                redis_prefix=prefix,
                breaker={"failures": 2, "cooldown": 300, "shared": True},
            )
            write_yaml(os.path.join(cwd, "config.yaml"), config)
            daemon = spawn_daemon(
                self,
                ["-n", "--pidfile=", "oaproxy", "--config", "config.yaml"],
                cwd,
                env=child_env(),
            )
            await wait_for(lambda port=port: reachable("127.0.0.1", port), timeout=20)  # type: ignore[misc]
            await daemon.wait_for("oaproxy started")
            # The circuits are read from Redis once it is up; before, each
            # daemon keeps its own.
            await daemon.wait_for("shared Redis connected at")
        self.addCleanup(self._forget, prefix)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

        async def chat(port: int) -> int:
            response = await post_json(
                agent,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                "ck-shared-0123456789",
                chat_body(),
            )
            await read_body(response)
            return int(response.code)

        async def metrics(port: int) -> str:
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
            return (await read_body(response)).decode()

        for _ in range(2):
            self.assertEqual(await chat(ports[0]), 200)
        self.assertIn('oaproxy_upstream_state{upstream="broken"} 2.0', await metrics(ports[0]))
        self.assertEqual(await chat(ports[1]), 200)
        second = await metrics(ports[1])
        self.assertIn('oaproxy_upstream_state{upstream="broken"} 2.0', second)
        self.assertNotIn(
            'oaproxy_attempts_total{outcome="connect_error",upstream="broken"}', second
        )
        self.assertIn('oaproxy_attempts_total{outcome="ok",upstream="good"} 1.0', second)
        self.assertEqual(len(fake.requests), 3)

    async def _forget(self, prefix: str) -> None:
        redis = SharedRedis(f"redis://127.0.0.1:{SHARED_REDIS[1]}/0", prefix, reactor)
        redis.startService()
        await wait_for(lambda: redis.connected, timeout=10)
        await redis.command("DEL", redis.key("breaker", "broken"), redis.key("breaker", "good"))
        stopped = redis.stopService()
        if stopped is not None:
            await stopped
