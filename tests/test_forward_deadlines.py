"""Tests for an attempt's deadline (``oaproxy.attempts.Deadline``): one timer
per attempt, which cancels whatever the attempt awaits when it passes (the
headers, a body being read, a stream's first event), told apart from a
client that goes away meanwhile, and never left behind.

Every test ends with the client's connection closed and then asks that no
timer is left on the clock: a deadline outliving its attempt would fire on
a request long over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestNotSent, ResponseNeverReceived

from oaproxy.attempts import AttemptTimeout, Deadline
from oaproxy.record import FailureKind, Outcome
from tests.doubles import Client, FakeResponse, Harness, Scrape
from tests.payloads import content_chunk, sse
from tests.records import stored_attempt
from tests.test_forward import CONFIG

GONE = "cancelled: client disconnected"

# How a cancelled upstream request may be reported: twisted's own client
# wraps the CancelledError; others fail with what the aborted connection
# said, or say the request was never sent (which is not a stale connection
# here: it is the deadline's doing).
CANCEL_ERRORS: list[Callable[[], BaseException] | None] = [
    None,
    lambda: ResponseNeverReceived([Failure(CancelledError())]),
    lambda: ConnectionLost("aborted"),
    lambda: RequestNotSent(),
]


def _headers(h: Harness, client: Client) -> FakeResponse | None:
    """Nothing: the attempt waits for the upstream's response headers."""
    return None


def _body(h: Harness, client: Client) -> FakeResponse:
    """The headers came and part of a non-stream body; the rest never does."""
    response = h.agent.calls[-1].respond(200)
    response.write(b'{"id":')
    return response


def _first_event(h: Harness, client: Client) -> FakeResponse:
    """A stream's headers and a comment came, but no event."""
    response = h.agent.calls[-1].respond(200, b"text/event-stream")
    response.write(b": keep-alive\n\n")
    return response


Stage = Callable[[Harness, Client], "FakeResponse | None"]
# Each thing an attempt awaits, with whether it is a stream, its deadline,
# and the status its attempt has when the deadline passes.
STAGES: list[tuple[str, Stage, bool, float, int | None]] = [
    ("headers", _headers, False, 30.0, None),
    ("body", _body, False, 30.0, 200),
    ("first event", _first_event, True, 5.0, 200),
]


class DeadlineTestCase(SynchronousTestCase):
    def awaiting(
        self, stage: Stage, stream: bool, cancel_error: Callable[[], BaseException] | None
    ) -> tuple[Harness, Client, FakeResponse | None]:
        """A request whose attempt awaits ``stage``, a second after it began."""
        h = Harness(CONFIG, cancel_error=cancel_error)
        client = h.chat(stream=stream)
        h.clock.advance(1)
        return h, client, stage(h, client)

    def assertNoTimerLeft(self, h: Harness, client: Client) -> None:
        client.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def assertAborted(self, h: Harness, response: FakeResponse | None) -> None:
        """The upstream request was cancelled, or its body's connection stopped."""
        if response is None:
            self.assertTrue(h.agent.calls[0].cancelled)
        else:
            self.assertEqual(response.transport.events, ["stop"])


class AttemptDeadlineTests(DeadlineTestCase):
    def test_deadline_fails_over(self) -> None:
        """Whatever the attempt awaits when its deadline passes is cancelled
        (the upstream aborted), the attempt is a timeout, however the cancel
        was reported, and the next candidate answers."""
        for name, stage, stream, seconds, status in STAGES:
            for cancel_error in CANCEL_ERRORS:
                with self.subTest(name, cancel_error=cancel_error):
                    h, client, response = self.awaiting(stage, stream, cancel_error)
                    h.clock.advance(seconds - 2)
                    self.assertEqual(len(h.agent.calls), 1)
                    h.clock.advance(1)
                    self.assertAborted(h, response)
                    self.assertEqual(len(h.agent.calls), 2)
                    # Sent once more as a stale connection it would not be: none here.
                    self.assertEqual(h.fresh_agent.calls, [])
                    answer = sse(content_chunk("Hi"), "[DONE]") if stream else b"{}"
                    h.agent.calls[1].respond(
                        200, b"text/event-stream" if stream else b"application/json", answer
                    )
                    reply = client.reply()
                    self.assertEqual((reply.status, reply.body), (200, answer))
                    timed_out = h.exchanges[0].attempts[0]
                    self.assertEqual(
                        (timed_out.failure, timed_out.error),
                        (FailureKind.TIMEOUT, f"timeout after {seconds:g}s"),
                    )
                    record = h.record()
                    self.assertEqual(
                        record["attempts"][0],
                        stored_attempt(
                            "a",
                            status,
                            f"timeout after {seconds:g}s",
                            None if status is None else 1.0,
                            seconds,
                        ),
                    )
                    self.assertEqual((record["outcome"], record["upstream"]), ("ok", "b"))
                    self.assertNoTimerLeft(h, client)

    def test_timeouts_are_counted_as_such(self) -> None:
        """A deadline counts as a timeout in the attempts metric, not a cancel."""
        h = Harness(CONFIG)
        client = h.chat()
        h.clock.advance(30)
        h.agent.calls[1].respond(200, body=b"{}")
        scrape = Scrape(generate_latest(h.shared.metrics.registry).decode("utf-8"))
        self.assertEqual(scrape.value("oaproxy_attempts_total", upstream="a", outcome="timeout"), 1)
        self.assertIsNone(scrape.value("oaproxy_attempts_total", upstream="a", outcome="cancelled"))
        self.assertNoTimerLeft(h, client)

    def test_each_attempt_has_one_timer(self) -> None:
        """While an attempt waits, its deadline is the one timer on the clock
        (the client's connection has none while its request is served)."""
        h = Harness(CONFIG)
        client = h.chat()
        self.assertEqual([call.getTime() for call in h.clock.getDelayedCalls()], [30.0])
        h.clock.advance(30)
        self.assertEqual([call.getTime() for call in h.clock.getDelayedCalls()], [60.0])
        h.agent.calls[1].respond(200, body=b"{}")
        self.assertNoTimerLeft(h, client)

    def test_all_timed_out(self) -> None:
        """Every candidate's deadline passed: a 504, and no timer left."""
        h = Harness(CONFIG)
        client = h.chat()
        h.clock.advance(30)
        h.clock.advance(30)
        h.clock.advance(30)
        self.assertEqual(client.reply().status, 504)
        self.assertEqual(h.exchanges[0].outcome, Outcome.EXHAUSTED)
        self.assertNoTimerLeft(h, client)


