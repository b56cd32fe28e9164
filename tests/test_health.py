"""oaproxy.health: readiness follows the upstreams' attempts and the sinks' drops."""

from __future__ import annotations

import json
from typing import Any, cast

import attrs
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.circuits import Circuits
from oaproxy.health import FAILING_AFTER, Readiness
from oaproxy.record import Attempt, FailureKind
from tests.doubles import SinkCounters, parse_reply
from tests.fakeupstream import Status
from tests.live import EndToEndCase, RawClient, RunningProxy, chat, reactor
from tests.payloads import upstream
from tests.records import attempt, record


class ReadinessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.readiness = Readiness(cast(IReactorTime, self.clock), Circuits(self.clock))
        self.readiness.configure(["alpha", "beta"], {"file": SinkCounters()})

    def tried(self, *attempts: Attempt) -> None:
        for _ in range(FAILING_AFTER):
            self.readiness.observe(record(attempts=attempts))

    def state(self) -> dict[str, Any]:
        return self.readiness.state()[1]

    def test_failing_upstream(self) -> None:
        """Failed attempts in a row make an upstream failing; one that
        serves makes it usable again."""
        self.tried(attempt("alpha", None, "timeout after 30s", failure=FailureKind.TIMEOUT))
        self.tried(attempt("beta", 503, failure=FailureKind.STATUS))
        ready, details = self.readiness.state()
        self.assertFalse(ready)
        self.assertEqual(details["failing_upstreams"], ["alpha", "beta"])
        self.readiness.observe(record(attempts=[attempt("beta", 200)]))
        self.assertEqual(self.state()["usable_upstreams"], ["beta"])

    def test_the_requests_fault_is_no_failure(self) -> None:
        """A 4xx that is the request's own fault shows the upstream works."""
        self.tried(attempt("alpha", 503, failure=FailureKind.STATUS))
        self.readiness.observe(record(attempts=[attempt("alpha", 400)]))
        self.assertEqual(self.state()["failing_upstreams"], [])

    def test_client_caused_attempts_do_not_count(self) -> None:
        """A client that went away or stopped reading says nothing of the
        upstream, either way."""
        self.tried(
            attempt("alpha", None, "cancelled: client disconnected", failure=FailureKind.CANCELLED),
            attempt(
                "beta",
                200,
                "cancelled: client stopped reading for more than 20s",
                failure=FailureKind.CLIENT_STOPPED_READING,
            ),
        )
        self.assertEqual(self.state()["usable_upstreams"], ["alpha", "beta"])

    def test_broken_stream_counts(self) -> None:
        """A stream that broke after its 200 headers is the upstream's failure."""
        self.tried(attempt("alpha", 200, "stream idle", failure=FailureKind.STREAM_IDLE))
        self.assertEqual(self.state()["failing_upstreams"], ["alpha"])

    def test_unknown_upstreams_ignored(self) -> None:
        """Attempts of upstreams no longer configured are not followed."""
        self.tried(attempt("gone", 503, failure=FailureKind.STATUS))
        self.assertEqual(self.state()["failing_upstreams"], [])

    def test_what_the_client_asked_for_does_not_count(self) -> None:
        """404, 408, 409 and 429 say what the request asked for, not that the upstream fails."""
        for status in (404, 408, 409, 429):
            self.tried(attempt("alpha", status, failure=FailureKind.STATUS))
        self.tried(attempt("alpha", None, "too big", failure=FailureKind.BODY_TOO_LARGE))
        self.assertEqual(self.state()["failing_upstreams"], [])

    def test_refused_upstream_key_counts(self) -> None:
        """A 401 or 403 to the upstream's own key means the upstream cannot serve."""
        self.tried(attempt("alpha", 401, failure=FailureKind.STATUS))
        self.tried(attempt("beta", 403, failure=FailureKind.STATUS))
        self.assertEqual(self.state()["failing_upstreams"], ["alpha", "beta"])

    def test_refused_client_key_does_not_count(self) -> None:
        """With sk: asis a 401 or 403 refuses the client's key, not the upstream."""
        for status in (401, 403):
            refused = attempt("alpha", status, failure=FailureKind.STATUS)
            self.tried(attrs.evolve(refused, client_key_sent=True))
        self.assertEqual(self.state()["failing_upstreams"], [])

    def test_judgement_of_each_kind(self) -> None:
        """Every failure kind is judged: the upstream's own troubles count, the client's do not."""
        counted = {
            kind for kind in FailureKind if attempt(failure=kind, status=None).upstream_at_fault
        }
        self.assertEqual(
            counted,
            {
                FailureKind.TIMEOUT,
                FailureKind.CONNECT_ERROR,
                FailureKind.DNS_ERROR,
                FailureKind.TLS_ERROR,
                FailureKind.UPSTREAM_ENDED_EARLY,
                FailureKind.EVENT_TOO_LARGE,
                FailureKind.STREAM_IDLE,
                FailureKind.STREAM_ERROR,
                FailureKind.OTHER,
            },
        )
        self.assertFalse(attempt(status=200).upstream_at_fault)
        self.assertTrue(attempt(status=503, failure=FailureKind.STATUS).upstream_at_fault)


class ReadinessLiveTests(EndToEndCase):
    async def readyz(self, proxy: RunningProxy) -> tuple[int, dict[str, Any]]:
        client = RawClient(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
        await client.lost
        reply = parse_reply(client.received)
        return reply.status, json.loads(reply.body)

    async def test_unknown_models_do_not_make_it_unready(self) -> None:
        """Requests for a model the upstream lacks (its 404) leave /readyz ready."""
        fake = await self.fake()
        unknown = Status(404, "The model `gpt-9` does not exist", "invalid_request_error")
        fake.script(*[unknown] * FAILING_AFTER)
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        for _ in range(FAILING_AFTER):
            await self.assertFailure(self.sdk(proxy, lambda c: chat(c, "gpt-9")), Exception)
        await proxy.records.nth(FAILING_AFTER)
        status, details = await self.readyz(proxy)
        self.assertEqual((status, details["failing_upstreams"]), (200, []))

    async def test_failing_upstream_makes_it_unready(self) -> None:
        """The control: 503s from the only upstream make /readyz answer 503."""
        fake = await self.fake()
        fake.script(*[Status(503)] * FAILING_AFTER)
        proxy = await self.proxy([upstream("main", fake.endpoint)])
        for _ in range(FAILING_AFTER):
            await self.assertFailure(self.sdk(proxy, chat), Exception)
        await proxy.records.nth(FAILING_AFTER)
        status, details = await self.readyz(proxy)
        self.assertEqual((status, details["failing_upstreams"]), (503, ["main"]))
