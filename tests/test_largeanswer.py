"""oaproxy.largeanswer: an answer too large to parse, looked at near its ends;
and oaproxy.relay.PartsWriter, which writes it to the client piece by piece."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from oaproxy.largeanswer import AnswerEnds
from oaproxy.record import Usage
from oaproxy.relay import CollectedBody, PartsWriter

USAGE = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


class AnswerEndsTests(SynchronousTestCase):
    def test_usage_at_the_end(self) -> None:
        """OpenAI's layout: the usage after the data."""
        tail = b'0.1,0.2]}],"model":"m","usage":' + json.dumps(USAGE).encode() + b"}"
        result = AnswerEnds(b'{"object":"list","data":[{"embedding":[0.1', tail).result()
        self.assertEqual(result.usage, Usage(8, 2, 10))
        self.assertEqual(result.truncated, ("response_text",))

    def test_usage_at_the_start(self) -> None:
        """A server that puts the usage first is read too."""
        head = b'{"usage":' + json.dumps(USAGE).encode() + b',"data":[[0.1,'
        self.assertEqual(AnswerEnds(head, b"0.2]]}").result().usage, Usage(8, 2, 10))

    def test_usage_quoted_in_a_string_is_text(self) -> None:
        """An escaped "usage" inside a string value is not the answer's usage."""
        text = json.dumps({"usage": {"prompt_tokens": 99, "total_tokens": 99}})
        tail = b'"content":' + json.dumps(text).encode() + b"}}]}"
        self.assertIsNone(AnswerEnds(b"{", tail).result().usage)

    def test_no_usage(self) -> None:
        """Without a readable usage object the record has none (the estimate stands)."""
        for tail in (b'"usage": null}', b'"usage": {"prompt', b"]}"):
            self.assertIsNone(AnswerEnds(b"{", tail).result().usage, tail)

    def test_ends(self) -> None:
        """The ends of a collected body are taken from its pieces, joined only there."""
        body = CollectedBody((b"abc", b"defg", b"hi"), 9)
        self.assertEqual(body.ends(4), (b"abcd", b"fghi"))
        self.assertEqual(body.ends(20), (b"abcdefghi", b"abcdefghi"))


class RequestDouble:
    """What PartsWriter uses of a twisted.web request."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.events: list[str] = []
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.events.append(f"register streaming={streaming}")

    def unregisterProducer(self) -> None:
        self.events.append("unregister")

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if len(self.written) == 2:
            # The client's buffer is full: the channel pauses its producer.
            self.producer.pauseProducing()

    def finish(self) -> None:
        self.events.append("finish")


class PartsWriterTests(SynchronousTestCase):
    def writer(self) -> tuple[PartsWriter, RequestDouble, list[object]]:
        request = RequestDouble()
        writer = PartsWriter(cast(Request, request), (b"a", b"b", b"c", b"d"))
        done: list[object] = []
        writer.done.addCallback(done.append)
        writer.start()
        return writer, request, done

    def test_written_as_the_client_takes_it(self) -> None:
        """A paused client gets no more pieces until it resumes; then the rest, and the end."""
        writer, request, done = self.writer()
        self.assertEqual((request.written, done), ([b"a", b"b"], []))
        writer.resumeProducing()
        self.assertEqual(request.written, [b"a", b"b", b"c", b"d"])
        self.assertEqual(request.events, ["register streaming=True", "unregister", "finish"])
        self.assertEqual(done, [None])

    def test_client_gone(self) -> None:
        """A client that goes away stops the writing; done fires, nothing is finished."""
        writer, request, done = self.writer()
        writer.stopProducing()
        writer.resumeProducing()
        self.assertEqual((request.written, done), ([b"a", b"b"], [None]))
        self.assertNotIn("finish", request.events)