class ClientGoneTests(DeadlineTestCase):
    def test_client_gone_is_no_timeout(self) -> None:
        """A client that goes away while the attempt awaits anything aborts
        the upstream; the attempt is cancelled, not timed out, however the
        cancel was reported; nothing else is tried, and its deadline's
        timer is gone with it."""
        for name, stage, stream, seconds, status in STAGES:
            for cancel_error in CANCEL_ERRORS:
                with self.subTest(name, cancel_error=cancel_error):
                    h, client, response = self.awaiting(stage, stream, cancel_error)
                    # Just before the deadline: it must not be taken for it.
                    h.clock.advance(seconds - 1.5)
                    client.disconnect()
                    self.assertAborted(h, response)
                    self.assertEqual(h.clock.getDelayedCalls(), [])
                    h.clock.advance(100)
                    self.assertEqual((len(h.agent.calls), h.fresh_agent.calls), (1, []))
                    gone = h.exchanges[0].attempts[0]
                    self.assertEqual((gone.failure, gone.error), (FailureKind.CANCELLED, GONE))
                    record = h.record()
                    self.assertEqual(
                        record["attempts"],
                        [
                            stored_attempt(
                                "a",
                                status,
                                GONE,
                                None if status is None else 1.0,
                                seconds - 0.5,
                            )
                        ],
                    )
                    self.assertEqual(record["outcome"], "client_disconnected")

    def test_client_gone_after_a_timeout(self) -> None:
        """After one attempt timed out, a client that goes away cancels the
        next one, whose timer goes too."""
        h = Harness(CONFIG)
        client = h.chat()
        h.clock.advance(30)
        h.clock.advance(10)
        client.disconnect()
        self.assertEqual([c.cancelled for c in h.agent.calls], [True, True])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(
            [(a.failure, a.error) for a in h.exchanges[0].attempts],
            [(FailureKind.TIMEOUT, "timeout after 30s"), (FailureKind.CANCELLED, GONE)],
        )


class DeadlineUnitTests(SynchronousTestCase):
    """``Deadline`` on its own, for cancellers the forwarder's doubles lack."""

    def run_attempt(self, deadline: Deadline, awaited: list[Deferred[Any]]) -> Deferred[Any]:
        async def attempt() -> Any:
            first = await deadline.watch(awaited[0])
            second = await deadline.watch(awaited[1])
            return first, second

        return Deferred.fromCoroutine(deadline.run(attempt()))

    def test_a_canceller_that_answers_still_times_out(self) -> None:
        """A cancel that makes what was awaited succeed does not let the
        attempt go on: the next thing it awaits is cancelled at once, and
        it ends as a timeout."""
        clock = Clock()
        deadline = Deadline(clock, 5)
        second: Deferred[str] = Deferred()
        ended = self.run_attempt(deadline, [Deferred(lambda d: d.callback("whole")), second])
        clock.advance(5)
        self.failureResultOf(ended, AttemptTimeout)
        self.failureResultOf(second, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_an_answer_after_the_deadline_is_a_timeout(self) -> None:
        """An attempt that comes back with a result once its deadline passed
        (its last wait answered by the cancel) timed out all the same."""
        clock = Clock()
        deadline = Deadline(clock, 5)
        first: Deferred[str] = Deferred()
        ended = self.run_attempt(deadline, [first, Deferred(lambda d: d.callback("whole"))])
        first.callback("headers")
        clock.advance(5)
        self.assertEqual(str(self.failureResultOf(ended, AttemptTimeout).value), "timeout after 5s")

    def test_cancel_before_the_deadline_is_not_a_timeout(self) -> None:
        """Cancelled from outside (the client gone): CancelledError, and the timer is gone."""
        clock = Clock()
        deadline = Deadline(clock, 5)
        first: Deferred[str] = Deferred()
        ended = self.run_attempt(deadline, [first, Deferred()])
        clock.advance(4.999)
        ended.cancel()
        self.assertTrue(first.called)
        self.failureResultOf(ended, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_an_attempt_in_time(self) -> None:
        clock = Clock()
        deadline = Deadline(clock, 5)
        first: Deferred[str] = Deferred()
        second: Deferred[str] = Deferred()
        ended = self.run_attempt(deadline, [first, second])
        first.callback("headers")
        clock.advance(4)
        second.callback("body")
        self.assertEqual(self.successResultOf(ended), ("headers", "body"))
        self.assertEqual(clock.getDelayedCalls(), [])
