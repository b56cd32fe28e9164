"""Tests for oaproxy.inspection and oaproxy.jsonscan: what routing reads from
a request body, without building it, and the body an upstream is sent (usage
asked for, "caching" cut, an alias put in), all splices of the client's
bytes."""

from __future__ import annotations

import json
import tempfile
from typing import Any

from attrs import define
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import Upstream
from oaproxy.inspection import (
    WALK_AT_ONCE,
    BodyKind,
    BodyProblem,
    Inspected,
    Inspector,
    RequestFields,
    body_kind,
    read_fields,
)
from oaproxy.jsonscan import NotAnObject, run, scan_object
from oaproxy.requestbody import RequestBody
from oaproxy.traffic.estimate import text_characters
from tests.doubles import make_config

UPSTREAM = make_config("upstreams: [{endpoint: 'https://a.test/v1'}]").upstreams[0]
ALIASED = make_config(
    "upstreams: [{endpoint: 'https://a.test/v1', models: {fast: their-model}}]"
).upstreams[0]


def fields(body: bytes, content_type: bytes | None = b"application/json") -> RequestFields:
    """What routing reads from ``body``, walked at once."""
    return run(read_fields(body, body_kind(body, content_type), content_type))


def sent(inspected: Inspected, upstream: Upstream = UPSTREAM) -> bytes:
    """The bytes ``upstream`` (by default one with stream_usage) is sent."""
    chunks: list[bytes] = []

    class Consumer:
        def write(self, data: bytes) -> None:
            chunks.append(data)

    clock = Clock()
    cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
    producer: Any = inspected.body_for(upstream).producer(cooperator)
    producer.startProducing(Consumer())
    while clock.getDelayedCalls():
        clock.advance(0)
    return b"".join(chunks)


