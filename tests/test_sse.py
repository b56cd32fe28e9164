"""Tests for oaproxy.sse: event splitting, event data, the error event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise

import httpx2
import openai
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletionChunk
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.sse import EventTooLarge, SSESplitter, event_data, sse_error_event


def split_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(splitter.feed(chunk))
    events.extend(splitter.end())
    return events, splitter.pending()


def cut(data: bytes, offsets: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(o % (len(data) + 1) for o in offsets)})
    return [data[a:b] for a, b in pairwise(points)]


# Lines are text without CR or LF; terminators are any SSE line end.
line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
    max_size=12,
)
terminator = st.sampled_from(["\n", "\r\n", "\r"])
field_line = st.one_of(
    st.builds(lambda v: "data: " + v, line_text),
    st.builds(lambda v: "data:" + v, line_text),
    st.just("data"),
    st.builds(lambda v: ": " + v, line_text),
    st.builds(lambda v: "event: " + v, line_text),
)


@st.composite
def events(draw: st.DrawFn) -> list[bytes]:
    """Well-formed events, each ending at its own blank line."""
    result = []
    for _ in range(draw(st.integers(0, 6))):
        lines = draw(st.lists(st.tuples(field_line, terminator), min_size=1, max_size=4))
        blank = draw(terminator)
        if lines[-1][1] == "\r" and blank.startswith("\n"):
            # A bare CR then LF is one CRLF line end, not a blank line.
            blank = "\r"
        result.append(("".join(line + end for line, end in lines) + blank).encode("utf-8"))
    return result


class SplitterTests(SynchronousTestCase):
    def test_lf_events(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\n\ndata: b\n"), [b"data: a\n\n"])
        self.assertEqual(splitter.pending(), b"data: b\n")
        self.assertEqual(splitter.feed(b"\ndata: c"), [b"data: b\n\n"])
        self.assertEqual(splitter.pending(), b"data: c")

    def test_crlf_events(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\n\r\ndata: b\r\n\r\n"),
            [b"data: a\r\n\r\n", b"data: b\r\n\r\n"],
        )
        self.assertEqual(splitter.pending(), b"")

    def test_crlf_is_not_a_blank_line(self) -> None:
        # "\r\n" is one line end, not CR then LF.
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\ndata: b\r\n"), [])
        self.assertEqual(splitter.feed(b"\r\n"), [b"data: a\r\ndata: b\r\n\r\n"])

    def test_cr_events(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\rdata: b\r\rx"), [b"data: a\r\r", b"data: b\r\r"]
        )

    def test_trailing_cr_waits_for_next_byte(self) -> None:
        # The final CR may be the first half of a CRLF that belongs to this event.
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\n\r"), [])
        self.assertEqual(splitter.feed(b"\n"), [b"data: a\r\n\r\n"])
        self.assertEqual(splitter.feed(b"data: b\r\r"), [])
        self.assertEqual(splitter.feed(b"d"), [b"data: b\r\r"])
        self.assertEqual(splitter.pending(), b"d")

    def test_end_releases_cr_terminated_event(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\r"), [])
        self.assertEqual(splitter.end(), [b"data: a\r\r"])
        self.assertEqual(splitter.pending(), b"")

    def test_end_keeps_unterminated_tail(self) -> None:
        splitter = SSESplitter()
        splitter.feed(b"data: a\n")
        self.assertEqual(splitter.end(), [])
        self.assertEqual(splitter.pending(), b"data: a\n")

    def test_mixed_line_ends(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n"),
            [b"data: a\r\n\n", b"data: b\n\r\n", b"data: c\r\r\n"],
        )

    def test_leading_blank_line_is_its_own_event(self) -> None:
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"\ndata: a\n\n\r\n"), [b"\n", b"data: a\n\n", b"\r\n"])

    def test_byte_at_a_time(self) -> None:
        data = b"".join(b'data: {"i": %d}\r\n\r\n' % i for i in range(200)) + b": tail"
        splitter = SSESplitter()
        got: list[bytes] = []
        for i in range(len(data)):
            got.extend(splitter.feed(data[i : i + 1]))
        self.assertEqual(len(got), 200)
        self.assertEqual(b"".join(got) + splitter.pending(), data)

    def test_many_small_chunks_stay_linear(self) -> None:
        # One long event fed in tiny pieces: each feed searches only the new bytes.
        splitter = SSESplitter()
        piece = b"data: " + b"x" * 3 + b"\n"
        for _ in range(20000):
            self.assertEqual(splitter.feed(piece), [])
        self.assertLessEqual(splitter._scan, len(splitter.pending()))
        self.assertGreater(splitter._scan, len(splitter.pending()) - 4)
        self.assertEqual(len(splitter.feed(b"\n")), 1)

    def test_event_up_to_the_cap_passes(self) -> None:
        """An event of exactly max_event_bytes is split as any other."""
        event = b"data: " + b"x" * 92 + b"\n\n"
        self.assertEqual(SSESplitter(100).feed(event[:50] + event[50:]), [event])

    def test_unfinished_event_over_the_cap_is_refused(self) -> None:
        """Data that never reaches a blank line stops growing the buffer at the cap."""
        splitter = SSESplitter(100)
        self.assertEqual(splitter.feed(b"data: " + b"x" * 90), [])
        with self.assertRaises(EventTooLarge) as caught:
            splitter.feed(b"x" * 10)
        self.assertEqual(str(caught.exception), "SSE event over 100 bytes")

    def test_whole_event_over_the_cap_is_refused(self) -> None:
        """An event longer than the cap is refused even when it came whole in one chunk."""
        with self.assertRaises(EventTooLarge):
            SSESplitter(100).feed(b"data: ok\n\n" + b"data: " + b"x" * 100 + b"\n\n")

    @settings(max_examples=300, deadline=None)
    @given(events(), st.lists(st.integers(min_value=0), max_size=30))
    def test_any_split_of_well_formed_events(self, evs: list[bytes], offsets: list[int]) -> None:
        data = b"".join(evs)
        got, pending = split_all(cut(data, offsets))
        self.assertEqual(got, evs)
        self.assertEqual(pending, b"")

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(
            st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"data: x", b":"]),
            max_size=40,
        ).map(b"".join),
        st.lists(st.integers(min_value=0), max_size=30),
    )
    def test_any_split_of_any_bytes(self, data: bytes, offsets: list[int]) -> None:
        whole = SSESplitter()
        expected = whole.feed(data)
        expected_pending = whole.pending()
        splitter = SSESplitter()
        got: list[bytes] = []
        for chunk in cut(data, offsets):
            got.extend(splitter.feed(chunk))
        self.assertEqual(got, expected)
        self.assertEqual(splitter.pending(), expected_pending)
        self.assertEqual(b"".join(got) + splitter.pending(), data)
        got.extend(splitter.end())
        self.assertEqual(b"".join(got) + splitter.pending(), data)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from([b"\r", b"\n", b"\r\n", b"data: x", b"data:y", b"data", b": c", b"z"]),
            max_size=30,
        ).map(b"".join),
        st.lists(st.integers(min_value=0), max_size=10),
    )
    def test_data_agrees_with_openai_decoder(self, data: bytes, offsets: list[int]) -> None:
        # The SDK's own decoder is the reference for what a client will see.
        # With only data lines and comments it dispatches exactly the events
        # that have data.
        sdk = [sse.data for sse in SSEDecoder().iter_bytes(iter(cut(data, offsets)))]
        got, _ = split_all(cut(data, offsets))
        ours = [d.decode() for d in map(event_data, got) if d is not None]
        self.assertEqual(ours, sdk)


class EventDataTests(SynchronousTestCase):
    def test_single_line(self) -> None:
        self.assertEqual(event_data(b'data: {"a": 1}\n\n'), b'{"a": 1}')

    def test_no_space(self) -> None:
        self.assertEqual(event_data(b"data:x\n\n"), b"x")

    def test_only_one_space_removed(self) -> None:
        self.assertEqual(event_data(b"data:  x\n\n"), b" x")

    def test_multiple_lines_joined(self) -> None:
        self.assertEqual(event_data(b"data: a\r\ndata: b\r\ndata\r\n\r\n"), b"a\nb\n")

    def test_comments_and_fields_ignored(self) -> None:
        self.assertEqual(event_data(b": keep-alive\nevent: x\nid: 3\ndata: a\nretry: 5\n\n"), b"a")
        self.assertEqual(event_data(b"datax: no\ndata: yes\n\n"), b"yes")

    def test_no_data(self) -> None:
        self.assertIsNone(event_data(b": OPENROUTER PROCESSING\n\n"))
        self.assertIsNone(event_data(b"event: ping\n\n"))
        self.assertIsNone(event_data(b"\n"))

    def test_empty_data(self) -> None:
        self.assertEqual(event_data(b"data:\n\n"), b"")

    def test_cr_lines(self) -> None:
        self.assertEqual(event_data(b"data: a\rdata: b\r\r"), b"a\nb")


def chunk(content: str) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class ErrorEventTests(SynchronousTestCase):
    def test_shape(self) -> None:
        event = sse_error_event('upstream "a"\nwent away', code="stream_failed")
        self.assertTrue(event.startswith(b"event: error\ndata: "))
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(len(SSESplitter().feed(event)), 1)
        data = event_data(event)
        assert data is not None
        self.assertEqual(
            json.loads(data),
            {
                "error": {
                    "message": 'upstream "a"\nwent away',
                    "type": "upstream_error",
                    "code": "stream_failed",
                }
            },
        )

    def stream_through_sdk(self, body: bytes) -> Iterator[ChatCompletionChunk]:
        """Run a chat completion stream with this body through the installed SDK."""

        def handler(request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

        http_client = httpx2.Client(transport=httpx2.MockTransport(handler))
        self.addCleanup(http_client.close)
        client = openai.OpenAI(
            api_key="sk-test",
            base_url="http://upstream.test/v1",
            http_client=http_client,
        )
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        return iter(stream)

    def test_sdk_raises(self) -> None:
        body = (
            chunk("Hel")
            + chunk("lo")
            + sse_error_event("upstream went silent", code="stream_idle_timeout")
        )
        stream = self.stream_through_sdk(body)
        texts = [
            next(stream).choices[0].delta.content,
            next(stream).choices[0].delta.content,
        ]
        self.assertEqual(texts, ["Hel", "lo"])
        with self.assertRaises(openai.APIError) as caught:
            next(stream)
        self.assertEqual(caught.exception.message, "upstream went silent")
        self.assertEqual(caught.exception.code, "stream_idle_timeout")
        self.assertEqual(caught.exception.type, "upstream_error")

    def test_sdk_without_error_event_completes(self) -> None:
        # The control: the same stream without the error event ends quietly.
        stream = self.stream_through_sdk(chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n")
        self.assertEqual(len(list(stream)), 2)
