"""Tests for oaproxy.capture and oaproxy.multipart: stream reassembly, records' bodies."""

from __future__ import annotations

import json

import httpx2
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oaproxy import capture
from oaproxy.capture import (
    CapturedResponse,
    StreamCapture,
    capture_json_response,
    cost,
    describe_body,
    truncate_text,
)
from oaproxy.config import Price
from oaproxy.multipart import MULTIPART_MAX_FIELDS
from oaproxy.record import Usage
from oaproxy.sse import SSESplitter, event_data
from tests.payloads import chunk_data, compact, multipart, usage_chunk

#: The usage-only chunk that ends a stream asked with include_usage.
USAGE_CHUNK = compact(
    usage_chunk(
        {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
    )
)


def feed_all(capture: StreamCapture, chunks: list[bytes]) -> list[bool]:
    return [capture.feed(c) for c in chunks]


class StreamCaptureTests(SynchronousTestCase):
    def test_content_finish_and_usage(self) -> None:
        """A chat stream is reassembled into its text, finish reason and usage;
        only the usage-only chunk is flagged as one to hide."""
        capture = StreamCapture(max_bytes=1000)
        flags = feed_all(
            capture,
            [
                chunk_data({"role": "assistant", "content": "", "refusal": None}),
                chunk_data({"content": "Hello"}),
                chunk_data({"content": ", wörld"}),
                chunk_data({}, finish="stop"),
                USAGE_CHUNK,
                b"[DONE]",
            ],
        )
        self.assertEqual(flags, [False, False, False, False, True, False])
        result = capture.result()
        self.assertEqual(result.text, "Hello, wörld")
        self.assertEqual(result.finish_reason, "stop")
        self.assertEqual(
            result.usage,
            Usage(prompt_tokens=12, completion_tokens=7, total_tokens=19),
        )
        self.assertIsNone(result.tool_calls)
        self.assertIsNone(result.refusal)
        self.assertEqual(result.truncated, ())

    def test_through_splitter(self) -> None:
        """On the relay's path (bytes, events, data, capture) in 7-byte pieces,
        the text is reassembled and exactly one event, the usage chunk, is
        hidden."""
        stream = b"".join(
            b"data: " + c + b"\r\n\r\n"
            for c in [
                chunk_data({"content": "a"}),
                chunk_data({"content": "b"}),
                USAGE_CHUNK,
                b"[DONE]",
            ]
        )
        splitter = SSESplitter()
        capture = StreamCapture(max_bytes=100)
        hidden = []
        for i in range(0, len(stream), 7):
            for event in splitter.feed(stream[i : i + 7]):
                if capture.feed(event_data(event)):
                    hidden.append(event)
        self.assertEqual(capture.result().text, "ab")
        self.assertEqual(len(hidden), 1)
        self.assertIn(b'"choices":[]', hidden[0])

    def test_usage_on_last_content_chunk_is_not_usage_only(self) -> None:
        """Usage that rides on a content chunk is kept but that chunk is not hidden."""
        capture = StreamCapture(max_bytes=100)
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        self.assertFalse(capture.feed(chunk_data({"content": "x"}, finish="stop", usage=usage)))
        self.assertFalse(capture.feed(chunk_data({"content": "y"}, usage=None)))
        self.assertEqual(capture.result().usage, Usage(1, 2, 3))

    def test_tool_calls_over_many_chunks(self) -> None:
        """Two tool calls streamed in pieces are reassembled by index into whole
        calls with their ids, names and arguments; there is no text."""
        chunks = [
            chunk_data({"role": "assistant", "content": None}),
            chunk_data(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
        ]
        chunks += [
            chunk_data({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in ['{"lo', 'cation"', ': "Par', 'is"}']
        ]
        chunks.append(
            chunk_data(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": ""},
                        }
                    ]
                }
            )
        )
        chunks += [
            chunk_data({"tool_calls": [{"index": 1, "function": {"arguments": piece}}]})
            for piece in ['{"tz"', ': "Europe/', 'Paris"}']
        ]
        chunks += [chunk_data({}, finish="tool_calls"), b"[DONE]"]
        capture = StreamCapture(max_bytes=1000)
        feed_all(capture, chunks)
        result = capture.result()
        self.assertIsNone(result.text)
        self.assertEqual(result.finish_reason, "tool_calls")
        self.assertEqual(
            result.tool_calls,
            [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"location": "Paris"}',
                    },
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {
                        "name": "get_time",
                        "arguments": '{"tz": "Europe/Paris"}',
                    },
                },
            ],
        )

    def test_tool_calls_interleaved_in_one_chunk(self) -> None:
        """Pieces of two tool calls in one chunk, in either order, go to the call of their index."""
        capture = StreamCapture(max_bytes=1000)
        capture.feed(
            chunk_data(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{"},
                        },
                        {
                            "index": 1,
                            "id": "b",
                            "type": "function",
                            "function": {"name": "g", "arguments": "["},
                        },
                    ]
                }
            )
        )
        capture.feed(
            chunk_data(
                {
                    "tool_calls": [
                        {"index": 1, "function": {"arguments": "]"}},
                        {"index": 0, "function": {"name": "f", "arguments": "}"}},
                    ]
                }
            )
        )
        calls = capture.result().tool_calls
        assert calls is not None
        self.assertEqual(
            [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls],
            [
                ("a", "f", "{}"),
                ("b", "g", "[]"),
            ],
        )

    def test_tool_calls_without_index(self) -> None:
        """Tool calls without an index (as some OpenAI-compatible servers send
        whole calls) are told apart by their ids; a piece without id continues
        the last call."""
        capture = StreamCapture(max_bytes=1000)
        capture.feed(
            chunk_data({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]})
        )
        capture.feed(
            chunk_data({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{"}}]})
        )
        capture.feed(chunk_data({"tool_calls": [{"function": {"arguments": "}"}}]}))
        calls = capture.result().tool_calls
        assert calls is not None
        self.assertEqual(
            [(c["id"], c["function"]["arguments"]) for c in calls],
            [("a", "{}"), ("b", "{}")],
        )

    def test_legacy_function_call(self) -> None:
        """A legacy function_call stream is captured as one tool call without id."""
        capture = StreamCapture(max_bytes=1000)
        capture.feed(
            chunk_data({"role": "assistant", "function_call": {"name": "f", "arguments": ""}})
        )
        capture.feed(chunk_data({"function_call": {"arguments": '{"a":'}}))
        capture.feed(chunk_data({"function_call": {"arguments": "1}"}}, finish="function_call"))
        result = capture.result()
        self.assertEqual(
            result.tool_calls,
            [
                {
                    "id": None,
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1}'},
                }
            ],
        )
        self.assertEqual(result.finish_reason, "function_call")

    def test_refusal(self) -> None:
        """A streamed refusal is reassembled apart from the text, which stays None."""
        capture = StreamCapture(max_bytes=1000)
        feed_all(
            capture,
            [
                chunk_data({"role": "assistant", "content": None, "refusal": ""}),
                chunk_data({"refusal": "I'm sorry, "}),
                chunk_data({"refusal": "I can't help with that."}),
                chunk_data({}, finish="stop"),
            ],
        )
        result = capture.result()
        self.assertIsNone(result.text)
        self.assertEqual(result.refusal, "I'm sorry, I can't help with that.")

    def test_two_choices(self) -> None:
        """Two choices are reassembled apart, by index, and the text joins them in index order."""
        capture = StreamCapture(max_bytes=1000)
        feed_all(
            capture,
            [
                chunk_data({"role": "assistant", "content": ""}, index=0),
                chunk_data({"role": "assistant", "content": ""}, index=1),
                chunk_data({"content": "Red"}, index=0),
                chunk_data({"content": "Blue"}, index=1),
                chunk_data({"content": " sky"}, index=1),
                chunk_data({}, index=1, finish="length"),
                chunk_data({"content": " apple"}, index=0),
                chunk_data({}, index=0, finish="stop"),
            ],
        )
        result = capture.result()
        self.assertEqual(result.texts, ("Red apple", "Blue sky"))
        self.assertEqual(result.text, "Red apple\n\nBlue sky")
        self.assertEqual(result.finish_reason, "stop")

    def test_legacy_completions(self) -> None:
        """A legacy completions stream (choices with text) is reassembled too."""
        capture = StreamCapture(max_bytes=1000)
        for text, finish in (("Once", None), (" upon", None), (" a time", "length")):
            body = {
                "object": "text_completion",
                "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            }
            capture.feed(json.dumps(body).encode())
        result = capture.result()
        self.assertEqual((result.text, result.finish_reason), ("Once upon a time", "length"))

    def test_responses_api_stream(self) -> None:
        """A Responses API stream gives its text from the output_text deltas,
        its status and its usage."""
        capture = StreamCapture(max_bytes=1000)
        capture.feed(b'{"type": "response.created", "response": {"status": "in_progress"}}')
        capture.feed(b'{"type": "response.output_text.delta", "delta": "Hi"}')
        capture.feed(b'{"type": "response.output_text.delta", "delta": " there"}')
        capture.feed(
            b'{"type": "response.completed", "response": {"status": "completed", '
            b'"usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}}'
        )
        result = capture.result()
        self.assertEqual(result.text, "Hi there")
        self.assertEqual(result.finish_reason, "completed")
        self.assertEqual(
            result.usage,
            Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        )

    def test_error_chunk(self) -> None:
        """An error chunk mid-stream is captured as the error, beside the text so far."""
        capture = StreamCapture(max_bytes=1000)
        capture.feed(chunk_data({"content": "a"}))
        self.assertFalse(
            capture.feed(b'{"error": {"message": "overloaded", "type": "server_error"}}')
        )
        self.assertEqual(capture.result().error, {"message": "overloaded", "type": "server_error"})
        self.assertEqual(capture.result().text, "a")

    def test_ignores_junk(self) -> None:
        """Data that is no chunk (None, empty, [DONE], not JSON, odd shapes) is
        ignored and never raises."""
        capture = StreamCapture(max_bytes=1000)
        for data in (
            None,
            b"",
            b"[DONE]",
            b"not json",
            b"[1, 2]",
            b'{"choices": "x"}',
            b'{"choices": [3]}',
        ):
            self.assertFalse(capture.feed(data))
        self.assertEqual(capture.result(), CapturedResponse())

    def test_text_capped_at_multibyte_boundary(self) -> None:
        """The captured text stops at max_bytes, never inside a character, and
        says it was truncated."""
        capture = StreamCapture(max_bytes=10)
        feed_all(
            capture,
            [
                chunk_data({"content": "abcd"}),
                chunk_data({"content": "éééé"}),
                chunk_data({"content": "z"}),
            ],
        )
        result = capture.result()
        self.assertEqual(result.text, "abcdééé")
        self.assertEqual(len(result.text.encode()), 10)  # type: ignore[union-attr]
        self.assertEqual(result.truncated, ("response_text",))

    def test_tool_arguments_capped(self) -> None:
        """Tool call arguments are capped at max_bytes too, and say so."""
        capture = StreamCapture(max_bytes=5)
        capture.feed(
            chunk_data(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "a",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ]
                }
            )
        )
        capture.feed(
            chunk_data({"tool_calls": [{"index": 0, "function": {"arguments": "0123456789"}}]})
        )
        result = capture.result()
        assert result.tool_calls is not None
        self.assertEqual(result.tool_calls[0]["function"]["arguments"], "{}012")
        self.assertEqual(result.truncated, ("tool_calls",))

    def test_huge_stream_memory_bounded(self) -> None:
        """A thousand chunks keep memory bounded: the text is capped and the
        assembler holds only the pieces that fit."""
        capture = StreamCapture(max_bytes=1000)
        piece = chunk_data({"content": "x" * 100})
        for _ in range(1000):
            capture.feed(piece)
        result = capture.result()
        self.assertEqual(len(result.text or ""), 1000)
        # What it holds is the 1,000 characters that fit, not every piece.
        held = capture._assembler.choices[0].text
        assert held is not None
        self.assertEqual(len(held.joined()), 1000)


class CaptureJsonResponseTests(SynchronousTestCase):
    def test_chat_completion(self) -> None:
        """A chat completion's tool calls, finish reason and usage are captured; it has no text."""
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "refusal": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"x":1}'},
                            },
                            {
                                "id": "call_2",
                                "type": "function",
                                "function": {"name": "g", "arguments": "{}"},
                            },
                        ],
                    },
                    "logprobs": None,
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
        }
        result = capture_json_response(json.dumps(body).encode(), 1000)
        self.assertIsNone(result.text)
        self.assertEqual(result.tool_calls, body["choices"][0]["message"]["tool_calls"])  # type: ignore[index]
        self.assertEqual(result.finish_reason, "tool_calls")
        self.assertEqual(result.usage, Usage(50, 20, 70))

    def test_chat_text_and_refusal(self) -> None:
        """Each choice's text is kept in order; the text is the first, and a
        refusal is captured apart."""
        body = {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Bonjour"},
                    "finish_reason": "stop",
                },
                {
                    "index": 1,
                    "message": {"role": "assistant", "content": None, "refusal": "No."},
                    "finish_reason": "stop",
                },
            ],
        }
        result = capture_json_response(json.dumps(body).encode(), 1000)
        self.assertEqual(result.texts, ("Bonjour", None))
        self.assertEqual(result.text, "Bonjour")
        self.assertEqual(result.refusal, "No.")

    def test_truncated(self) -> None:
        """A long answer's text is cut at the limit and marked truncated."""
        body = {
            "choices": [{"index": 0, "message": {"content": "x" * 100}, "finish_reason": "stop"}]
        }
        result = capture_json_response(json.dumps(body).encode(), 10)
        self.assertEqual(result.text, "x" * 10)
        self.assertEqual(result.truncated, ("response_text",))

    def test_completion(self) -> None:
        """A legacy completion's text and finish reason are captured."""
        body = {
            "object": "text_completion",
            "choices": [
                {
                    "text": "\n\nThis is a test",
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
        result = capture_json_response(json.dumps(body).encode(), 1000)
        self.assertEqual((result.text, result.finish_reason), ("\n\nThis is a test", "length"))

    def test_embeddings(self) -> None:
        """Embeddings have no text; their usage has no completion tokens."""
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
        result = capture_json_response(json.dumps(body).encode(), 1000)
        self.assertIsNone(result.text)
        self.assertEqual(
            result.usage,
            Usage(prompt_tokens=8, completion_tokens=0, total_tokens=8),
        )

    def test_responses_api(self) -> None:
        """A Responses API answer gives its output text, its function calls as
        tool calls and its usage."""
        body = {
            "object": "response",
            "status": "completed",
            "error": None,
            "output": [
                {"type": "reasoning", "summary": []},
                {
                    "type": "message",
                    "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "f",
                    "arguments": "{}",
                },
            ],
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        }
        result = capture_json_response(json.dumps(body).encode(), 1000)
        self.assertEqual(result.text, "Hi")
        self.assertEqual(
            result.tool_calls,
            [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": "{}"},
                }
            ],
        )
        self.assertEqual(
            result.usage,
            Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        )
        self.assertIsNone(result.error)

    def test_error(self) -> None:
        """An error answer is kept as compact JSON text, cut at the limit, and
        its error object captured."""
        body = b'{\n  "error": {\n    "message": "Rate limit reached",\n    "type": "requests",\n    "code": "rate_limit_exceeded"\n  }\n}'
        result = capture_json_response(body, 1000)
        self.assertEqual(
            result.text,
            '{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}',
        )
        assert result.error is not None
        self.assertEqual(result.error["code"], "rate_limit_exceeded")
        short = capture_json_response(body, 12)
        self.assertEqual((short.text, short.truncated), ('{"error":{"m', ("response_text",)))

    def test_not_json(self) -> None:
        """A body that is not JSON, or empty, captures nothing."""
        self.assertEqual(
            capture_json_response(b"<html>502 Bad Gateway</html>", 1000),
            CapturedResponse(),
        )
        self.assertIsNone(capture_json_response(b"", 1000).text)


AUDIO = b"RIFF\x00\x01\xff\xfe\r\n--notboundary\r\n\r" + bytes(range(256)) * 4


def multipart_body() -> tuple[bytes, str]:
    """A transcription upload encoded by httpx2, as the openai SDK sends it."""
    request = httpx2.Request(
        "POST",
        "http://upstream.test/v1/audio/transcriptions",
        data={"model": "whisper-1", "language": "fr"},
        files={"file": ("a;b.wav", AUDIO, "audio/wav")},
    )
    return request.read(), request.headers["content-type"]


class PlainChoiceTests(SynchronousTestCase):
    def test_one_plain_choice_is_kept_as_the_assembler_keeps_it(self) -> None:
        """An answer of one choice of plain text, taken without the
        assembler, is captured as the assembler captures it: cut or not,
        empty, absent, with or without a finish reason or usage."""
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        choices: list[dict[str, object]] = [
            {"index": 0, "message": {"role": "assistant", "content": "Hello! " * 20}},
            {"message": {"content": "héllo wörld " * 9}, "finish_reason": "length"},
            {"message": {"content": ""}, "finish_reason": "stop"},
            {"message": {"content": None, "refusal": None}, "finish_reason": 3},
            {"index": 2, "message": {"role": "assistant"}, "finish_reason": "stop"},
            {"message": {"content": "\ud800 lone", "tool_calls": None}},
            {"message": {"content": "x", "tool_calls": []}},
            {"message": {"content": ["part"]}},
            {"message": "text"},
            {"text": "legacy"},
        ]
        answers = [
            {"choices": [choice], **extra}
            for choice in choices
            for extra in ({}, {"usage": usage}, {"usage": "nonsense"})
        ]
        for max_bytes in (0, 1, 5, 64, 1000):
            for answer in answers:
                quick = capture.capture_json_document(answer, max_bytes)
                assembler = self.patch(capture, "_plain", lambda choice: False)
                assembled = capture.capture_json_document(answer, max_bytes)
                assembler.restore()
                self.assertEqual(quick, assembled, (answer, max_bytes))

    def test_a_plain_choice_needs_no_assembler(self) -> None:
        """The common answer is kept without building an assembler."""

        def refuse(max_bytes: int) -> None:
            raise AssertionError("an assembler was made")

        self.patch(capture, "_Assembler", refuse)
        answer = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
        self.assertEqual(capture.capture_json_document(answer, 100).text, "hi")


class DescribeBodyTests(SynchronousTestCase):
    def test_json(self) -> None:
        """A JSON body is kept as its text."""
        self.assertEqual(
            describe_body(b'{"model": "m"}', "application/json", 100),
            ('{"model": "m"}', False),
        )

    def test_text_truncated_at_boundary(self) -> None:
        """A text body is cut at the limit, never inside a character, and marked truncated."""
        body = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
        self.assertEqual(describe_body(body, "application/json", 6), ("aé€", True))
        self.assertEqual(describe_body(body, "text/plain", 5), ("aé", True))
        self.assertEqual(describe_body(body, "text/plain", 10), ("aé€😀", False))

    def test_invalid_utf8_replaced(self) -> None:
        """Invalid UTF-8 in a text body is replaced, not refused."""
        self.assertEqual(describe_body(b"a\xffb", "text/plain", 10), ("a\ufffdb", False))

    def test_empty(self) -> None:
        """An empty body is described as nothing."""
        self.assertEqual(describe_body(b"", "application/json", 10), (None, False))

    def test_no_content_type(self) -> None:
        """Without a content type, text is kept and binary is described by its size."""
        self.assertEqual(describe_body(b"hello", None, 10), ("hello", False))
        self.assertEqual(
            describe_body(b"\x00\xff\xfe", None, 10),
            ({"content_type": None, "size": 3}, False),
        )

    def test_binary(self) -> None:
        """A binary body is described by its type and size, never kept."""
        self.assertEqual(
            describe_body(b"\x89PNG....", "image/png", 10),
            ({"content_type": "image/png", "size": 8}, False),
        )

    def test_multipart_from_httpx(self) -> None:
        """An upload as httpx encodes it is described by its fields: values of
        the small ones, file name, type and size of the file, and none of the
        file's bytes."""
        body, content_type = multipart_body()
        described, truncated = describe_body(body, content_type, 100)
        self.assertFalse(truncated)
        self.assertEqual(
            described,
            {
                "content_type": "multipart/form-data",
                "size": len(body),
                "fields": [
                    {"name": "model", "value": "whisper-1"},
                    {"name": "language", "value": "fr"},
                    {
                        "name": "file",
                        "filename": "a;b.wav",
                        "content_type": "audio/wav",
                        "size": len(AUDIO),
                    },
                ],
            },
        )
        self.assertNotIn("RIFF", json.dumps(described))

    def test_multipart_by_hand(self) -> None:
        """A hand-made form is described field by field: long values by their
        size only, RFC 5987 file names decoded."""
        boundary = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
        body = multipart(
            boundary,
            [
                (
                    b'Content-Disposition: form-data; name="file"; filename="speech.mp3"\r\nContent-Type: audio/mpeg',
                    b"\xff\xfb\x90\x00" * 1000,
                ),
                (b'Content-Disposition: form-data; name="model"', b"whisper-1"),
                (b'Content-Disposition: form-data; name="prompt"', b"p" * 2000),
                (
                    b"Content-Disposition: form-data; name=\"f2\"; filename*=UTF-8''%E9t%C3%A9.wav",
                    b"x",
                ),
            ],
        )
        described, _ = describe_body(
            body, "multipart/form-data; boundary=" + boundary.decode(), 100
        )
        assert isinstance(described, dict)
        self.assertEqual(
            described["fields"],
            [
                {
                    "name": "file",
                    "filename": "speech.mp3",
                    "content_type": "audio/mpeg",
                    "size": 4000,
                },
                {"name": "model", "value": "whisper-1"},
                {"name": "prompt", "size": 2000},
                {"name": "f2", "filename": "\ufffdt\u00e9.wav", "size": 1},
            ],
        )

    def test_multipart_too_many_fields(self) -> None:
        """A form with too many fields is described up to the cap and marked truncated."""
        parts = [
            (b'Content-Disposition: form-data; name="f%d"' % i, b"v")
            for i in range(MULTIPART_MAX_FIELDS + 5)
        ]
        described, truncated = describe_body(
            multipart(b"xyz", parts), "multipart/form-data; boundary=xyz", 10
        )
        assert isinstance(described, dict)
        self.assertEqual(len(described["fields"]), MULTIPART_MAX_FIELDS)
        self.assertTrue(truncated)

    def test_multipart_malformed(self) -> None:
        """A malformed form falls back to its type and size; one without a close
        delimiter runs its last part to the end."""
        fallback = {"content_type": "multipart/form-data", "size": 7}
        self.assertEqual(describe_body(b"garbage", "multipart/form-data", 10), (fallback, False))
        self.assertEqual(
            describe_body(b"garbage", "multipart/form-data; boundary=q", 10),
            (fallback, False),
        )
        self.assertEqual(
            describe_body(b"garbage", "multipart/form-data; boundary=é€", 10),
            (fallback, False),
        )
        # No close delimiter: the last part runs to the end.
        described, _ = describe_body(
            b'--q\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue',
            "multipart/form-data; boundary=q",
            10,
        )
        self.assertEqual(
            described,
            {
                "content_type": "multipart/form-data",
                "size": 54,
                "fields": [{"name": "a", "value": "value"}],
            },
        )

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"--q",
                    b"\r\n",
                    b"\n",
                    b"Content-Disposition: form-data",
                    b'; name="',
                    b"filename=",
                    b'"',
                    b";",
                    b"\xff",
                    b"--",
                    b"Content-Type:",
                    b"x",
                ]
            ),
            max_size=40,
        ).map(b"".join)
    )
    def test_multipart_never_raises(self, body: bytes) -> None:
        """Any bytes under a multipart content type give a JSON-serialisable
        description, never an exception."""
        described, _ = describe_body(body, 'multipart/form-data; boundary="q"', 10)
        self.assertIsInstance(described, (dict, type(None)))
        json.dumps(described)


