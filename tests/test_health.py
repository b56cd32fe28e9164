"""oaproxy.health: readiness follows the upstreams' attempts and the sinks' drops."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.circuits import Circuits
from oaproxy.health import FAILING_AFTER, Readiness
from oaproxy.record import Attempt, FailureKind
from tests.doubles import SinkCounters
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
