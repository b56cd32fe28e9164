"""The pipeline's stages together: candidate filters and gates that answer
later (shared breakers, limits and the cache in Redis), in order."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.answers import LocalAnswer
from oaproxy.config import Upstream
from oaproxy.exchange import Exchange
from tests.doubles import Harness
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
