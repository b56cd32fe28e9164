"""Tests for oaproxy.forward: the attempt chain, its deadlines, failover, cancellation.

Every test drives the real site on an in-memory transport, with a ``Clock``
and a recording agent whose responses the test fires by hand.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestNotSent, ResponseNeverReceived
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from oaproxy.attempts import FAILOVER_STATUSES, attempt_deadline, fails_over
from oaproxy.exchange import Exchange
from oaproxy.record import FailureKind, Outcome
from oaproxy.relay import describe
from oaproxy.upstreamclient import NoResponse
from tests.doubles import Harness, Reply, make_config
from tests.payloads import content_chunk, error_body, sse
from tests.records import stored_attempt

CONFIG = """
authorization: {alice: sk-client}
timeout: 30
stream_timeout: 5
stream_idle_timeout: 20
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/api/v1", sk: sk-b}
  - {name: c, endpoint: "https://c.test/v1", sk: sk-c}
"""

REFUSED = "connect error: ConnectionRefusedError: Connection was refused by other side."
DONE = "ConnectionDone: Connection was closed cleanly."


# Today's behaviour for a committed stream that breaks: it ends there
# (tests/test_resume.py has the resumes).
RESUME_OFF_CONFIG = (
    CONFIG.replace("sk: sk-a}", "sk: sk-a, resume: off}")
    .replace("sk: sk-b}", "sk: sk-b, resume: off}")
    .replace("sk: sk-c}", "sk: sk-c, resume: off}")
)


class ForwardTestCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config)
        self.calls = self.h.agent.calls

    def assertReply(self, reply: Reply, status: int, body: bytes) -> None:
        self.assertEqual((reply.status, reply.body, reply.complete), (status, body, True))


class FailoverTests(ForwardTestCase):
    def test_first_upstream_answers(self) -> None:
        """When the first upstream answers, its answer is relayed whole and its
        one attempt is recorded with the time to its headers."""
        client = self.h.chat()
        self.assertEqual([c.uri for c in self.calls], [b"https://a.test/v1/chat/completions"])
        self.h.clock.advance(1.5)
        self.calls[0].respond(200, body=b'{"id":"x"}')
        self.assertReply(client.reply(), 200, b'{"id":"x"}')
        record = self.h.record()
        self.assertEqual(record["attempts"], [stored_attempt("a", 200, None, 1.5, 1.5)])
        self.assertEqual(
            (
                record["upstream"],
                record["status"],
                record["outcome"],
                record["ttfb"],
                record["duration"],
            ),
            ("a", 200, "ok", 1.5, 1.5),
        )

    def test_refusals_of_which_key_are_told_apart(self) -> None:
        """A 401 to the upstream's own key counts against it; to the client's (asis) not."""
        h = Harness(CONFIG.replace("sk: sk-b}", "sk: asis}"))
        client = h.chat()
        h.agent.calls[0].respond(401, body=b'{"error":"bad sk-a"}')
        h.agent.calls[1].respond(401, body=b'{"error":"bad client key"}')
        h.agent.calls[2].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        a, b, c = h.records[0].attempts
        self.assertEqual((a.status, b.status, c.status), (401, 401, 200))
        self.assertEqual(
            (a.upstream_at_fault, b.upstream_at_fault, c.upstream_at_fault), (True, False, False)
        )

    def test_large_answer_is_passed_in_pieces_not_parsed(self) -> None:
        """An answer over 1 MiB reaches the client whole; the record keeps its
        usage, read near its end, and marks its text truncated."""
        client = self.h.chat()
        body = json.dumps(
            {
                "choices": [{"index": 0, "message": {"content": "x" * (2 * 1024 * 1024)}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            }
        ).encode()
        response = self.calls[0].respond(200)
        for start in range(0, len(body), 65536):
            response.write(body[start : start + 65536])
        response.finish()
        self.assertReply(client.reply(), 200, body)
        record = self.h.record()
        self.assertEqual(
            (record["response_text"], record["truncated"], record["bytes_out"]),
            (None, ["response_text"], len(body)),
        )
        self.assertEqual(
            record["usage"], {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        )

    def test_large_error_answer_fails_over(self) -> None:
        """An error answer over 1 MiB is no error document: the next upstream is tried."""
        client = self.h.chat()
        self.calls[0].respond(400).write(b"x" * (1024 * 1024 + 1))
        self.assertEqual(self.calls[0].response.transport.events, ["stop"])  # type: ignore[union-attr]
        self.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(
            self.h.record()["attempts"][0]["error"],
            "response body over 1048576 bytes",
        )

    def test_connection_error_fails_over(self) -> None:
        """A refused connection moves on to the next upstream at once, which
        gets the same body under its own key; both attempts are recorded."""
        client = self.h.chat()
        self.h.clock.advance(0.25)
        self.calls[0].fail(ConnectionRefusedError())
        self.assertEqual(
            [c.uri for c in self.calls],
            [b"https://a.test/v1/chat/completions", b"https://b.test/api/v1/chat/completions"],
        )
        self.assertEqual(self.calls[1].header(b"authorization"), [b"Bearer sk-b"])
        self.assertEqual(self.calls[1].body, self.calls[0].body)
        self.h.clock.advance(1)
        self.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt("a", None, REFUSED, None, 0.25),
                stored_attempt("b", 200, None, 1.0, 1.0),
            ],
        )
        self.assertEqual((record["upstream"], record["outcome"]), ("b", "ok"))

    def test_dns_error_is_a_connect_error(self) -> None:
        """A failed DNS lookup fails over like a refused connection and is
        recorded as a connect error."""
        client = self.h.chat()
        self.calls[0].fail(DNSLookupError("no results for hostname lookup: a.test"))
        self.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(
            self.h.record()["attempts"][0]["error"],
            "connect error: DNSLookupError: DNS lookup failed: no results for hostname lookup: a.test.",
        )

    def test_failover_statuses(self) -> None:
        """Each status worth another upstream (401, 403, 404, 408, 409, 429 and
        any 5xx) makes the next upstream answer instead."""
        self.assertEqual(FAILOVER_STATUSES, {401, 403, 404, 408, 409, 429})
        for status in [401, 403, 404, 408, 409, 429, 500, 502, 503, 504, 529]:
            h = Harness(CONFIG)
            client = h.chat()
            h.agent.calls[0].respond(status, body=b'{"error":"first"}')
            self.assertEqual(len(h.agent.calls), 2, status)
            h.agent.calls[1].respond(200, body=b'{"ok":true}')
            self.assertReply(client.reply(), 200, b'{"ok":true}')
            self.assertEqual(
                h.record()["attempts"],
                [stored_attempt("a", status, None, 0.0), stored_attempt("b", 200, None, 0.0)],
            )

    def test_request_errors_answer_at_once(self) -> None:
        """A status that blames the request (400, 405, 413, 415, 422) is passed
        to the client as it came, phrase included, and no other upstream is
        tried."""
        for status in [400, 405, 413, 415, 422]:
            h = Harness(CONFIG)
            client = h.chat()
            body = b'{"error":{"message":"bad request","code":"%d"}}' % status
            h.agent.calls[0].respond(status, body=body, phrase=b"Nope")
            self.assertEqual(len(h.agent.calls), 1, status)
            reply = client.reply()
            self.assertReply(reply, status, body)
            self.assertEqual(reply.phrase, b"Nope")
            record = h.record()
            self.assertEqual(record["attempts"], [stored_attempt("a", status, None, 0.0)])
            self.assertEqual(
                (record["status"], record["outcome"], record["upstream"]),
                (status, "client_error", "a"),
            )

    def test_fails_over(self) -> None:
        """fails_over holds for exactly 401, 403, 404, 408, 409, 429 and the 5xx range."""
        self.assertEqual(
            [s for s in range(100, 600) if fails_over(s)],
            [401, 403, 404, 408, 409, 429, *range(500, 600)],
        )

    def test_exhausted_returns_the_last_answer(self) -> None:
        """When every upstream answers with a failover status the client gets
        the last answer with its own headers, not an earlier upstream's."""
        client = self.h.chat()
        self.calls[0].respond(500, body=b'{"error":"a"}')
        retry = Headers({b"retry-after": [b"7"], b"x-request-id": [b"req-b"]})
        self.calls[1].respond(
            429, body=b'{"error":"b"}', headers=retry, phrase=b"Too Many Requests"
        )
        self.calls[2].respond(
            503,
            body=b'{"error":{"message":"c is down"}}',
            headers=Headers({b"x-request-id": [b"req-c"]}),
        )
        reply = client.reply()
        self.assertReply(reply, 503, b'{"error":{"message":"c is down"}}')
        self.assertEqual(reply.header(b"x-request-id"), b"req-c")
        self.assertIsNone(reply.header(b"retry-after"))
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt("a", 500, None, 0.0),
                stored_attempt("b", 429, None, 0.0),
                stored_attempt("c", 503, None, 0.0),
            ],
        )
        self.assertEqual(
            (record["status"], record["outcome"], record["upstream"]), (503, "exhausted", "c")
        )

    def test_exhausted_keeps_the_last_answer_past_later_errors(self) -> None:
        """An upstream answer beats later failures without one: after a 429 then
        a timeout the client gets the 429."""
        client = self.h.chat()
        self.calls[0].fail(ConnectionRefusedError())
        self.calls[1].respond(429, body=b'{"error":"quota"}', phrase=b"Too Many Requests")
        self.h.clock.advance(30)
        self.assertTrue(self.calls[2].cancelled)
        reply = client.reply()
        self.assertReply(reply, 429, b'{"error":"quota"}')
        self.assertEqual(reply.phrase, b"Too Many Requests")
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt("a", None, REFUSED, None),
                stored_attempt("b", 429, None, 0.0),
                stored_attempt("c", None, "timeout after 30s", None, 30.0),
            ],
        )
        self.assertEqual(
            (record["status"], record["outcome"], record["upstream"]), (429, "exhausted", "b")
        )

    def test_exhausted_without_answer_is_502(self) -> None:
        """When no upstream answered at all the client gets a JSON 502 naming
        each upstream's failure."""
        client = self.h.chat()
        self.calls[0].fail(ConnectionRefusedError())
        self.h.clock.advance(30)
        self.calls[2].fail(RequestNotSent())
        # The stale-connection retry on a new connection fails too.
        self.h.fresh_agent.only().fail(ConnectionRefusedError())
        reply = client.reply()
        message = (
            f"All upstreams failed: a: {REFUSED}; b: timeout after 30s; c: RequestNotSent; "
            f"c: {REFUSED}"
        )
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.header(b"content-type"), b"application/json")
        self.assertEqual(
            reply.json(), error_body(message, "upstream_unavailable", "upstream_error")
        )
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt("a", None, REFUSED),
                stored_attempt("b", None, "timeout after 30s", None, 30.0),
                stored_attempt("c", None, "RequestNotSent"),
                stored_attempt("c", None, REFUSED, resent="RequestNotSent"),
            ],
        )
        self.assertEqual(
            (record["status"], record["outcome"], record["upstream"]), (502, "exhausted", None)
        )

    def test_exhausted_by_timeouts_is_504(self) -> None:
        """Each upstream is cancelled at its deadline and the next tried; when
        all of them timed out the client gets a 504."""
        client = self.h.chat()
        for n in range(3):
            self.assertEqual(len(self.calls), n + 1)
            self.h.clock.advance(29.9)
            self.assertEqual(len(self.calls), n + 1)
            self.h.clock.advance(0.1)
            self.assertTrue(self.calls[n].cancelled)
        reply = client.reply()
        message = (
            "All upstreams failed: a: timeout after 30s; b: timeout after 30s; c: timeout after 30s"
        )
        self.assertEqual(
            (reply.status, reply.json()),
            (504, error_body(message, "upstream_timeout", "upstream_error")),
        )
        self.assertEqual(self.h.record()["outcome"], "exhausted")
        self.assertEqual(self.h.record()["duration"], 90.0)

    def test_no_secret_in_answers_or_records(self) -> None:
        """Neither the client's key nor any upstream key appears in what the
        client receives or in the record."""
        client = self.h.chat()
        for call in self.calls[:1]:
            call.fail(ConnectionRefusedError())
        self.calls[1].respond(500, body=b"{}")
        self.calls[2].fail(ConnectionRefusedError())
        text = client.written + json.dumps(self.h.record()).encode()
        for secret in [b"sk-client", b"sk-a", b"sk-b", b"sk-c"]:
            self.assertNotIn(secret, text)


