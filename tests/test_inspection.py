"""Tests for oaproxy.inspection: what routing reads from a request body."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.inspection import request_fields, with_stream_usage


class RequestFieldsTests(SynchronousTestCase):
    def test_chat_request(self) -> None:
        """A chat body gives its model, stream flag and include_usage, and keeps
        the parsed document."""
        body = b'{"model": "gpt-4o-mini", "messages": [], "stream": true, "stream_options": {"include_usage": true}}'
        fields = request_fields(body, "application/json; charset=utf-8")
        self.assertEqual(fields.model, "gpt-4o-mini")
        self.assertTrue(fields.stream)
        self.assertTrue(fields.include_usage)
        assert fields.parsed is not None
        self.assertEqual(fields.parsed["messages"], [])

    def test_defaults(self) -> None:
        """Without stream_options, and with a stream flag that is not true, the
        request is no stream and asks no usage."""
        fields = request_fields(b'{"model": "m", "stream": "yes"}', "application/json")
        self.assertEqual((fields.model, fields.stream, fields.include_usage), ("m", False, False))

    def test_json_without_content_type(self) -> None:
        """A body that looks like JSON is read as JSON whatever its content type
        says, leading blanks allowed."""
        self.assertEqual(request_fields(b'  \n{"model": "m"}', None).model, "m")
        self.assertEqual(request_fields(b'{"model": "m"}', "text/plain").model, "m")

    def test_not_json(self) -> None:
        """A body that is not JSON gives neither model nor parsed document."""
        fields = request_fields(b"--b\r\n", "multipart/form-data; boundary=b")
        self.assertIsNone(fields.model)
        self.assertIsNone(fields.parsed)
        self.assertIsNone(request_fields(b"abc", None).model)

    def test_invalid_json(self) -> None:
        """Broken JSON, a JSON array, undecodable bytes and absurd nesting give
        nothing, never an exception."""
        for body in (b"{", b'{"model": ', b"[1]", b"\xff\xfe{", b"[" * 100000):
            fields = request_fields(body, "application/json")
            self.assertEqual((fields.model, fields.parsed), (None, None))

    def test_model_not_a_string(self) -> None:
        """A model that is not a string is no model."""
        self.assertIsNone(request_fields(b'{"model": 4}', "application/json").model)

    def test_parsed_not_compared(self) -> None:
        """Two requests with the same fields are equal whatever else their bodies hold."""
        self.assertEqual(
            request_fields(b'{"model": "m", "x": 1}', None),
            request_fields(b'{"model": "m"}', None),
        )


class WithStreamUsageTests(SynchronousTestCase):
    def test_adds_include_usage(self) -> None:
        """The body sent on has stream_options.include_usage added, as compact
        JSON with non-ASCII text unescaped; the parsed request is left
        unchanged."""
        parsed = request_fields(
            '{"model": "m", "stream": true, "messages": [{"content": "é"}]}'.encode(),
            None,
        ).parsed
        assert parsed is not None
        body = with_stream_usage(parsed)
        self.assertNotIn(b" ", body)
        self.assertIn("é".encode(), body)
        self.assertEqual(
            json.loads(body),
            {
                "model": "m",
                "stream": True,
                "messages": [{"content": "é"}],
                "stream_options": {"include_usage": True},
            },
        )
        self.assertNotIn("stream_options", parsed)

    def test_keeps_other_stream_options(self) -> None:
        """Other stream_options are kept and include_usage turned on, without
        changing the client's document."""
        parsed = {"stream_options": {"include_obfuscation": False, "include_usage": False}}
        self.assertEqual(
            json.loads(with_stream_usage(parsed))["stream_options"],
            {"include_obfuscation": False, "include_usage": True},
        )
        self.assertEqual(parsed["stream_options"]["include_usage"], False)

    def test_lone_surrogate(self) -> None:
        """A lone surrogate in the client's JSON survives being written again."""
        parsed = json.loads('{"content": "\\ud800"}')
        self.assertEqual(json.loads(with_stream_usage(parsed))["content"], "\ud800")