class CostTests(SynchronousTestCase):
    def test_cost(self) -> None:
        """Cost is the prompt and completion tokens at their per-million prices."""
        usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000, total_tokens=1_500_000)
        self.assertAlmostEqual(cost(usage, Price(input=0.15, output=0.6)), 0.45)

    def test_unknown(self) -> None:
        """Without usage or without a price, the cost is unknown (None)."""
        self.assertIsNone(cost(None, Price(1, 1)))
        self.assertIsNone(cost(Usage(1, 0, 1), None))

    def test_partial_usage(self) -> None:
        """Usage without completion tokens is priced on its prompt alone."""
        self.assertAlmostEqual(cost(Usage(2000, 0, 2000), Price(2.0, 8.0)), 0.004)


class TruncateTextTests(SynchronousTestCase):
    def test_short(self) -> None:
        """Text within the limit is kept whole and not marked truncated."""
        self.assertEqual(truncate_text("abc", 3), ("abc", False))
        self.assertEqual(truncate_text("é" * 10, 20), ("é" * 10, False))

    def test_ascii(self) -> None:
        """ASCII text is cut at exactly the limit."""
        self.assertEqual(truncate_text("abcdef", 4), ("abcd", True))

    def test_multibyte_boundary(self) -> None:
        """Text is cut at the last whole character within the limit, however
        many bytes its characters take."""
        text = "a€😀b"  # 1 + 3 + 4 + 1 bytes
        self.assertEqual(truncate_text(text, 1), ("a", True))
        self.assertEqual(truncate_text(text, 2), ("a", True))
        self.assertEqual(truncate_text(text, 3), ("a", True))
        self.assertEqual(truncate_text(text, 4), ("a€", True))
        self.assertEqual(truncate_text(text, 7), ("a€", True))
        self.assertEqual(truncate_text(text, 8), ("a€😀", True))
        self.assertEqual(truncate_text(text, 9), (text, False))
        self.assertEqual(truncate_text(text, 0), ("", True))

    @given(st.text(), st.integers(min_value=0, max_value=40))
    def test_property(self, text: str, limit: int) -> None:
        """For any text and limit, the kept part is the longest prefix that
        fits, and it is marked truncated exactly when it is shorter."""
        cut, truncated = truncate_text(text, limit)
        self.assertTrue(text.startswith(cut))
        size = len(cut.encode("utf-8", "surrogatepass"))
        self.assertLessEqual(size, limit)
        self.assertEqual(truncated, cut != text)
        if truncated:
            # The next character would not have fit.
            self.assertGreater(size + len(text[len(cut)].encode("utf-8", "surrogatepass")), limit)
