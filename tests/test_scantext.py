"""Tests for oaproxy.jsonscan.scan_text, the C scanner's reading of a small
ASCII body: wherever it reads one, it finds what the walk (``scan_object``)
finds, field for field, and the object json.loads gives; what it declines
the walk reads (or refuses) as before."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Cooperator
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.inspection import _KEYS, BodyKind, Inspector, read_fields
from oaproxy.jsonscan import NotAnObject, Problem, run, scan_object, scan_text
from oaproxy.requestbody import RequestBody

# Keys as a client may spell them: those read, in other cases and escaped,
# and others, long ones included.
_KEY_TEXTS = [
    '"model"',
    '"Model"',
    '"\\u006dodel"',
    '"stream"',
    '"stream_options"',
    '"caching"',
    '"CACHING"',
    '"max_tokens"',
    '"n"',
    '"messages"',
    '"prompt"',
    '"user"',
    '"temperature"',
    '"\\u212aey"',
    '"' + "k" * 300 + '"',
    '"bad\\x"',
    '"tab\there"',
    "model",
    "'model'",
]
# Values, JSON and not: what the walk steps over and the C scanner refuses.
_ODD_VALUES = [
    "NaN",
    "-Infinity",
    "[1, NaN]",
    "01",
    "1.",
    "1e",
    "-",
    "tru",
    '"\\x"',
    '"ctl\x01"',
    "[1,}",
    "[1,]",
    '{"a":1,"a":2}',
    '{"include_usage": true}',
    '{"include_usage": false, "x": 1}',
    "{}",
    "[]",
    "9" * 5000,
    '"' + "m" * 5000 + '"',
    "[" * 30 + "]" * 30,
]
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
# Mostly JSON, so that most bodies are read.
_VALUES = st.one_of(*[_JSON.map(json.dumps)] * 4, st.sampled_from(_ODD_VALUES))
_SPACE = st.sampled_from(["", " ", "\n\t ", "\r"])


@st.composite
def _bodies(draw: Any) -> str:
    """An object's text, members chosen from the lists above, spaced at
    random, now and then broken at its ends."""
    members = draw(st.lists(st.tuples(st.sampled_from(_KEY_TEXTS), _VALUES), max_size=6))
    space = lambda: draw(_SPACE)  # noqa: E731
    inner = ("," + space()).join(f"{key}{space()}:{space()}{value}" for key, value in members)
    text = f"{space()}{{{space()}{inner}{space()}}}{space()}"
    return (
        draw(st.sampled_from([""] * 8 + ["[", "x", ","]))
        + text
        + draw(st.sampled_from([""] * 8 + ["}", " 1", ","]))
    )


def _walked(data: bytes) -> Any:
    """What the walk finds: the fields, or the refusal's problem."""
    try:
        scan = run(scan_object(data, _KEYS))
    except NotAnObject as e:
        return e.problem
    return scan


class ScanTextTests(SynchronousTestCase):
    @settings(max_examples=500)
    @given(_bodies())
    def test_finds_what_the_walk_finds(self, text: str) -> None:
        """Where scan_text reads a body, its scan is the walk's and its
        object json.loads's; where the walk refuses one, scan_text declines
        it too."""
        data = text.encode("ascii")
        walked = _walked(data)
        found = scan_text(text, _KEYS)
        if found is None:
            return
        scan, document = found
        self.assertEqual(scan, walked)
        self.assertEqual(document, json.loads(data))

    @given(_JSON)
    def test_reads_any_json_object(self, value: Any) -> None:
        """Any JSON object (in ASCII) is read, not left to the walk."""
        text = json.dumps({"model": "m", "v": value, "stream": False})
        found = scan_text(text, _KEYS)
        assert found is not None
        self.assertEqual(found[0], run(scan_object(text.encode(), _KEYS)))

    def test_declines_what_the_walk_refuses(self) -> None:
        """NaN as a member's value, a trailing comma, text after the object,
        a list: scan_text declines, the walk says why."""
        for text in ['{"n": NaN}', '{"a": 1,}', '{"a": 1} x', "[1]", '{"a" 1}', ""]:
            self.assertIsNone(scan_text(text, _KEYS), text)
            self.assertIsInstance(_walked(text.encode()), Problem, text)

    @settings(max_examples=300)
    @given(_bodies())
    def test_inspector_reads_the_same_fields(self, text: str) -> None:
        """The Inspector (scan_text for small ASCII bodies) gives the fields
        the walk gives, and parsed() the object json.loads gives."""
        data = text.encode("ascii")
        inspected = Inspector(Cooperator())(RequestBody(len(data), data), b"application/json")
        assert not hasattr(inspected, "addCallback")
        self.assertEqual(inspected.fields, run(read_fields(data, BodyKind.JSON, None)))
        if inspected.is_json_object:
            try:
                loaded = json.loads(data)
            except (ValueError, RecursionError):
                loaded = None
            # repr: a NaN inside is equal to itself there.
            self.assertEqual(repr(inspected.parsed()), repr(loaded or None))