class DeadlineTests(ForwardTestCase):
    def test_non_stream_deadline_covers_the_body(self) -> None:
        """Headers in time, then the body stalls: the deadline counts from
        the start of the attempt, and the next upstream is tried."""
        client = self.h.chat()
        self.h.clock.advance(2)
        response = self.calls[0].respond(200)
        response.write(b'{"id":"chatcmpl-1","choi')
        self.h.clock.advance(27.9)
        self.assertEqual((len(self.calls), response.transport.stopped), (1, False))
        self.assertEqual(client.written, b"")
        self.h.clock.advance(0.1)
        self.assertEqual(response.transport.events, ["stop"])
        self.assertEqual(len(self.calls), 2)
        # The upstream's late close changes nothing.
        response.fail()
        self.h.clock.advance(1)
        self.calls[1].respond(200, body=b'{"id":"chatcmpl-2"}')
        self.assertReply(client.reply(), 200, b'{"id":"chatcmpl-2"}')
        self.assertEqual(
            self.h.record()["attempts"],
            [
                stored_attempt("a", 200, "timeout after 30s", 2.0, 30.0),
                stored_attempt("b", 200, None, 1.0, 1.0),
            ],
        )

    def test_body_failure_before_the_end_fails_over(self) -> None:
        """A non-stream body cut off before its end is no answer: the next
        upstream is tried and the cut attempt recorded as ended early."""
        client = self.h.chat()
        response = self.calls[0].respond(200)
        response.write(b'{"id":')
        response.fail()
        self.calls[1].respond(200, body=b'{"id":"b"}')
        self.assertReply(client.reply(), 200, b'{"id":"b"}')
        self.assertEqual(
            self.h.record()["attempts"][0],
            stored_attempt(
                "a",
                200,
                "ConnectionLost: Connection to the other side was lost "
                "in a non-clean fashion: upstream went away.",
                0.0,
            ),
        )

    def test_body_ended_by_close_is_whole(self) -> None:
        """No length and no chunking: the close ends a non-stream body."""
        client = self.h.chat()
        response = self.calls[0].respond(200)
        response.write(b'{"id":')
        response.write(b'"a"}')
        response.lose()
        self.assertReply(client.reply(), 200, b'{"id":"a"}')
        self.assertEqual(len(self.calls), 1)

    def test_per_upstream_timeouts(self) -> None:
        """An upstream's own timeout overrides the global one for its attempt."""
        h = Harness(
            CONFIG.replace("sk: sk-a}", "sk: sk-a, timeout: 3}").replace(
                "sk: sk-b}", "sk: sk-b, timeout: 7}"
            )
        )
        client = h.chat()
        h.clock.advance(3)
        self.assertEqual(len(h.agent.calls), 2)
        h.clock.advance(6.9)
        self.assertEqual(len(h.agent.calls), 2)
        h.clock.advance(0.1)
        self.assertEqual(len(h.agent.calls), 3)
        h.agent.calls[2].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(
            h.record()["attempts"],
            [
                stored_attempt("a", None, "timeout after 3s", None, 3.0),
                stored_attempt("b", None, "timeout after 7s", None, 7.0),
                stored_attempt("c", 200, None, 0.0),
            ],
        )

    def test_attempt_deadline(self) -> None:
        """A non-stream attempt gets timeout; a stream attempt gets
        stream_timeout unless it is the last candidate, which gets the longer of
        the two."""
        upstream = make_config(CONFIG).upstreams[0]
        self.assertEqual(attempt_deadline(upstream, stream=False, last=False), 30)
        self.assertEqual(attempt_deadline(upstream, stream=False, last=True), 30)
        self.assertEqual(attempt_deadline(upstream, stream=True, last=False), 5)
        self.assertEqual(attempt_deadline(upstream, stream=True, last=True), 30)
        slow = make_config(CONFIG.replace("stream_timeout: 5", "stream_timeout: 50")).upstreams[0]
        self.assertEqual(attempt_deadline(slow, stream=True, last=True), 50)