class RequestFieldsTests(SynchronousTestCase):
    def test_chat_request(self) -> None:
        """A chat body gives its model, stream flag and include_usage, and the
        numbers a token estimate reads."""
        body = (
            b'{"model": "gpt-4o-mini", "messages": [], "stream": true,'
            b' "stream_options": {"include_usage": true}, "max_tokens": 9, "n": 2}'
        )
        read = fields(body, b"application/json; charset=utf-8")
        self.assertEqual(
            (read.kind, read.model, read.stream, read.include_usage, read.problem),
            (BodyKind.JSON, "gpt-4o-mini", True, True, None),
        )
        self.assertEqual(dict(read.numbers), {"max_tokens": 9, "n": 2})
        self.assertIsNone(read.usage_splice)

    def test_defaults(self) -> None:
        """Without stream_options, and with a stream flag that is not true, the
        request is no stream and asks no usage; numbers that are not whole are
        none."""
        read = fields(b'{"model": "m", "stream": "yes", "n": 1.5, "max_tokens": true}')
        self.assertEqual((read.model, read.stream, read.include_usage), ("m", False, False))
        self.assertEqual(dict(read.numbers), {})

    def test_json_by_its_look(self) -> None:
        """JSON without its type, as text, behind spaces or a BOM is JSON."""
        for body, content_type in [
            (b'  \n{"model": "m"}', None),
            (b'{"model": "m"}', b"text/plain"),
            (b" " * 100_000 + b'{"model": "m"}', b"text/plain"),
            (b'\xef\xbb\xbf{"model": "m"}', None),
        ]:
            read = fields(body, content_type)
            self.assertEqual((read.kind, read.model), (BodyKind.JSON, "m"), body[:20])

    def test_other_bodies(self) -> None:
        """Bodies that are not JSON or forms are said to be other (or empty)."""
        self.assertEqual(fields(b"abc", None).kind, BodyKind.OTHER)
        self.assertEqual(fields(b"", b"application/json").kind, BodyKind.EMPTY)
        self.assertEqual(fields(b"\x00\x01", b"audio/wav").kind, BodyKind.OTHER)

    def test_problems(self) -> None:
        """Each way a body could hide its model from routing is named."""
        deep = b'{"model": "x", "a": ' + b"[" * 2000 + b"]" * 2000 + b"}"
        self.assertEqual(fields(deep).model, "x")
        for body, problem in [
            (b"{", BodyProblem.NOT_JSON),
            (b'{"model": ', BodyProblem.NOT_JSON),
            (b'{"model": "a"} {"model": "b"}', BodyProblem.NOT_JSON),
            (b'{"model": "a" "model": "b"}', BodyProblem.NOT_JSON),
            (b'{"model": "a",}', BodyProblem.NOT_JSON),
            (b'{"a": [1, 2}', BodyProblem.NOT_JSON),
            (b'{"a": "unterminated}', BodyProblem.NOT_JSON),
            (b'{"a\x01": 1}', BodyProblem.NOT_JSON),
            (b"[1]", BodyProblem.NOT_AN_OBJECT),
            (b"[" * 100_000, BodyProblem.NOT_AN_OBJECT),
            (b"null", BodyProblem.NOT_AN_OBJECT),
            (b"  ", BodyProblem.NOT_JSON),
            (b'{"model": ["gpt-denied"]}', BodyProblem.MODEL_NOT_A_STRING),
            (b'{"model": 4}', BodyProblem.MODEL_NOT_A_STRING),
            (b'{"model": null}', BodyProblem.MODEL_NOT_A_STRING),
            (b'{"Model": "gpt-denied"}', BodyProblem.MODEL_NOT_A_STRING),
            (b'{"model": "a", "MODEL": "gpt-denied"}', BodyProblem.MODEL_TWICE),
            (b'{"model": "a", "model": "gpt-denied"}', BodyProblem.MODEL_TWICE),
            (b'{"model": "' + b"m" * 5000 + b'"}', BodyProblem.MODEL_TOO_LONG),
        ]:
            read = fields(body)
            self.assertEqual((read.problem, read.model), (problem, None), body[:40])

    def test_escaped_keys_and_values(self) -> None:
        """Keys and values are decoded as a parser decodes them."""
        read = fields(b'{"mod\\u0065l": "gpt-\\u0034o", "x": "}\\"{[", "stream": true}')
        self.assertEqual((read.model, read.stream), ("gpt-4o", True))

    def test_form_model(self) -> None:
        """A form's model is read wherever it is; two of them, or 65 parts, are refused."""
        content_type = b"multipart/form-data; boundary=b"

        def form(*parts: bytes) -> bytes:
            return b"".join(b"--b\r\n" + part + b"\r\n" for part in parts) + b"--b--\r\n"

        model = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
        audio = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
        read = fields(form(audio, model), content_type)
        self.assertEqual((read.kind, read.model, read.problem), (BodyKind.FORM, "whisper-1", None))
        self.assertIsNone(fields(form(audio), content_type).model)
        self.assertEqual(
            fields(form(model, audio, model), content_type).problem, BodyProblem.FORM_UNREADABLE
        )
        many = form(*[b'Content-Disposition: form-data; name="x"\r\n\r\n1'] * 64, model)
        self.assertEqual(fields(many, content_type).problem, BodyProblem.FORM_UNREADABLE)

    @given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def test_never_raises(self, body: bytes) -> None:
        """Whatever the bytes, the walk names a problem or reads fields."""
        fields(body)
        fields(b'{"model": "m", "x": ' + body + b"}")

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
            ),
            max_leaves=30,
        )
    )
    def test_agrees_with_json_loads(self, value: Any) -> None:
        """On any JSON, the walk sees the object's members json.loads sees."""
        for body in (json.dumps({"v": value}), json.dumps(value, indent=1)):
            parsed = json.loads(body)
            try:
                scan = run(scan_object(body.encode(), frozenset(k.casefold() for k in ("v",))))
            except NotAnObject:
                self.assertNotIsInstance(parsed, dict)
                continue
            self.assertIsInstance(parsed, dict)
            self.assertEqual(scan.count, len(json.loads(body, object_pairs_hook=list)))
            for member in scan.members:
                raw = body.encode()[member.value_start : member.value_end]
                self.assertEqual(json.loads(raw), parsed[member.key])


