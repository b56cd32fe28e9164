"""Tests for oaproxy.sse: event splitting, event data, the error event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx2
import openai
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletionChunk
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.sse import EventTooLarge, SSESplitter, event_data, sse_error_event
from tests.payloads import FAKE_MODEL, HI, content_chunk, cut, sse


def split_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(splitter.feed(chunk))
    events.extend(splitter.end())
    return events, splitter.pending()


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
        """Events end at a blank line; what follows the last one waits, pending, for its end."""
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\n\ndata: b\n"), [b"data: a\n\n"])
        self.assertEqual(splitter.pending(), b"data: b\n")
        self.assertEqual(splitter.feed(b"\ndata: c"), [b"data: b\n\n"])
        self.assertEqual(splitter.pending(), b"data: c")

    def test_crlf_events(self) -> None:
        """CRLF-terminated events are split whole, their line ends kept."""
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\n\r\ndata: b\r\n\r\n"),
            [b"data: a\r\n\r\n", b"data: b\r\n\r\n"],
        )
        self.assertEqual(splitter.pending(), b"")

    def test_crlf_is_not_a_blank_line(self) -> None:
        """A CRLF is one line end, not CR then LF: it does not end an event on its own."""
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\ndata: b\r\n"), [])
        self.assertEqual(splitter.feed(b"\r\n"), [b"data: a\r\ndata: b\r\n\r\n"])

    def test_cr_events(self) -> None:
        """Bare CR line ends split events too."""
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\rdata: b\r\rx"), [b"data: a\r\r", b"data: b\r\r"]
        )

    def test_trailing_cr_waits_for_next_byte(self) -> None:
        """A CR at the end of what arrived may be half a CRLF, so the event
        waits for the next byte to know where it ends."""
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\n\r"), [])
        self.assertEqual(splitter.feed(b"\n"), [b"data: a\r\n\r\n"])
        self.assertEqual(splitter.feed(b"data: b\r\r"), [])
        self.assertEqual(splitter.feed(b"d"), [b"data: b\r\r"])
        self.assertEqual(splitter.pending(), b"d")

    def test_end_releases_cr_terminated_event(self) -> None:
        """At the end of the stream an event held back for its trailing CR is released."""
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\r\r"), [])
        self.assertEqual(splitter.end(), [b"data: a\r\r"])
        self.assertEqual(splitter.pending(), b"")

    def test_end_keeps_unterminated_tail(self) -> None:
        """At the end of the stream an unterminated tail is no event; it stays pending."""
        splitter = SSESplitter()
        splitter.feed(b"data: a\n")
        self.assertEqual(splitter.end(), [])
        self.assertEqual(splitter.pending(), b"data: a\n")

    def test_mixed_line_ends(self) -> None:
        """LF, CRLF and CR line ends may be mixed within and between events."""
        splitter = SSESplitter()
        self.assertEqual(
            splitter.feed(b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n"),
            [b"data: a\r\n\n", b"data: b\n\r\n", b"data: c\r\r\n"],
        )

    def test_leading_blank_line_is_its_own_event(self) -> None:
        """A blank line with nothing before it is an event of its own, not swallowed."""
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"\ndata: a\n\n\r\n"), [b"\n", b"data: a\n\n", b"\r\n"])

    def test_a_read_of_one_whole_event_is_not_copied(self) -> None:
        """With nothing pending, a read that is one whole event comes back
        as it is; a read that ends inside an event leaves that part pending
        and the next read completes it."""
        splitter = SSESplitter()
        event = b'data: {"x": 1}\n\n'
        self.assertIs(splitter.feed(event)[0], event)
        self.assertEqual(splitter.feed(event + b"data: y"), [event])
        self.assertEqual(splitter.pending(), b"data: y")
        self.assertEqual(splitter.feed(b"\n\n" + event), [b"data: y\n\n", event])
        self.assertEqual(splitter.pending(), b"")

    def test_byte_at_a_time(self) -> None:
        """Fed one byte at a time, the splitter finds every event and loses no byte."""
        data = b"".join(b'data: {"i": %d}\r\n\r\n' % i for i in range(200)) + b": tail"
        splitter = SSESplitter()
        got: list[bytes] = []
        for i in range(len(data)):
            got.extend(splitter.feed(data[i : i + 1]))
        self.assertEqual(len(got), 200)
        self.assertEqual(b"".join(got) + splitter.pending(), data)

    def test_many_small_chunks_stay_linear(self) -> None:
        """One long event fed in tiny pieces costs linear time: each feed
        searches only the new bytes."""
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

    def test_a_read_of_one_line_event(self) -> None:
        """A read that is one line and a blank line is that one event (the
        cap still holds, a CR or a leading blank line still split it), and
        the next read starts afresh."""
        event = b"data: " + b"x" * 92 + b"\n\n"
        self.assertIs(SSESplitter(100).feed(event)[0], event)
        with self.assertRaises(EventTooLarge):
            SSESplitter(99).feed(event)
        self.assertEqual(SSESplitter().feed(b"\n\n"), [b"\n", b"\n"])
        self.assertEqual(SSESplitter().feed(b"data: a\r\n\n"), [b"data: a\r\n\n"])
        self.assertEqual(SSESplitter().feed(b"data: a\r\n"), [])
        splitter = SSESplitter()
        self.assertEqual(splitter.feed(b"data: a\n\n"), [b"data: a\n\n"])
        self.assertEqual(splitter.feed(b"data: b\n"), [])
        self.assertEqual(splitter.feed(b"\n"), [b"data: b\n\n"])

    @settings(max_examples=300, deadline=None)
    @given(events(), st.lists(st.integers(min_value=0), max_size=30))
    def test_any_split_of_well_formed_events(self, evs: list[bytes], offsets: list[int]) -> None:
        """However well-formed events are cut into pieces, the splitter gives
        back exactly those events and nothing pending."""
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
        """However any bytes are cut, the events and pending tail are those of
        feeding them whole, and every byte is accounted for, before and after
        the end."""
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
        """For data lines and comments the data of our events is what the openai
        SDK's own decoder dispatches, however the bytes are cut."""
        sdk = [event.data for event in SSEDecoder().iter_bytes(iter(cut(data, offsets)))]
        got, _ = split_all(cut(data, offsets))
        ours = [d.decode() for d in map(event_data, got) if d is not None]
        self.assertEqual(ours, sdk)