class StreamDeadlineTests(ForwardTestCase):
    def test_first_event_late_fails_over(self) -> None:
        """The stream deadline covers the headers and the first event."""
        client = self.h.chat(stream=True)
        self.h.clock.advance(1)
        first = self.calls[0].respond(200, b"text/event-stream")
        first.write(b": keep")  # not yet a whole event
        self.h.clock.advance(3.9)
        self.assertEqual((len(self.calls), client.written), (1, b""))
        self.h.clock.advance(0.1)
        self.assertEqual(first.transport.events, ["stop"])
        self.assertEqual(len(self.calls), 2)
        second = self.calls[1].respond(200, b"text/event-stream")
        second.write(sse(content_chunk("Hi"), "[DONE]"))
        second.finish()
        reply = client.reply()
        self.assertReply(reply, 200, sse(content_chunk("Hi"), "[DONE]"))
        self.assertEqual(reply.header(b"content-type"), b"text/event-stream")
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt("a", 200, "timeout after 5s", 1.0, 5.0),
                stored_attempt("b", 200, None, 0.0, 0.0),
            ],
        )
        self.assertEqual(
            (record["stream"], record["outcome"], record["upstream"]), (True, "ok", "b")
        )

    def test_keepalive_comments_do_not_commit(self) -> None:
        """Comments are no event: an upstream that only keeps the connection
        alive is failed over at the stream deadline."""
        client = self.h.chat(stream=True)
        first = self.calls[0].respond(200, b"text/event-stream")
        for _ in range(4):
            self.h.clock.advance(1)
            first.write(b": OPENROUTER PROCESSING\n\n")
        self.assertEqual(client.written, b"")
        self.h.clock.advance(1)
        self.assertEqual(first.transport.events, ["stop"])
        self.calls[1].respond(200, b"text/event-stream", body=sse(content_chunk("Hi"), "[DONE]"))
        self.assertReply(client.reply(), 200, sse(content_chunk("Hi"), "[DONE]"))
        self.assertEqual(
            self.h.record()["attempts"][0], stored_attempt("a", 200, "timeout after 5s", 0.0, 5.0)
        )

    def test_comments_before_the_first_event_are_relayed(self) -> None:
        """SSE comments that came before the first event are held back and then
        relayed ahead of it once it arrives."""
        client = self.h.chat(stream=True)
        first = self.calls[0].respond(200, b"text/event-stream")
        first.write(b": OPENROUTER PROCESSING\n\n")
        first.write(b": OPENROUTER PROCESSING\n\ndata: ")
        self.assertEqual(client.written, b"")
        first.write(content_chunk("Hi") + b"\n\n" + sse("[DONE]"))
        first.finish()
        self.assertReply(
            client.reply(),
            200,
            b": OPENROUTER PROCESSING\n\n" * 2 + sse(content_chunk("Hi"), "[DONE]"),
        )
        self.assertEqual(self.h.record()["response_text"], "Hi")

    def test_only_comments_then_the_end_fails_over(self) -> None:
        """A stream that ends after only comments never committed: the next upstream serves it."""
        client = self.h.chat(stream=True)
        first = self.calls[0].respond(200, b"text/event-stream")
        first.write(b": ping\n\n")
        first.finish()
        self.calls[1].respond(200, b"text/event-stream", body=sse("[DONE]"))
        self.assertReply(client.reply(), 200, sse("[DONE]"))
        self.assertEqual(
            self.h.record()["attempts"][0]["error"],
            "upstream ended the stream before its first event",
        )

    def test_an_attempt_that_fails_before_its_first_event_keeps_its_status(self) -> None:
        """The status an upstream answered with is in the attempt's record,
        though its stream ended before anything was passed on."""
        self.h.chat(stream=True)
        first = self.calls[0].respond(200, b"text/event-stream")
        first.finish()
        self.calls[1].respond(200, b"text/event-stream", body=sse("[DONE]"))
        attempt = self.h.record()["attempts"][0]
        self.assertEqual(
            (attempt["status"], attempt["error"]),
            (200, "upstream ended the stream before its first event"),
        )

    def test_too_many_comments_before_the_first_event_fail_over(self) -> None:
        """What a stream holds before its first event is capped by max_event_bytes."""
        h = Harness(CONFIG + "max_event_bytes: 256\n")
        client = h.chat(stream=True)
        first = h.agent.calls[0].respond(200, b"text/event-stream")
        for _ in range(32):
            first.write(b": ping\n\n")
        self.assertEqual((first.transport.events, len(h.agent.calls)), ([], 1))
        first.write(b": ping\n\n")
        self.assertEqual(first.transport.events, ["stop"])
        h.agent.calls[1].respond(200, b"text/event-stream", body=sse(content_chunk("Hi"), "[DONE]"))
        self.assertReply(client.reply(), 200, sse(content_chunk("Hi"), "[DONE]"))
        self.assertEqual(
            h.record()["attempts"][0]["error"],
            "over 256 bytes before the first event",
        )

    def test_headers_late_fail_over_after_stream_timeout(self) -> None:
        """A stream request whose headers have not come by stream_timeout is
        cancelled and the next upstream tried."""
        self.h.chat(stream=True)
        self.h.clock.advance(5)
        self.assertTrue(self.calls[0].cancelled)
        self.assertEqual(len(self.calls), 2)

    def test_last_candidate_waits_longer(self) -> None:
        """The last candidate of a stream is given the longer of stream_timeout
        and timeout before the request ends in a 504."""
        client = self.h.chat(stream=True)
        self.h.clock.advance(5)
        self.h.clock.advance(5)
        self.assertEqual(len(self.calls), 3)
        # The last one: max(stream_timeout, timeout) = 30 s.
        last = self.calls[2].respond(200, b"text/event-stream")
        self.h.clock.advance(29.9)
        self.assertEqual(last.transport.events, [])
        self.h.clock.advance(0.1)
        self.assertEqual(last.transport.events, ["stop"])
        reply = client.reply()
        message = (
            "All upstreams failed: a: timeout after 5s; b: timeout after 5s; c: timeout after 30s"
        )
        self.assertEqual(
            (reply.status, reply.json()),
            (504, error_body(message, "upstream_timeout", "upstream_error")),
        )
        self.assertEqual(self.h.record()["duration"], 40.0)

    def test_stream_error_status_is_read_whole(self) -> None:
        """A stream request answered with an error is an ordinary answer."""
        client = self.h.chat(stream=True, extra={"stream_options": {"include_usage": True}})
        self.calls[0].respond(429, body=b'{"error":"slow down"}')
        self.calls[1].respond(400, body=b'{"error":"bad"}')
        self.assertReply(client.reply(), 400, b'{"error":"bad"}')
        self.assertEqual(len(self.calls), 2)

    def test_stream_options_refused_retried_without(self) -> None:
        """An upstream that refuses the stream_options oaproxy added gets the
        request once more as the client sent it; a second refusal is the answer."""
        client = self.h.chat(stream=True)
        self.calls[0].respond(400, body=b'{"error":"unknown field stream_options"}')
        self.assertEqual(len(self.calls), 2)
        first, second = (json.loads(call.body) for call in self.calls)
        self.assertEqual(first["stream_options"], {"include_usage": True})
        self.assertNotIn("stream_options", second)
        self.assertEqual(self.calls[1].uri, self.calls[0].uri)
        self.calls[1].respond(400, body=b'{"error":"bad"}')
        self.assertReply(client.reply(), 400, b'{"error":"bad"}')
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(
            [(a["upstream"], a["status"]) for a in self.h.record()["attempts"]],
            [("a", 400), ("a", 400)],
        )

    def test_end_before_first_event_fails_over(self) -> None:
        """A stream that ends inside its first, unfinished event never
        committed: the next upstream serves it."""
        client = self.h.chat(stream=True)
        first = self.calls[0].respond(200, b"text/event-stream")
        first.write(b"data: {")
        first.finish()
        self.calls[1].respond(200, b"text/event-stream", body=sse("[DONE]"))
        self.assertReply(client.reply(), 200, sse("[DONE]"))
        self.assertEqual(
            self.h.record()["attempts"][0]["error"],
            "upstream ended the stream before its first event",
        )