class UsageSpliceTests(SynchronousTestCase):
    """Asking for usage edits the client's bytes: nothing else changes."""

    def check(self, body: bytes, expected_options: Any) -> bytes:
        inspected = Inspected(RequestBody(len(body), body), fields(body))
        self.assertTrue(inspected.asks_usage_for(UPSTREAM))
        out = sent(inspected)
        self.assertEqual(inspected.body_for(UPSTREAM).length, len(out))
        parsed = json.loads(out)
        self.assertEqual(parsed["stream_options"], expected_options)
        original = json.loads(body)
        original.pop("stream_options", None)
        parsed.pop("stream_options")
        self.assertEqual(parsed, original)
        return out

    def test_added(self) -> None:
        """Missing stream_options go first in the object; the rest is the client's bytes."""
        body = '{"model": "m", "stream": true, "messages": [{"content": "é \\ud800"}]}'.encode()
        out = self.check(body, {"include_usage": True})
        self.assertEqual(out, b'{"stream_options":{"include_usage":true},' + body[1:])

    def test_other_options_kept(self) -> None:
        """The client's other stream_options stay; include_usage false becomes true."""
        body = b'{"model": "m", "stream": true, "stream_options": {"include_obfuscation": false}}'
        self.check(body, {"include_usage": True, "include_obfuscation": False})
        body = b'{"stream": true, "stream_options": {"include_usage": false, "x": 1}}'
        self.check(body, {"include_usage": True, "x": 1})
        self.check(b'{"stream": true, "stream_options": {}}', {"include_usage": True})

    def test_options_not_an_object(self) -> None:
        """stream_options that are not an object are replaced."""
        self.check(b'{"stream": true, "stream_options": null}', {"include_usage": True})

    def test_not_asked_when_not_needed(self) -> None:
        """No stream, or usage asked for already: the body is sent as it is."""
        for body in (
            b'{"model": "m"}',
            b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}',
        ):
            inspected = Inspected(RequestBody(len(body), body), fields(body))
            self.assertFalse(inspected.asks_usage_for(UPSTREAM))
            self.assertIs(inspected.body_for(UPSTREAM), inspected.body)


# Members a body may have, in any order: "caching" (any number of times)
# is cut, "fast" is an alias, a stream asks for usage.
_MEMBERS = [
    '"model": "fast"',
    '"model": "gpt-4o"',
    '"stream": true',
    '"stream": false',
    '"stream_options": {"include_usage": false, "x": 1}',
    '"stream_options": {"include_usage": true}',
    '"stream_options": null',
    '"messages": [{"role": "user", "content": "caching"}]',
    '"n": 2',
]
_CACHING = ['"caching": true', '"caching": false', '"caching": {"ttl": 5}']


def _expected(body: bytes) -> dict[str, Any]:
    """What ALIASED is to be sent for ``body``, as json.loads reads it."""
    wanted: dict[str, Any] = json.loads(body)
    wanted.pop("caching", None)
    if wanted.get("model") == "fast":
        wanted["model"] = "their-model"
    options = wanted.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    if wanted.get("stream") is True and not asked:
        wanted["stream_options"] = {**(options if isinstance(options, dict) else {})}
        wanted["stream_options"]["include_usage"] = True
    return wanted


class EditTests(SynchronousTestCase):
    """Whatever changes a body for an upstream is a splice of the client's
    bytes, and the splices go together."""

    @given(
        st.lists(st.sampled_from(_MEMBERS), unique_by=lambda m: m.split(":")[0], max_size=5),
        st.lists(st.sampled_from(_CACHING), max_size=3),
        st.randoms(use_true_random=False),
        st.sampled_from(["", " ", "\n  "]),
    )
    def test_caching_alias_and_usage_together(
        self, members: list[str], cachings: list[str], order: Any, space: str
    ) -> None:
        """Every "caching" is cut, an alias put in and usage asked for, in any
        order and spacing; the length announced is the length sent."""
        chosen = members + cachings
        order.shuffle(chosen)
        body = ("{" + space + ("," + space).join(chosen) + space + "}").encode()
        inspected = Inspected(RequestBody(len(body), body), fields(body))
        out = sent(inspected, ALIASED)
        self.assertEqual(json.loads(out), _expected(body), body)
        self.assertEqual(inspected.body_for(ALIASED).length, len(out))
        self.assertNotIn(b'"caching"', out.replace(b'"content": "caching"', b""))

    def test_caching_read_and_cut(self) -> None:
        """The last "caching" is the client's word; only the exact key is ours."""
        body = b'{"caching": false, "model": "m", "Caching": 1, "caching": true}'
        read = fields(body)
        self.assertEqual((read.caching, len(read.cuts)), (True, 2))
        self.assertEqual(
            sent(Inspected(RequestBody(len(body), body), read)), b'{"model": "m", "Caching": 1}'
        )
        self.assertIsNone(fields(b'{"caching": "yes"}').caching)

    def test_without_usage(self) -> None:
        """Asked for the body as the client sent it (an upstream refused
        stream_options), it still has the alias and no "caching"."""
        body = b'{"model": "fast", "stream": true, "caching": true}'
        inspected = Inspected(RequestBody(len(body), body), fields(body))
        unasked = inspected.body_for(ALIASED, with_usage=False)
        self.assertEqual(unasked.length, len(b'{"model": "their-model", "stream": true}'))
        self.assertEqual(unasked.data, body)
        self.assertEqual(len(unasked.splices), 2)

    def test_spooled_body_edited_in_place(self) -> None:
        """A body in its spool file is sent from it, spliced: never copied."""
        text = "w" * (2 * WALK_AT_ONCE)
        body = json.dumps({"caching": True, "model": "fast", "input": text, "stream": True})
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed in cleanup
        self.addCleanup(spool.close)
        spool.write(body.encode())
        spooled = RequestBody(len(body), None, spool, head=body.encode()[:WALK_AT_ONCE])
        turns = Clock()
        inspect = Inspector(Cooperator(scheduler=lambda work: turns.callLater(0, work)))
        result = inspect(spooled, None)
        assert isinstance(result, Deferred)
        while turns.getDelayedCalls():
            turns.advance(0)
        inspected = self.successResultOf(result)
        self.assertIsNone(inspected.body_for(ALIASED).data)
        self.assertEqual(json.loads(sent(inspected, ALIASED)), _expected(body.encode()))