class EventDataTests(SynchronousTestCase):
    def test_single_line(self) -> None:
        """The data of a one-line event is its value after 'data: '."""
        self.assertEqual(event_data(b'data: {"a": 1}\n\n'), b'{"a": 1}')

    def test_no_space(self) -> None:
        """A data line without a space after the colon still has its value."""
        self.assertEqual(event_data(b"data:x\n\n"), b"x")

    def test_only_one_space_removed(self) -> None:
        """Only the first space after the colon is removed."""
        self.assertEqual(event_data(b"data:  x\n\n"), b" x")

    def test_multiple_lines_joined(self) -> None:
        """Several data lines are joined with LF, a bare 'data' line giving an empty one."""
        self.assertEqual(event_data(b"data: a\r\ndata: b\r\ndata\r\n\r\n"), b"a\nb\n")

    def test_comments_and_fields_ignored(self) -> None:
        """Comments, other fields, and fields whose name only starts with 'data' are no data."""
        self.assertEqual(event_data(b": keep-alive\nevent: x\nid: 3\ndata: a\nretry: 5\n\n"), b"a")
        self.assertEqual(event_data(b"datax: no\ndata: yes\n\n"), b"yes")

    def test_no_data(self) -> None:
        """An event with no data line, a comment or a lone blank line, has no data (None)."""
        self.assertIsNone(event_data(b": OPENROUTER PROCESSING\n\n"))
        self.assertIsNone(event_data(b"event: ping\n\n"))
        self.assertIsNone(event_data(b"\n"))

    def test_empty_data(self) -> None:
        """An empty data line is empty data, not none."""
        self.assertEqual(event_data(b"data:\n\n"), b"")

    def test_cr_lines(self) -> None:
        """Data lines ended by bare CRs are joined like any others."""
        self.assertEqual(event_data(b"data: a\rdata: b\r\r"), b"a\nb")


class ErrorEventTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """The error event is one 'event: error' event whose data is OpenAI's
        error object, message kept whole."""
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
            model=FAKE_MODEL,
            messages=HI,
            stream=True,
        )
        return iter(stream)

    def test_sdk_raises(self) -> None:
        """The openai SDK reads the chunks before an error event and then raises
        APIError with its message, code and type."""
        body = sse(content_chunk("Hel"), content_chunk("lo")) + sse_error_event(
            "upstream went silent", code="stream_idle_timeout"
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
        """The control: the same stream without the error event ends quietly in the SDK."""
        stream = self.stream_through_sdk(sse(content_chunk("Hel"), content_chunk("lo"), "[DONE]"))
        self.assertEqual(len(list(stream)), 2)