class CommittedStreamTests(ForwardTestCase):
    config = RESUME_OFF_CONFIG

    def commit(self) -> tuple[Any, Any]:
        client = self.h.chat(stream=True)
        self.h.clock.advance(1)
        response = self.calls[0].respond(200, b"text/event-stream")
        self.h.clock.advance(1)
        response.write(sse(content_chunk("Hel")))
        return client, response

    def test_failure_after_commit_ends_with_error_event(self) -> None:
        """Once events were relayed, an upstream that breaks off ends the
        client's stream with an SSE error event, and no other upstream is
        tried."""
        client, response = self.commit()
        response.write(sse(content_chunk("lo")))
        self.h.clock.advance(3)
        response.fail()
        reply = client.reply()
        error = (
            "upstream stream failed: ConnectionLost: Connection to the other side was lost "
            "in a non-clean fashion: upstream went away."
        )
        event = (
            b'event: error\ndata: {"error":{"message":"'
            + error.encode()
            + b'","type":"upstream_error","code":null}}\n\n'
        )
        self.assertReply(reply, 200, sse(content_chunk("Hel"), content_chunk("lo")) + event)
        # Committed: no other upstream is tried.
        self.assertEqual(len(self.calls), 1)
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [
                stored_attempt(
                    "a",
                    200,
                    "ConnectionLost: Connection to the other side was lost in a non-clean fashion: "
                    "upstream went away.",
                    1.0,
                    5.0,
                )
            ],
        )
        self.assertEqual(
            (record["status"], record["outcome"], record["ttfb"], record["response_text"]),
            (200, "stream_failed", 2.0, "Hello"),
        )

    def test_idle_timeout_ends_with_error_event(self) -> None:
        """A committed stream silent for stream_idle_timeout is stopped and
        ended with one SSE error event; the upstream's late close adds
        nothing."""
        client, response = self.commit()
        self.h.clock.advance(19)
        response.write(sse(content_chunk("lo")))
        self.h.clock.advance(19.9)
        self.assertFalse(response.transport.stopped)
        self.h.clock.advance(0.1)
        self.assertEqual(response.transport.events, ["stop"])
        # The upstream's close after the abort is not relayed twice.
        response.fail()
        event = (
            b'event: error\ndata: {"error":{"message":"upstream stream failed: stream idle for more '
            b'than 20s","type":"upstream_error","code":null}}\n\n'
        )
        self.assertReply(
            client.reply(), 200, sse(content_chunk("Hel"), content_chunk("lo")) + event
        )
        record = self.h.record()
        self.assertEqual(
            record["attempts"],
            [stored_attempt("a", 200, "stream idle for more than 20s", 1.0, 41.0)],
        )
        self.assertEqual(record["outcome"], "stream_failed")

    def test_keepalive_comments_are_no_progress(self) -> None:
        """Keep-alive comments are relayed but are no progress: a stream
        that sends only them for the 20 s idle timeout has stalled."""
        client, response = self.commit()
        self.h.clock.advance(10)
        response.write(b": keep-alive\n\n")
        self.h.clock.advance(9.9)
        self.assertFalse(response.transport.stopped)
        self.h.clock.advance(0.1)
        self.assertTrue(response.transport.stopped)
        self.assertIn(sse(content_chunk("Hel")) + b": keep-alive\n\n", client.reply().body)
        record = self.h.record()
        self.assertEqual(
            (record["outcome"], record["error"]), ("stream_failed", "stream idle for more than 20s")
        )