class Turns:
    """A cooperator's scheduler whose turns the test runs one by one."""

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def __call__(self, work: Any) -> Any:
        turn = _Turn(work, self.waiting)
        self.waiting.append(turn)
        return turn

    def run_one(self) -> None:
        self.waiting.pop(0).work()


@define
class _Turn:
    work: Any
    waiting: list[Any]

    def cancel(self) -> None:
        self.waiting.remove(self)


class InspectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.turns = Turns()
        # One step of a walk per turn, to see it go step by step.
        self.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True, scheduler=self.turns
        )
        self.inspect = Inspector(self.cooperator)

    def drive(self, result: Inspected | Deferred[Inspected]) -> Inspected:
        """The inspection, its walk stepped to its end, one turn at a time."""
        assert isinstance(result, Deferred)
        turns = 0
        while not result.called:
            self.turns.run_one()
            turns += 1
        self.assertGreater(turns, 2)
        return self.successResultOf(result)

    def test_small_bodies_at_once(self) -> None:
        """A body of 64 KiB or less is read at once, and parsed if asked."""
        body = b'{"model": "m"}'
        inspected = self.inspect(RequestBody(len(body), body), b"application/json")
        assert isinstance(inspected, Inspected)
        self.assertEqual(inspected.model, "m")
        self.assertEqual(inspected.parsed(), {"model": "m"})

    def test_large_bodies_step_by_step(self) -> None:
        """A larger body in memory is walked a step at a time on the cooperator."""
        body = json.dumps({"model": "m", "input": ["ab"] * (WALK_AT_ONCE * 4)}).encode()
        inspected = self.drive(self.inspect(RequestBody(len(body), body), None))
        self.assertEqual(inspected.model, "m")

    def test_spooled_bodies_read_in_place(self) -> None:
        """A spooled body is walked in a map of its file; estimates leave media out."""
        image = "data:image/png;base64," + "A" * 1_000_000
        body = json.dumps({"model": "m", "messages": [{"content": [image, "hello"]}]}).encode()
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed in cleanup
        self.addCleanup(spool.close)
        spool.write(body)
        spooled = RequestBody(len(body), None, spool, head=body[:WALK_AT_ONCE])
        inspected = self.drive(self.inspect(spooled, None))
        self.assertEqual(inspected.model, "m")
        self.assertIsNone(inspected.parsed())
        self.assertEqual(inspected.text_characters(text_characters), len(body) - len(image) - 2)
        # The spool file is still there for every attempt.
        spool.seek(0)
        self.assertEqual(spool.read(), body)

    def test_cancel_stops_the_walk(self) -> None:
        """A client gone mid-walk stops the walk: nothing is left running."""
        body = json.dumps({"model": "m", "input": ["ab"] * (WALK_AT_ONCE * 4)}).encode()
        result = self.inspect(RequestBody(len(body), body), None)
        assert isinstance(result, Deferred)
        self.turns.run_one()
        result.cancel()
        self.failureResultOf(result)
        self.assertEqual(self.turns.waiting, [])

    def test_parsed_exactly_when_small(self) -> None:
        """A small body is counted exactly; one too deep for Python by its size."""
        body = b'{"model": "m", "input": "abcd"}'
        inspected = self.inspect(RequestBody(len(body), body), None)
        assert isinstance(inspected, Inspected)
        self.assertEqual(inspected.text_characters(text_characters), 4)
        deep = b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        inspected = self.inspect(RequestBody(len(deep), deep), None)
        assert isinstance(inspected, Inspected)
        self.assertIsNone(inspected.parsed())
        self.assertEqual(inspected.text_characters(text_characters), len(deep))
