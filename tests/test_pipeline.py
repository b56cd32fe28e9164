"""The pipeline's stages together: candidate filters and gates that answer
later (shared breakers, limits and the cache in Redis), in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from oaproxy.answers import LocalAnswer
from oaproxy.config import Upstream
from oaproxy.exchange import AttemptLog, Exchange
from oaproxy.pipeline import Observer, Observers
from oaproxy.record import Record
from tests.doubles import Harness, capture_log
from tests.payloads import CHAT_ANSWER

CONFIG = """
authorization: {alice: sk-client}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b}
"""


class Later:
    """A candidate filter (reversing the candidates) and a gate (letting the
    request on), each answering with a Deferred the test fires."""

    def __init__(self) -> None:
        self.filtering: list[Deferred[None]] = []
        self.gating: list[Deferred[LocalAnswer | None]] = []
        self.cancelled = 0

    def filter(self, exchange: Exchange, candidates: list[Upstream]) -> Deferred[list[Upstream]]:
        waiting: Deferred[None] = Deferred(self._cancelled)
        self.filtering.append(waiting)
        return waiting.addCallback(lambda _: candidates[::-1])

    def _cancelled(self, waiting: Deferred[None]) -> None:
        self.cancelled += 1

    def gate(
        self, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Deferred[LocalAnswer | None]:
        self.gating.append(Deferred())
        return self.gating[-1]


class LaterStagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)
        self.later = Later()
        pipeline = self.h.pipeline
        pipeline._candidate_filters = (*pipeline._candidate_filters, self.later.filter)
        pipeline._gates = (self.later.gate, *pipeline._gates)

    def test_a_filter_then_a_gate_that_answer_later(self) -> None:
        """The gates wait for the filters' answer, the forwarder for the gates',
        and the request goes to the candidates as the filter left them."""
        client = self.h.chat(key="sk-client")
        self.assertEqual((len(self.later.filtering), self.later.gating), (1, []))
        self.later.filtering[0].callback(None)
        self.assertEqual((len(self.later.gating), self.h.agent.calls), (1, []))
        self.later.gating[0].callback(None)
        call = self.h.agent.only()
        self.assertEqual(call.host, "b")
        call.respond(200, body=CHAT_ANSWER)
        self.assertEqual(client.reply().status, 200)
        self.assertEqual(self.h.record()["upstream"], "b")

    def test_a_client_gone_cancels_the_waiting_filter(self) -> None:
        """A client that leaves while a filter waits cancels it: no gate runs,
        no upstream is asked."""
        client = self.h.chat(key="sk-client")
        self.assertEqual(len(self.later.filtering), 1)
        client.disconnect()
        self.assertEqual(self.later.cancelled, 1)
        self.assertEqual((self.later.gating, self.h.agent.calls), ([], []))


class ClientGoneWhileWaitingTests(SynchronousTestCase):
    """A client that leaves while a stage waits: the request still ends with
    one record, and every observer sees it finish exactly once."""

    def setUp(self) -> None:
        self.h = Harness(CONFIG)
        self.later = Later()
        self.pipeline = self.h.pipeline

    def assert_ended_once(self) -> None:
        self.assertEqual(len(self.h.exchanges), 1)
        record = self.h.record()
        # 499: the status records give a request its client left.
        self.assertEqual((record["outcome"], record["status"]), ("client_disconnected", 499))

    def test_gone_while_a_gate_waits(self) -> None:
        """Gone while a gate waits: one record, one request_finished."""
        self.pipeline._gates = (self.later.gate, *self.pipeline._gates)
        client = self.h.chat(key="sk-client")
        self.assertEqual(len(self.later.gating), 1)
        client.disconnect()
        self.assert_ended_once()
        # The gate's answer, if it comes anyway, changes nothing.
        self.later.gating[0].callback(None)
        self.assertEqual((len(self.h.exchanges), self.h.agent.calls), (1, []))

    def test_gone_while_a_filter_waits(self) -> None:
        """Gone while a candidate filter waits: one record, one request_finished."""
        self.pipeline._candidate_filters = (*self.pipeline._candidate_filters, self.later.filter)
        client = self.h.chat(key="sk-client")
        client.disconnect()
        self.assertEqual(self.later.cancelled, 1)
        self.assert_ended_once()

    def test_gone_while_a_head_gate_waits(self) -> None:
        """Gone before the body is read, while a head gate waits: one record."""
        waiting: list[Deferred[LocalAnswer | None]] = []

        def head_gate(arrival: object) -> Deferred[LocalAnswer | None]:
            waiting.append(Deferred())
            return waiting[-1]

        self.pipeline._head_gates = (*self.pipeline._head_gates, head_gate)
        client = self.h.chat(key="sk-client")
        self.assertEqual(len(waiting), 1)
        client.disconnect()
        self.assert_ended_once()

    def test_a_failing_stage_is_recorded(self) -> None:
        """A stage that fails (a bug) answers 500 and still ends with one record."""
        self.pipeline._gates = (self.later.gate, *self.pipeline._gates)
        client = self.h.chat(key="sk-client")
        self.later.gating[0].errback(RuntimeError("a gate's bug"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(client.reply().status, 500)
        self.assertEqual(len(self.h.exchanges), 1)
        self.assertEqual(self.h.record()["outcome"], "error")


class HalfOpenProbeTests(SynchronousTestCase):
    """A probe of a half-open upstream is given back when its client leaves
    while a later gate waits, so that the next request may probe."""

    def test_probe_released_when_the_client_leaves(self) -> None:
        """The next request probes the half-open upstream after the first one's client left."""
        h = Harness(CONFIG + "breaker: {failures: 1, cooldown: 10}\n")
        later = Later()
        h.pipeline._gates = (later.gate, *h.pipeline._gates)
        h.shared.circuits.failed(
            "a", threshold=1, cooldown=10, hold=None, probe_id=None, why="a test"
        )
        h.clock.advance(11)
        first = h.chat(key="sk-client")
        first.disconnect()
        h.chat(key="sk-client")
        later.gating[1].callback(None)
        self.assertEqual(h.agent.calls[0].host, "a")


class ObserversTests(SynchronousTestCase):
    def test_each_event_reaches_the_observers_that_have_it(self) -> None:
        """An observer sees the events it has its own method for (given by
        its class or set on it), and one observer's bug stops no other."""
        seen: list[str] = []

        class Finishing(Observer):
            def request_finished(self, exchange: Exchange, record: Record | None) -> None:
                seen.append("finishing: finished")

        class Failing(Observer):
            def attempt_started(self, exchange: Exchange, attempt: AttemptLog) -> None:
                raise RuntimeError("a bug")

            def request_finished(self, exchange: Exchange, record: Record | None) -> None:
                raise RuntimeError("a bug")

        given = Observer()
        given.attempt_started = lambda exchange, attempt: seen.append("given: attempt")  # type: ignore[method-assign]
        observers = Observers([Observer(), Failing(), Finishing(), given])
        exchange = cast(Exchange, object())
        attempt = cast(AttemptLog, object())
        logged = capture_log(self)
        observers.request_started(exchange, cast(Request, object()))
        observers.attempt_started(exchange, attempt)
        observers.attempt_finished(exchange, attempt)
        observers.request_finished(exchange, None)
        self.assertEqual(seen, ["given: attempt", "finishing: finished"])
        self.assertEqual(
            [event["log_format"] for event in logged if "log_failure" in event],
            ["an observer failed on a started attempt", "an observer failed on a finished request"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