class StaleConnectionTests(ForwardTestCase):
    def test_retried_once_on_a_fresh_connection(self) -> None:
        """A request that failed on a stale pooled connection is sent once more,
        identical, on a fresh connection to the same upstream."""
        for error in [RequestNotSent(), ResponseNeverReceived([Failure(ConnectionDone())])]:
            h = Harness(CONFIG)
            client = h.chat()
            h.agent.calls[0].fail(error)
            fresh = h.fresh_agent.only()
            first = h.agent.calls[0]
            self.assertEqual(
                (fresh.method, fresh.uri, list(fresh.headers.getAllRawHeaders()), fresh.body),
                (first.method, first.uri, list(first.headers.getAllRawHeaders()), first.body),
            )
            fresh.respond(200, body=b'{"id":"fresh"}')
            self.assertReply(client.reply(), 200, b'{"id":"fresh"}')
            self.assertEqual(len(h.agent.calls), 1)
            # The record shows both sendings, as the upstream saw them.
            said = describe(error)[1]
            self.assertEqual(
                h.record()["attempts"],
                [stored_attempt("a", None, said), stored_attempt("a", 200, None, 0.0, resent=said)],
            )

    def test_stale_then_failing_fails_over(self) -> None:
        """When the fresh-connection retry fails too, the next upstream is tried
        (and gets its own resend); the record has each sending."""
        client = self.h.chat()
        self.calls[0].fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        self.h.fresh_agent.only().fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        self.assertEqual(len(self.h.fresh_agent.calls), 1)
        self.assertEqual(len(self.calls), 2)
        self.calls[1].fail(RequestNotSent())
        self.assertEqual(len(self.h.fresh_agent.calls), 2)
        self.h.fresh_agent.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(
            self.h.record()["attempts"],
            [
                stored_attempt("a", None, DONE),
                stored_attempt("a", None, DONE, resent=DONE),
                stored_attempt("b", None, "RequestNotSent"),
                stored_attempt("b", 200, None, 0.0, resent="RequestNotSent"),
            ],
        )

    def test_all_stale_is_502_not_500(self) -> None:
        """Stale connections everywhere, retries included, end in a 502 naming
        each upstream, not in an internal error."""
        client = self.h.chat()
        for n in range(3):
            self.calls[n].fail(RequestNotSent())
            self.h.fresh_agent.calls[n].fail(RequestNotSent())
        reply = client.reply()
        self.assertEqual(reply.status, 502)
        self.assertEqual(
            reply.json(),
            error_body(
                "All upstreams failed: "
                + "; ".join(f"{name}: RequestNotSent; {name}: RequestNotSent" for name in "abc"),
                "upstream_unavailable",
                "upstream_error",
            ),
        )

    def test_cancelled_is_not_stale(self) -> None:
        """A request the client's HTTP stack cancelled is not sent again."""
        client = self.h.chat()
        self.calls[0].fail(ResponseNeverReceived([Failure(CancelledError())]))
        self.assertEqual(self.h.fresh_agent.calls, [])
        self.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(self.h.record()["attempts"][0]["error"], "cancelled")


