"""Stream pacing (``limits.stream_pace``) in the relay, on a ``Clock``:
content events evenly spaced, the others in order, the upstream held
paused meanwhile."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import parse_rates
from oaproxy.traffic.pacing import StreamPace, is_content_event
from tests.doubles import Client, FakeResponse, Harness
from tests.payloads import api_path, sse

CONFIG = """
dbtype: none
authorization: sk-client
stream_idle_timeout: 1
limits:
  stream_pace:
    /v1/chat/completions: "2/second"
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

ROLE = sse('{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
FINISH = sse('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
USAGE = sse('{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5}}')
DONE = sse("[DONE]")


def content(text: str) -> bytes:
    return sse(json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}))


PIECES = [content(t) for t in ("a", "b", "c", "d")]


class PacingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def stream(self) -> tuple[Client, FakeResponse]:
        client = self.h.chat(stream=True)
        response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        return client, response

    def pacer_timers(self) -> list[object]:
        return [c for c in self.h.clock.getDelayedCalls() if "Pacer" in repr(c)]

    def body(self, client: Client) -> bytes:
        return client.reply().body

    def test_content_events_are_spaced(self) -> None:
        """Content goes out one event per interval; role, finish and [DONE]
        wait their turn but take none; the stream ends once all is out."""
        client, response = self.stream()
        response.write(ROLE + b"".join(PIECES) + FINISH + USAGE + DONE)
        response.finish()
        self.assertEqual(self.body(client), ROLE + PIECES[0])
        self.assertEqual(response.transport.events, ["pause"])
        for seen in range(2, 4):
            self.h.clock.advance(0.49)
            self.assertEqual(self.body(client), ROLE + b"".join(PIECES[: seen - 1]))
            self.h.clock.advance(0.01)
            self.assertEqual(self.body(client), ROLE + b"".join(PIECES[:seen]))
        self.h.clock.advance(0.5)
        reply = client.reply()
        # The usage chunk oaproxy asked for is still left out.
        self.assertEqual(reply.body, ROLE + b"".join(PIECES) + FINISH + DONE)
        self.assertTrue(reply.complete)
        self.assertEqual(self.h.record()["outcome"], "ok")
        self.assertEqual(self.h.record()["usage"]["total_tokens"], 5)
        self.assertEqual(self.pacer_timers(), [])

    def test_the_upstream_waits_while_events_wait(self) -> None:
        """Nothing piles up: the upstream is paused while the pacer holds
        events, and resumed once it has written them."""
        client, response = self.stream()
        response.write(ROLE + PIECES[0] + PIECES[1])
        self.assertEqual(response.transport.events, ["pause"])
        self.h.clock.advance(0.5)
        self.assertEqual(response.transport.events, ["pause", "resume"])
        # The next event comes when its turn has come: written at once.
        self.h.clock.advance(0.5)
        response.write(PIECES[2])
        self.assertEqual(self.body(client), ROLE + b"".join(PIECES[:3]))
        self.assertEqual(response.transport.events, ["pause", "resume"])

    def test_a_paused_client_and_the_pacer_both_hold(self) -> None:
        """The upstream resumes only when neither the client nor the pacer holds it."""
        client, response = self.stream()
        response.write(ROLE + PIECES[0] + PIECES[1])
        client.pause()
        self.h.clock.advance(0.5)
        self.assertEqual(response.transport.events, ["pause"])
        client.resume()
        self.assertEqual(response.transport.events, ["pause", "resume"])

    def test_pacing_is_not_idleness(self) -> None:
        """A stream held by its pace longer than stream_idle_timeout is not cut."""
        client, response = self.stream()
        pieces = [content(str(n)) for n in range(8)]
        response.write(ROLE + b"".join(pieces) + DONE)
        response.finish()
        self.h.clock.pump([0.5] * 7)
        self.assertEqual(client.reply().body, ROLE + b"".join(pieces) + DONE)
        self.assertEqual(self.h.record()["outcome"], "ok")

    def test_a_client_that_leaves_stops_the_pacer(self) -> None:
        """A client gone mid-stream leaves no timer behind and aborts the upstream."""
        client, response = self.stream()
        response.write(ROLE + b"".join(PIECES))
        self.assertNotEqual(self.pacer_timers(), [])
        client.disconnect()
        self.assertEqual(self.h.record()["outcome"], "client_disconnected")
        self.assertIn("stop", response.transport.events)
        self.assertEqual(self.pacer_timers(), [])

    def test_other_routes_are_not_paced(self) -> None:
        """Only the configured routes are paced."""
        body = json.dumps({"model": "gpt-4o-mini", "prompt": "hi", "stream": True}).encode()
        lines = [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-client")]
        client = self.h.request(b"POST", b"/v1/completions", body, lines)
        response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        texts = [sse(json.dumps({"choices": [{"text": t}]})) for t in "abc"]
        response.write(b"".join(texts) + DONE)
        response.finish()
        self.assertEqual(client.reply().body, b"".join(texts) + DONE)


class ContentEventTests(SynchronousTestCase):
    def test_what_takes_a_turn(self) -> None:
        """Text, tool calls, completions text and Responses deltas are content;
        role, finish, usage and [DONE] are not."""
        content_events = [
            b'{"choices":[{"delta":{"content":"x"}}]}',
            b'{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}',
            b'{"choices":[{"text":"x"}]}',
            b'{"type":"response.output_text.delta","delta":"x"}',
        ]
        others = [
            b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
            b'{"choices":[{"delta":{},"finish_reason":"stop"}]}',
            b'{"choices":[],"usage":{"total_tokens":1}}',
            b'{"type":"response.completed"}',
            b"[DONE]",
            b"not json",
        ]
        self.assertEqual([is_content_event(e) for e in content_events], [True] * 4)
        self.assertEqual([is_content_event(e) for e in others], [False] * 6)

    def test_interval_by_route(self) -> None:
        """The pace is one interval per route, matched on the request's API path."""
        pace = StreamPace({"/v1/chat/completions": parse_rates("60/second")[0]})
        self.assertAlmostEqual(pace.interval(api_path(b"/v1/chat/completions?x=1") or ""), 1 / 60)
        self.assertIsNone(pace.interval("/v1/completions"))
