"""Tests for oaproxy.relay: the streaming relay, backpressure, body collection."""

from __future__ import annotations

import json
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer, ResponseFailed, ResponseNeverReceived

from oaproxy.record import FailureKind
from oaproxy.relay import (
    BodyCollector,
    BytesProducer,
    UpstreamEndedEarly,
    describe,
)
from oaproxy.requestbody import RequestBody
from tests.doubles import ChunkConsumer, Client, FakeResponse, Harness
from tests.payloads import chunk_data, cut, sse, sse_event, usage_chunk

CONFIG = """
authorization: sk-client
timeout: 30
stream_timeout: 5
stream_idle_timeout: 20
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b}
"""

# A real OpenAI chat completion stream asked with include_usage: every chunk
# names the dated model and a fingerprint, and carries "usage": null until the last.
OPENAI: dict[str, Any] = {
    "model": "gpt-4o-mini-2024-07-18",
    "chunk_id": "chatcmpl-9",
    "created": 1718000000,
    "system_fingerprint": "fp_1",
}
ROLE = sse(chunk_data({"role": "assistant", "content": "", "refusal": None}, usage=None, **OPENAI))
CONTENT = b"".join(
    sse(chunk_data({"content": piece}, usage=None, **OPENAI))
    for piece in ["Bonjour", " \u00e0 vous", ", \u4f60\u597d", " \U0001f44b", "!\n\nOK"]
)
FINISH = sse(chunk_data({}, "stop", usage=None, **OPENAI))
USAGE = sse_event(
    usage_chunk(
        {
            "prompt_tokens": 12,
            "completion_tokens": 9,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        **OPENAI,
    )
)
DONE = sse("[DONE]")
STREAM = ROLE + CONTENT + FINISH + USAGE + DONE


class SSESplitTests(SynchronousTestCase):
    def relay(
        self, chunks: list[bytes], extra: dict[str, Any] | None = None, config: str = CONFIG
    ) -> tuple[Harness, Client]:
        h = Harness(config)
        client = h.chat(stream=True, extra=extra)
        response = h.agent.calls[0].respond(200, b"text/event-stream; charset=utf-8")
        for chunk in chunks:
            response.write(chunk)
        response.finish()
        return h, client

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
    def test_any_split_hides_only_the_usage_chunk(self, offsets: list[int]) -> None:
        """oaproxy asked for usage: the client gets every byte but the usage chunk's."""
        h, client = self.relay(cut(STREAM, offsets))
        reply = client.reply()
        self.assertEqual((reply.status, reply.complete), (200, True))
        self.assertEqual(reply.body, ROLE + CONTENT + FINISH + DONE)
        record = h.record()
        self.assertEqual(
            record["usage"], {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
        )
        self.assertEqual(
            record["response_text"], "Bonjour \u00e0 vous, \u4f60\u597d \U0001f44b!\n\nOK"
        )
        self.assertEqual((record["outcome"], record["finish_reason"]), ("ok", "stop"))
        self.assertEqual(record["bytes_out"], len(reply.body))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
    def test_any_split_is_byte_identical_when_the_client_asked(self, offsets: list[int]) -> None:
        """When the client asked for usage itself, the stream reaches it byte
        for byte, usage chunk included, however the upstream split it; the
        record still has the usage."""
        h, client = self.relay(cut(STREAM, offsets), {"stream_options": {"include_usage": True}})
        self.assertEqual(client.reply().body, STREAM)
        self.assertEqual(
            h.record()["usage"], {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
        )

    def test_byte_at_a_time_with_crlf(self) -> None:
        """A CRLF stream delivered one byte at a time reaches the client as it
        was sent, less the usage chunk oaproxy asked for."""
        crlf = STREAM.replace(b"\n", b"\r\n")
        _, client = self.relay([crlf[i : i + 1] for i in range(len(crlf))])
        self.assertEqual(
            client.reply().body, (ROLE + CONTENT + FINISH + DONE).replace(b"\n", b"\r\n")
        )

    def test_usage_asked_for_the_upstream(self) -> None:
        """oaproxy adds stream_options.include_usage to the body it sends, and
        the producer's length is that of the body it writes."""
        h, _ = self.relay([STREAM])
        sent = h.agent.calls[0].json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(h.agent.calls[0].producer.length, len(h.agent.calls[0].body))  # type: ignore[union-attr]

    def test_no_usage_asked_when_the_upstream_opts_out(self) -> None:
        """With stream_usage off for the upstream, the body goes unchanged and
        the stream is relayed whole."""
        h, client = self.relay(
            [STREAM], config=CONFIG.replace("sk: sk-a}", "sk: sk-a, stream_usage: false}")
        )
        self.assertNotIn("stream_options", h.agent.calls[0].json())
        self.assertEqual(client.reply().body, STREAM)

    def test_unterminated_tail_is_passed_on(self) -> None:
        """Bytes after the last blank line are not invented or dropped."""
        _, client = self.relay([ROLE, DONE, b"data: tail"])
        self.assertEqual(client.reply().body, ROLE + DONE + b"data: tail")


class StreamEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)
        self.client = self.h.chat(stream=True)
        self.response = self.h.agent.calls[0].respond(200, b"text/event-stream")
        self.response.write(ROLE + CONTENT)

    def error_event(self, message: str) -> bytes:
        return (
            b'event: error\ndata: {"error":{"message":"upstream stream failed: '
            + message.encode()
            + b'","type":"upstream_error","code":null}}\n\n'
        )

    def test_close_after_done_is_a_clean_end(self) -> None:
        """A connection closed after [DONE] ends the stream well: the client's
        body is complete and the outcome is ok."""
        self.response.write(FINISH + DONE)
        self.response.lose()
        reply = self.client.reply()
        self.assertEqual((reply.body, reply.complete), (ROLE + CONTENT + FINISH + DONE, True))
        self.assertEqual(self.h.record()["outcome"], "ok")

    def test_close_without_done_is_a_failure(self) -> None:
        """A connection closed without [DONE] and without a clean end of the
        body ends the stream with an SSE error event; the record says the stream
        failed and why."""
        self.response.write(FINISH)
        self.response.lose()
        reply = self.client.reply()
        message = "the upstream closed the connection before the end of its answer"
        self.assertEqual(
            (reply.body, reply.complete),
            (ROLE + CONTENT + FINISH + self.error_event(message), True),
        )
        record = self.h.record()
        self.assertEqual((record["outcome"], record["error"]), ("stream_failed", message))

    def test_clean_end_without_done(self) -> None:
        """A chunked body that ends properly is whole, [DONE] or not."""
        self.response.finish()
        self.assertEqual(self.client.reply().body, ROLE + CONTENT)
        self.assertEqual(self.h.record()["outcome"], "ok")

    def test_idle_timer_counts_from_the_last_event_without_moving(self) -> None:
        """Events hold the stream's idle timeout off without a timer moved or
        made per event; the stream ends stream_idle_timeout after its last
        event with data (a keep-alive comment is no progress)."""
        timers = [(call, call.getTime()) for call in self.h.clock.getDelayedCalls()]
        for _ in range(19):
            self.h.clock.advance(1)
            self.response.write(CONTENT)
        self.assertEqual(
            [(call, call.getTime()) for call in self.h.clock.getDelayedCalls()], timers
        )
        # Due once the first time: it waits again for what is left.
        self.h.clock.advance(11)
        self.response.write(CONTENT)
        self.response.write(b": keep-alive\n\n")
        self.h.clock.advance(19)
        self.assertEqual(self.response.transport.events, [])
        self.h.clock.advance(1)
        self.assertEqual(self.response.transport.events, ["stop"])
        # The idle stream is continued on the second upstream.
        self.assertEqual(len(self.h.agent.calls), 2)

    def test_data_after_the_end_is_ignored(self) -> None:
        """Bytes that reach the relay after the body ended are not written to the client."""
        self.response.write(DONE)
        self.response.finish()
        relay = self.response.protocol
        assert relay is not None
        relay.dataReceived(b"data: late\n\n")
        self.assertEqual(self.client.reply().body, ROLE + CONTENT + DONE)


class RawRelayTests(SynchronousTestCase):
    BINARY = bytes(range(256)) * 3 + b"\r\n\r\ndata: [DONE]\n\n" + b"\x00" * 10

    def setUp(self) -> None:
        self.h = Harness(CONFIG)
        body = json.dumps({"model": "tts-1", "input": "hi", "voice": "alloy"}).encode()
        self.client = self.h.request(
            b"POST",
            b"/v1/audio/speech",
            body,
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-client")],
        )
        self.response = self.h.agent.calls[0].respond(200, b"audio/mpeg")

    def test_bytes_pass_untouched(self) -> None:
        """A binary body is relayed unchanged, chunked, whatever its pieces; the
        record counts its bytes and says it was no stream."""
        for piece in cut(self.BINARY, [1, 2, 100, 101, 500, 780]):
            self.response.write(piece)
        self.response.lose()
        reply = self.client.reply()
        self.assertEqual((reply.status, reply.body, reply.complete), (200, self.BINARY, True))
        self.assertEqual(reply.header(b"content-type"), b"audio/mpeg")
        self.assertEqual(reply.header(b"transfer-encoding"), b"chunked")
        record = self.h.record()
        self.assertEqual(
            (record["outcome"], record["bytes_out"], record["stream"]),
            ("ok", len(self.BINARY), False),
        )

    def test_committed_at_once(self) -> None:
        """A raw body is relayed from its first byte, nothing held back."""
        self.assertEqual(self.client.written, b"")
        self.response.write(b"ID3")
        self.assertTrue(self.client.written.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.client.written.endswith(b"\r\n\r\n3\r\nID3\r\n"))
        # The upstream's timeout no longer applies once relaying.
        self.h.clock.advance(19)
        self.response.write(b"\xff")
        self.h.clock.advance(19)
        self.response.finish()
        self.assertEqual(self.client.reply().body, b"ID3\xff")
        self.assertEqual(self.h.record()["outcome"], "ok")

    def test_failure_aborts_the_client_connection(self) -> None:
        """A raw body cannot carry an error: the client sees the cut instead."""
        self.response.write(b"ID3\x04")
        self.response.fail()
        reply = self.client.reply()
        self.assertEqual((reply.body, reply.complete), (b"ID3\x04", False))
        self.assertTrue(self.client.transport.disconnected)
        self.assertEqual(self.h.record()["outcome"], "stream_failed")

    def test_idle_timeout(self) -> None:
        """A raw body silent for stream_idle_timeout is stopped and the client's
        connection dropped; the record says why."""
        self.response.write(b"ID3")
        self.h.clock.advance(20)
        self.assertEqual(self.response.transport.events, ["stop"])
        self.assertTrue(self.client.transport.disconnected)
        self.assertEqual(self.h.record()["error"], "stream idle for more than 20s")


class BackpressureTests(SynchronousTestCase):
    def stream(self) -> tuple[Harness, Client, FakeResponse]:
        h = Harness(CONFIG)
        client = h.chat(stream=True)
        response = h.agent.calls[0].respond(200, b"text/event-stream")
        response.write(ROLE)
        return h, client, response

    def test_slow_client_pauses_the_upstream(self) -> None:
        """A client whose buffer is full pauses the upstream and resumes it when
        it drains; after the end the client's pauses no longer reach the
        upstream."""
        _, client, response = self.stream()
        client.pause()
        self.assertEqual(response.transport.events, ["pause"])
        client.resume()
        self.assertEqual(response.transport.events, ["pause", "resume"])
        response.write(CONTENT + DONE)
        response.finish()
        self.assertEqual(client.reply().body, ROLE + CONTENT + DONE)
        # Unregistered at the end: a later pause of the connection is not passed on.
        client.pause()
        self.assertEqual(response.transport.events, ["pause", "resume"])

    def test_raw_relay_pauses_the_upstream(self) -> None:
        """A raw body's relay passes the client's pauses and resumes to the upstream too."""
        h = Harness(CONFIG)
        client = h.request(
            b"GET",
            b"/v1/files/file-1/content",
            header_lines=[(b"Authorization", b"Bearer sk-client")],
        )
        response = h.agent.calls[0].respond(200, b"application/octet-stream")
        client.pause()
        client.resume()
        client.pause()
        self.assertEqual(response.transport.events, ["pause", "resume", "pause"])

    def test_paused_client_is_not_an_idle_upstream(self) -> None:
        """While the client holds the upstream paused, its silence is ours."""
        h, client, response = self.stream()
        h.clock.advance(15)
        client.pause()
        h.clock.advance(19)
        self.assertEqual(response.transport.events, ["pause"])
        client.resume()
        h.clock.advance(19)
        response.write(DONE)
        response.finish()
        self.assertEqual(client.reply().body, ROLE + DONE)
        self.assertEqual(h.record()["outcome"], "ok")
        # And after the resume the idle timer runs again.
        h2, client2, response2 = self.stream()
        client2.pause()
        h2.clock.advance(19)
        client2.resume()
        h2.clock.advance(20)
        self.assertEqual(response2.transport.events, ["pause", "resume", "stop"])

    def test_client_that_stops_reading_is_let_go(self) -> None:
        """A client that holds the upstream paused longer than the idle
        timeout loses its stream: it must not hold the upstream forever."""
        h, client, response = self.stream()
        client.pause()
        h.clock.advance(19.9)
        self.assertEqual(response.transport.events, ["pause"])
        h.clock.advance(0.1)
        self.assertEqual(response.transport.events, ["pause", "stop"])
        self.assertTrue(client.transport.disconnecting or client.transport.disconnected)
        record = h.record()
        self.assertEqual(record["outcome"], "client_disconnected")
        self.assertEqual(
            record["attempts"][0]["error"], "cancelled: client stopped reading for more than 20s"
        )
        self.assertIs(h.records[0].attempts[0].failure, FailureKind.CLIENT_STOPPED_READING)


class BodyCollectorTests(SynchronousTestCase):
    def collect(self, limit: int = 10) -> tuple[BodyCollector, FakeResponse, list[Any]]:
        collector = BodyCollector(limit)
        response = FakeResponse()
        response.deliverBody(collector)
        results: list[Any] = []
        collector.finished.addBoth(results.append)
        return collector, response, results

    def test_whole_body(self) -> None:
        """A body that ends cleanly is collected whole, its pieces joined."""
        _, response, results = self.collect()
        response.write(b"01234").write(b"56789")
        response.finish()
        self.assertEqual([r.joined() for r in results], [b"0123456789"])
        self.assertEqual((results[0].parts, results[0].size), ((b"01234", b"56789"), 10))

    def test_over_the_limit(self) -> None:
        """A body over the limit stops the upstream and fails as too large,
        once: the upstream's later failure adds nothing."""
        _, response, results = self.collect()
        response.write(b"0123456789")
        self.assertEqual(results, [])
        response.write(b"a")
        self.assertEqual(response.transport.events, ["stop"])
        self.assertIsInstance(results[0], Failure)
        results[0].trap(UpstreamEndedEarly)
        self.assertEqual(str(results[0].value), "response body over 10 bytes")
        self.assertIs(results[0].value.kind, FailureKind.BODY_TOO_LARGE)
        response.fail()
        self.assertEqual(len(results), 1)

    def test_cancel_stops_the_upstream(self) -> None:
        """Cancelling the collection stops the upstream's transport."""
        collector, response, results = self.collect()
        collector.finished.cancel()
        self.assertEqual(response.transport.events, ["stop"])
        results[0].trap(CancelledError)


class RequestBodyTests(SynchronousTestCase):
    def test_empty_body_has_no_producer(self) -> None:
        """An empty request body is sent without a body producer."""
        self.assertIsNone(RequestBody(size=0, data=b"").producer(Cooperator()))

    def test_bytes_body(self) -> None:
        """A body held in memory is sent by a BytesProducer of its length."""
        producer = RequestBody(size=3, data=b"abc").producer(Cooperator())
        assert isinstance(producer, BytesProducer)
        self.assertEqual(producer.length, 3)

    def test_file_body_is_replayed_from_the_start(self) -> None:
        """Each attempt reads the whole spool file, even after another closed
        its producer, and two readers at once do not disturb each other."""
        clock = Clock()
        cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        data = bytes(range(256)) * 1000
        with tempfile.TemporaryFile() as spool:
            spool.write(data)
            body = RequestBody(size=len(data), data=None, file=spool)
            runs = [self.produce(body, cooperator) for _ in range(2)]
            clock.advance(0)
            # An attempt whose request was cancelled stops its producer.
            stopped = self.produce(body, cooperator)
            stopped[2].stopProducing()
            runs.append(self.produce(body, cooperator))
            clock.advance(0)
            self.assertEqual(b"".join(stopped[0]), b"")
            for out, done, _ in runs:
                self.assertEqual((b"".join(out), done), (data, [None]))
                self.assertTrue(all(len(chunk) <= 2**16 for chunk in out))
            self.assertFalse(spool.closed)

    def produce(
        self, body: RequestBody, cooperator: Cooperator
    ) -> tuple[list[bytes], list[object], Any]:
        producer = body.producer(cooperator)
        assert isinstance(producer, FileBodyProducer)
        self.assertEqual(producer.length, body.size)
        out: list[bytes] = []
        done: list[object] = []
        consumer: Any = ChunkConsumer(out)
        producer.startProducing(consumer).addBoth(done.append)
        return out, done, producer


class DescribeTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        """Each failure gets its kind and a short text; a wrapped one is
        described by its reasons, the first of which names the kind."""
        table: list[tuple[BaseException, FailureKind, str]] = [
            (
                ConnectionRefusedError(),
                FailureKind.CONNECT_ERROR,
                "connect error: ConnectionRefusedError: Connection was refused by other side.",
            ),
            (CancelledError(), FailureKind.CANCELLED, "cancelled"),
            (ValueError(), FailureKind.OTHER, "ValueError"),
            (
                ResponseFailed([Failure(ConnectionLost()), Failure(CancelledError())]),
                FailureKind.OTHER,
                "ConnectionLost: Connection to the other side was lost in a non-clean fashion.; cancelled",
            ),
            (
                ResponseNeverReceived([Failure(ConnectionRefusedError("x"))]),
                FailureKind.CONNECT_ERROR,
                "connect error: ConnectionRefusedError: Connection was refused by other side: x.",
            ),
            (
                DNSLookupError("no.such.host"),
                FailureKind.DNS_ERROR,
                "connect error: DNSLookupError: DNS lookup failed: no.such.host.",
            ),
            (
                SSL.Error([("SSL routines", "", "certificate verify failed")]),
                FailureKind.TLS_ERROR,
                "connect error: Error: [('SSL routines', '', 'certificate verify failed')]",
            ),
            (
                UpstreamEndedEarly("response body over 10 bytes", FailureKind.BODY_TOO_LARGE),
                FailureKind.BODY_TOO_LARGE,
                "response body over 10 bytes",
            ),
            (
                UpstreamEndedEarly("upstream ended the stream before its first event"),
                FailureKind.UPSTREAM_ENDED_EARLY,
                "upstream ended the stream before its first event",
            ),
        ]
        for error, kind, text in table:
            self.assertEqual(describe(error), (kind, text))
            self.assertEqual(describe(Failure(error)), (kind, text))