class UpstreamClientStaleTests(ForwardTestCase):
    """oaproxy.upstreamclient says on the failure whether the connection was reused."""

    def test_reused_connection_retried_and_noted(self) -> None:
        """NoResponse on a reused connection: once more on a new one, and the attempt says so."""
        client = self.h.chat()
        self.calls[0].fail(NoResponse([Failure(ConnectionDone())], reused=True, request_sent=True))
        self.h.fresh_agent.only().respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        stale, resent = self.h.exchanges[0].attempts
        self.assertEqual((stale.failure, stale.error), (FailureKind.STALE_CONNECTION, DONE))
        self.assertEqual(resent.resent, DONE)
        self.assertNotIn("resent", self.h.record()["attempts"][0])
        self.assertEqual(self.h.record()["attempts"][1]["resent"], DONE)

    def test_new_connection_failed_over_not_resent(self) -> None:
        """NoResponse on a new connection: the upstream may have acted, so fail over."""
        client = self.h.chat()
        self.calls[0].fail(NoResponse([Failure(ConnectionDone())], reused=False, request_sent=True))
        self.assertEqual(self.h.fresh_agent.calls, [])
        self.calls[1].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertIsNone(self.h.exchanges[0].attempts[0].resent)


class ClientDisconnectTests(ForwardTestCase):
    def check_gone(self, h: Harness, attempts: list[dict[str, Any]], status: int = 499) -> None:
        record = h.record()
        self.assertEqual(record["attempts"], attempts)
        self.assertEqual((record["status"], record["outcome"]), (status, "client_disconnected"))

    def test_disconnect_cancels_the_upstream_request(self) -> None:
        """A client that leaves while waiting cancels the upstream request, and
        no other upstream is ever tried for it, however the cancellation is
        reported."""
        for cancel_error in [None, lambda: ResponseNeverReceived([Failure(CancelledError())])]:
            h = Harness(CONFIG, cancel_error=cancel_error)
            client = h.chat()
            h.clock.advance(2)
            self.assertFalse(h.agent.calls[0].cancelled)
            client.disconnect()
            self.assertTrue(h.agent.calls[0].cancelled)
            # No other upstream is tried for a client that is gone, ever.
            h.clock.advance(100)
            self.assertEqual(len(h.agent.calls), 1)
            self.check_gone(
                h, [stored_attempt("a", None, "cancelled: client disconnected", None, 2.0)]
            )

    def test_disconnect_after_a_failover(self) -> None:
        """A client that leaves after a failover cancels the attempt then under
        way; the earlier one is left as it was."""
        client = self.h.chat()
        self.calls[0].respond(503, body=b"{}")
        client.disconnect()
        self.assertEqual([c.cancelled for c in self.calls], [False, True])
        self.check_gone(
            self.h,
            [
                stored_attempt("a", 503, None, 0.0),
                stored_attempt("b", None, "cancelled: client disconnected"),
            ],
        )

    def test_disconnect_while_reading_the_body(self) -> None:
        """A client that leaves while a non-stream body arrives stops the
        upstream's transport; nothing else is tried."""
        client = self.h.chat()
        response = self.calls[0].respond(200)
        response.write(b'{"id":')
        client.disconnect()
        self.assertEqual(response.transport.events, ["stop"])
        self.h.clock.advance(100)
        self.assertEqual(len(self.calls), 1)
        self.check_gone(self.h, [stored_attempt("a", 200, "cancelled: client disconnected", 0.0)])

    def test_disconnect_before_the_first_event(self) -> None:
        """A client that leaves after stream headers but before any event stops
        the upstream and is recorded as gone."""
        client = self.h.chat(stream=True)
        response = self.calls[0].respond(200, b"text/event-stream")
        client.disconnect()
        self.assertEqual(response.transport.events, ["stop"])
        self.check_gone(self.h, [stored_attempt("a", 200, "cancelled: client disconnected", 0.0)])

    def test_disconnect_mid_relay(self) -> None:
        """A client that leaves mid-stream stops the upstream; what the upstream
        still sends goes nowhere and the record counts only the bytes
        relayed."""
        client = self.h.chat(stream=True)
        response = self.calls[0].respond(200, b"text/event-stream")
        response.write(sse(content_chunk("Hel")))
        self.h.clock.advance(3)
        client.disconnect()
        self.assertEqual(response.transport.events, ["stop"])
        # What the upstream still sends, or its close, goes nowhere.
        response.write(sse(content_chunk("lo")))
        response.fail()
        self.h.clock.advance(100)
        self.assertEqual(len(self.calls), 1)
        self.check_gone(
            self.h,
            [stored_attempt("a", 200, "cancelled: client disconnected", 0.0, 3.0)],
            status=200,
        )
        self.assertEqual(self.h.record()["bytes_out"], len(sse(content_chunk("Hel"))))


class FailureKindTests(ForwardTestCase):
    """Each attempt's record says why it failed as a kind, beside its text."""

    config = RESUME_OFF_CONFIG

    def kinds(self, index: int = 0) -> list[FailureKind | None]:
        return [attempt.failure for attempt in self.h.records[index].attempts]

    def test_failover_reasons(self) -> None:
        """A refused connection, a DNS failure and a status worth another
        upstream each have their kind; the answer that served has none."""
        client = self.h.chat()
        self.calls[0].fail(ConnectionRefusedError())
        self.calls[1].fail(DNSLookupError("no results for hostname lookup: b.test"))
        self.calls[2].respond(200, body=b"{}")
        self.assertReply(client.reply(), 200, b"{}")
        self.assertEqual(self.kinds(), [FailureKind.CONNECT_ERROR, FailureKind.DNS_ERROR, None])
        self.h.chat()
        self.calls[3].respond(429, body=b"{}")
        self.calls[4].respond(400, body=b"{}")
        self.assertEqual(self.kinds(1), [FailureKind.STATUS, None])
        self.assertEqual(self.h.records[1].outcome, Outcome.CLIENT_ERROR)

    def test_timeouts(self) -> None:
        """Deadlines are timeouts: all of them make the exhausted answer a 504."""
        client = self.h.chat()
        for _ in range(3):
            self.h.clock.advance(30)
        self.assertEqual(client.reply().status, 504)
        self.assertEqual(self.kinds(), [FailureKind.TIMEOUT] * 3)
        self.assertEqual(self.h.records[0].outcome, Outcome.EXHAUSTED)

    def test_upstream_ended_early(self) -> None:
        """A body cut before its end, and a stream closed before its first
        event, ended early; a timeout among such failures makes a 502."""
        client = self.h.chat(stream=True)
        self.calls[0].respond(200, b"text/event-stream").finish()
        self.calls[1].respond(200, b"text/event-stream").write(b": keep-alive\n\n").fail()
        self.h.clock.advance(30)
        self.assertEqual(client.reply().status, 502)
        self.assertEqual(
            self.kinds(),
            [
                FailureKind.UPSTREAM_ENDED_EARLY,
                FailureKind.UPSTREAM_ENDED_EARLY,
                FailureKind.TIMEOUT,
            ],
        )

    def test_committed_stream_failures(self) -> None:
        """After the commit, an unclean end ended early and silence is a
        stream idle; both make the request a failed stream."""
        self.h.chat(stream=True)
        self.calls[0].respond(200, b"text/event-stream").write(sse(content_chunk("a"))).fail()
        self.h.chat(stream=True)
        self.calls[1].respond(200, b"text/event-stream").write(sse(content_chunk("a")))
        self.h.clock.advance(20)
        self.assertEqual(self.kinds(0), [FailureKind.UPSTREAM_ENDED_EARLY])
        self.assertEqual(self.kinds(1), [FailureKind.STREAM_IDLE])
        self.assertEqual([record.outcome for record in self.h.records], [Outcome.STREAM_FAILED] * 2)

    def test_client_disconnected(self) -> None:
        """The attempt a departing client leaves was cancelled, whatever the
        stage: waiting for headers, or relaying a stream."""
        self.h.chat().disconnect()
        stream = self.h.chat(stream=True)
        self.calls[1].respond(200, b"text/event-stream").write(sse(content_chunk("a")))
        stream.disconnect()
        for index in (0, 1):
            self.assertEqual(self.kinds(index), [FailureKind.CANCELLED])
            self.assertEqual(self.h.records[index].outcome, Outcome.CLIENT_DISCONNECTED)


SECRETS_CONFIG = """
authorization: {alice: ck-alice-0123456789}
stream_idle_timeout: 20
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a-0123456789}
  - {name: b, endpoint: "https://b.test/v1", sk: asis}
"""


class OutsideTextTests(SynchronousTestCase):
    """Texts from upstreams about a failure are redacted once, as they come
    in: the client, the record and the alert all get the redacted text."""

    def setUp(self) -> None:
        self.h = Harness(SECRETS_CONFIG)

    def assertClean(self, data: str | bytes) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        for secret in ("sk-a-0123456789", "ck-alice-0123456789", "sk-unknown-0123456789"):
            self.assertNotIn(secret, text)

    def test_exception_texts_quoting_keys(self) -> None:
        """An error text echoing a configured key, the client's, or an unknown
        key-shaped one reaches neither the 502 nor the record."""
        client = self.h.chat(key="ck-alice-0123456789")
        echo = "upstream said: Authorization: Bearer sk-a-0123456789"
        self.h.agent.calls[0].fail(ResponseFailed([Failure(ValueError(echo))]))
        echo = "got ck-alice-0123456789 and sk-unknown-0123456789"
        self.h.agent.calls[1].fail(ResponseFailed([Failure(ValueError(echo))]))
        reply = client.reply()
        self.assertEqual(reply.status, 502)
        self.assertIn(b"Bearer [redacted]", reply.body)
        self.assertClean(reply.body)
        self.assertClean(json.dumps(self.h.record()))

    def test_stream_failure_text_quoting_keys(self) -> None:
        """A committed stream's failure text is redacted in the SSE error event and the record."""
        client = self.h.chat(key="ck-alice-0123456789", stream=True)
        response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        response.write(sse(content_chunk("a")))
        response.fail(ValueError("lost with sk-a-0123456789 and ck-alice-0123456789"))
        # b would continue it, and fails too: the stream ends with the break.
        self.h.agent.calls[1].respond(500, body=b"{}")
        reply = client.reply()
        self.assertIn(b"upstream stream failed: ", reply.body)
        self.assertIn(b"[redacted]", reply.body)
        self.assertClean(reply.body)
        self.assertClean(json.dumps(self.h.record()))

    def test_phrase_and_error_body_quoting_the_clients_key(self) -> None:
        """An upstream passed the client's key (asis) that echoes it in its
        phrase and body: the client and the record get neither."""
        client = self.h.chat(key="ck-alice-0123456789")
        self.h.agent.calls[0].respond(500, body=b"{}")
        self.h.agent.calls[1].respond(
            401,
            body=b'{"error": {"message": "bad key ck-alice-0123456789"}}',
            phrase=b"Unauthorized ck-alice-0123456789",
        )
        reply = client.reply()
        self.assertEqual(
            (reply.status, reply.phrase, reply.body),
            (401, b"Unauthorized [redacted]", b'{"error": {"message": "bad key [redacted]"}}'),
        )
        self.assertClean(json.dumps(self.h.record()))


class ExchangeTests(SynchronousTestCase):
    """The state of one request, as the forwarder and the service leave it."""

    def exchange(self) -> Exchange:
        h = Harness(CONFIG)
        self.h = h
        self.client = h.chat(stream=True)
        [exchange] = h.shared.ledger
        return exchange

    def test_cut_at_shutdown(self) -> None:
        """A request the proxy cuts off ended by shutdown, though its client's
        side closes next (and its attempt is cancelled)."""
        exchange = self.exchange()
        self.h.agent.calls[0].respond(200, b"text/event-stream").write(sse(content_chunk("a")))
        exchange.cut_at_shutdown()
        self.client.disconnect()
        record = self.h.record()
        self.assertEqual(
            (record["outcome"], record["error"]), ("shutdown", "cut off when the proxy shut down")
        )
        self.assertEqual(record["attempts"][0]["error"], "cancelled: client disconnected")
        self.assertIs(exchange.outcome, Outcome.SHUTDOWN)

    def test_client_disconnected_once(self) -> None:
        """The departure is told twice (the web layer, then the forwarder)
        and counted as one: one outcome, the attempt cancelled once."""
        exchange = self.exchange()
        self.client.disconnect()
        self.assertTrue(exchange.client_gone)
        self.assertIs(exchange.outcome, Outcome.CLIENT_DISCONNECTED)
        self.assertEqual(
            [(a.failure, a.error) for a in exchange.attempts],
            [(FailureKind.CANCELLED, "cancelled: client disconnected")],
        )
