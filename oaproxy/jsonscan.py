"""The members of a JSON object, found without building it.

Routing needs a few small fields of a body that may be tens of MiB of
messages; ``json.loads`` would build the whole tree (several times the
body's size) on the reactor thread, and fail on what other parsers take
(a body nested 2,000 deep). ``scan_object`` walks the bytes instead: it
reads the object's own members (each key decoded, each value as its span
of bytes) and steps over everything inside the values, only telling
strings from brackets. ``memchr`` and the C regex engine do the stepping;
Python only sees brackets. Nothing is copied but the keys.

The walk is a generator that yields after each piece of work of about
``STEP`` bytes, so a caller can run it on a ``Cooperator`` and keep the
reactor serving; ``run`` drives one to its end at once (small bodies). It
reads any buffer with ``find``, slicing and ``re`` (``bytes``, ``mmap``).

What a caller needs of a value's content is read the same way
(``kept_items``): a list's elements one at a time, each as Python values
with only the members it names, so that a 60 MiB list of messages is never
held as objects at once.

What the walk checks is the structure parsers agree on: the object's own
members (keys, colons, commas), whole strings and matched brackets inside
values, and nothing after the object. Numbers and words inside values are
stepped over, not checked: an upstream refuses such a body anyway, and they
cannot make two parsers see different members.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from enum import Enum
from typing import Any, TypeVar, cast

from attrs import frozen

#: About this many bytes are looked at between two yields.
STEP = 256 * 1024
# Stepping over one bracket or member costs this much of a step.
_ITEM_COST = 128
#: A body with more brackets than this (and, where values are read, values)
#: is refused: each costs about a microsecond of Python, and no API body has
#: a fraction of this many.
MAX_BRACKETS = 2 << 20
#: Keys longer than this (as bytes, escapes included) are not decoded: no
#: key a caller asks for is near this long, however it is escaped.
KEY_BYTES = 256

_T = TypeVar("_T")
Buffer = Any  # bytes or mmap: find, slices, len and re
# Reads a kept member's value: given its key and where it starts, where it ends.
_Read = Callable[[str, int], Generator[None, None, int]]

_BOM = b"\xef\xbb\xbf"
_QUOTE = ord('"')
_CLOSING = {ord("["): ord("]"), ord("{"): ord("}")}
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# The rest of a string after its opening quote, up to its closing quote.
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
# Anything but brackets, strings whole: a run inside a container value.
_RUN = re.compile(rb'(?:[^"\[\]{}]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
# The same for scan_text, over text.
_TEXT_WHITESPACE = re.compile(r"[ \t\n\r]*")
_TEXT_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
# The comma (and the whitespace to the next member) or the closing brace.
_TEXT_SEPARATOR = re.compile(r"[ \t\n\r]*(?:(,)[ \t\n\r]*|\})")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_TEXT_DECODER = json.JSONDecoder(parse_constant=_no_constant)


class Problem(Enum):
    """Why a walk found no object."""

    NOT_JSON = "is not valid JSON"
    NOT_AN_OBJECT = "is not a JSON object"
    TOO_COMPLEX = f"has more than {MAX_BRACKETS} brackets or values to read"


class NotAnObject(Exception):
    """The bytes are not one JSON object (as far as the walk looks)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.value)
        self.problem = problem


@frozen
class Member:
    """One member of the object: its decoded key, where it starts (its
    key's quote) and where its value is (``value_end`` is past it); and
    where its neighbours are, to cut it out: the end of the value before
    it and the start of the member after it (None for none)."""

    key: str
    start: int
    value_start: int
    value_end: int
    previous_end: int | None = None
    next_start: int | None = None


@frozen
class ObjectScan:
    """An object's ``{`` and ``}`` offsets, how many members it has, and the
    members asked for, in order."""

    open_at: int
    close_at: int
    count: int
    members: tuple[Member, ...]


def scan_object(
    buffer: Buffer,
    keys: frozenset[str],
    start: int = 0,
    end: int | None = None,
    *,
    whole: bool = True,
) -> Generator[None, None, ObjectScan]:
    """Walk the object at ``start`` (after whitespace), keeping the members
    whose key, case folded, is one of ``keys`` (some parsers match keys
    without regard to case, so a caller may want to see ``MODEL`` too). With
    ``whole``, only whitespace may follow the object up to ``end``. Raises
    ``NotAnObject``."""
    walk = _Walk(buffer, len(buffer) if end is None else end)
    if whole and buffer[start : start + 3] == _BOM:
        start += 3
    return (yield from walk.object(start, keys, whole))


def scan_text(text: str, keys: frozenset[str]) -> tuple[ObjectScan, dict[str, Any]] | None:
    """``scan_object``'s result for an ASCII ``text`` (where a character's
    offset is its byte's) holding one whole object, found by the C JSON
    scanner: for a small body, a quarter of the walk's cost, and the object
    itself (what ``json.loads`` gives) comes with it. None for what the C
    scanner does not take, which the walk then reads (or refuses, saying
    why): it checks more than the walk, never less, and NaN and Infinity,
    which the walk refuses as member values, are refused at any depth."""
    # The value at an offset and where it ends (the C scanner; not in typeshed).
    scan_value: Callable[[str, int], tuple[Any, int]] = _TEXT_DECODER.scan_once  # type: ignore[attr-defined]
    # The pattern matches the empty string: never None.
    whitespace = cast("Callable[..., re.Match[str]]", _TEXT_WHITESPACE.match)
    try:
        position = whitespace(text).end()
        if text[position : position + 1] != "{":
            return None
        open_at = position
        document: dict[str, Any] = {}
        kept: list[Member] = []
        count = 0
        previous_end = None
        position = whitespace(text, position + 1).end()
        if text[position : position + 1] == "}":
            close_at = position
        else:
            while True:
                if text[position : position + 1] != '"':
                    return None
                key, key_end = scan_value(text, position)
                colon = _TEXT_COLON.match(text, key_end)
                if colon is None:
                    return None
                value_start = colon.end()
                document[key], value_end = scan_value(text, value_start)
                count += 1
                separator = _TEXT_SEPARATOR.match(text, value_end)
                if separator is None:
                    return None
                next_start = separator.end() if separator.group(1) == "," else None
                if key_end - position <= KEY_BYTES and key.casefold() in keys:
                    kept.append(
                        Member(key, position, value_start, value_end, previous_end, next_start)
                    )
                if next_start is None:
                    close_at = separator.end() - 1
                    break
                previous_end, position = value_end, next_start
    except (ValueError, RecursionError, StopIteration):
        # StopIteration: no value where one must be.
        return None
    if whitespace(text, close_at + 1).end() != len(text):
        return None
    return ObjectScan(open_at, close_at, count, tuple(kept)), document


def kept_items(
    buffer: Buffer,
    member: Member,
    keep: frozenset[str],
    found: Callable[[Any, bool], bool],
    *,
    depth: int = 4,
) -> Generator[None, None, bool]:
    """Give ``found`` each element of ``member``'s value when it is a list
    (``found(element, True)``), or else the value itself (``found(value,
    False)``), as Python values: objects with only the members named in
    ``keep``, containers deeper than ``depth`` as None. ``found`` returns True
    to stop; whether it did. Raises ``NotAnObject``."""
    walk = _Walk(buffer, member.value_end)
    start = member.value_start
    try:
        if buffer[start : start + 1] != b"[":
            value, _ = yield from walk.kept(start, keep, depth)
            return found(value, False)

        def element(position: int) -> Generator[None, None, int]:
            value, end = yield from walk.kept(position, keep, depth)
            if found(value, True):
                raise _Found
            return end

        yield from walk.array(start, element)
    except _Found:
        return True
    return False


class _Found(Exception):
    """A ``kept_items`` caller found what it looked for: the walk stops."""


def run(walk: Generator[None, None, _T]) -> _T:
    """Drive a walk to its end at once."""
    found: list[_T] = []
    for _ in stepped(walk, found.append):
        pass
    return found[0]


def stepped(
    walk: Generator[None, None, _T], done: Callable[[_T], None]
) -> Generator[None, None, None]:
    """The walk as a plain iterator (what ``Cooperator.cooperate`` takes),
    giving its result to ``done`` at the end."""
    result = yield from walk
    done(result)


class _Walk:
    """One walk over ``buffer`` up to ``end``, with its costs so far."""

    def __init__(self, buffer: Buffer, end: int) -> None:
        self.buffer = buffer
        self.end = end
        self.work = 0
        self.brackets = 0

    def object(
        self, start: int, keys: frozenset[str], whole: bool, read: _Read | None = None
    ) -> Generator[None, None, ObjectScan]:
        """With ``read``, the value of each member kept is read by it (given
        the key and where the value starts, it returns where the value ends)."""
        buffer, end = self.buffer, self.end
        position = yield from self.whitespace(start)
        if buffer[position : position + 1] != b"{":
            raise NotAnObject(Problem.NOT_AN_OBJECT if position < end else Problem.NOT_JSON)
        open_at = position
        kept: list[Member] = []
        count = 0
        previous_end = None
        position = yield from self.whitespace(position + 1)
        if buffer[position : position + 1] == b"}":
            close_at = position
        else:
            while True:
                if buffer[position : position + 1] != b'"':
                    raise NotAnObject(Problem.NOT_JSON)
                key_end = yield from self.string_end(position)
                colon = yield from self.whitespace(key_end)
                if buffer[colon : colon + 1] != b":":
                    raise NotAnObject(Problem.NOT_JSON)
                value_start = yield from self.whitespace(colon + 1)
                key = self.key(position, key_end)
                wanted = key is not None and key.casefold() in keys
                if wanted and read is not None:
                    assert key is not None
                    value_end = yield from read(key, value_start)
                else:
                    value_end = yield from self.value_end(value_start)
                count += 1
                after = yield from self.whitespace(value_end)
                separator = buffer[after : after + 1]
                next_start = None
                if separator == b",":
                    next_start = yield from self.whitespace(after + 1)
                elif separator != b"}":
                    raise NotAnObject(Problem.NOT_JSON)
                if wanted:
                    assert key is not None
                    kept.append(
                        Member(key, position, value_start, value_end, previous_end, next_start)
                    )
                if next_start is None:
                    close_at = after
                    break
                previous_end, position = value_end, next_start
                yield from self.spent(_ITEM_COST)
        if whole and (yield from self.whitespace(close_at + 1)) != end:
            raise NotAnObject(Problem.NOT_JSON)
        return ObjectScan(open_at, close_at, count, tuple(kept))

    def spent(self, work: int) -> Generator[None, None, None]:
        """Count ``work``; yield when a step's worth has been done."""
        self.work += work
        if self.work >= STEP:
            self.work = 0
            yield

    def whitespace(self, position: int) -> Generator[None, None, int]:
        """Past the whitespace at ``position`` (a client may send MiBs of it)."""
        while True:
            window = min(position + STEP, self.end)
            match = _WHITESPACE.match(self.buffer, position, window)
            assert match is not None  # the pattern matches the empty string
            position = match.end()
            if position < window or window >= self.end:
                return position
            yield from self.spent(STEP)

    def key(self, start: int, end: int) -> str | None:
        if end - start > KEY_BYTES:
            return None
        try:
            key: str = json.loads(self.buffer[start:end])
        except ValueError:
            # Control characters, bad escapes: no parser would take it.
            raise NotAnObject(Problem.NOT_JSON) from None
        return key

    def string_end(self, start: int) -> Generator[None, None, int]:
        """Past the closing quote of the string whose opening quote is at ``start``."""
        buffer, end = self.buffer, self.end
        position = start + 1
        while True:
            window = min(position + STEP, end)
            quote = buffer.find(b'"', position, window)
            if buffer.find(b"\\", position, quote if quote >= 0 else window) < 0:
                # No escape before the next quote (most of a long text): memchr fast.
                if quote >= 0:
                    return quote + 1
                position = window
            else:
                match = _STRING_REST.match(buffer, position, window)
                assert match is not None  # the pattern matches the empty string
                position = match.end()
                if position < window and buffer[position] == _QUOTE:
                    return position + 1
            if window >= end:
                raise NotAnObject(Problem.NOT_JSON)
            # The window ended inside the string (or inside an escape in it).
            yield from self.spent(STEP)

    def value_end(self, start: int) -> Generator[None, None, int]:
        """Past the value that starts at ``start``."""
        first = self.buffer[start : start + 1]
        if first == b'"':
            return (yield from self.string_end(start))
        if first in (b"{", b"["):
            return (yield from self.container_end(start))
        match = _SCALAR.match(self.buffer, start, self.end)
        if match is None:
            raise NotAnObject(Problem.NOT_JSON)
        return match.end()

    def array(
        self, start: int, element: Callable[[int], Generator[None, None, int]]
    ) -> Generator[None, None, int]:
        """Past the array at ``start``, each element read by ``element``
        (given where it starts, it returns where it ends)."""
        buffer = self.buffer
        position = yield from self.whitespace(start + 1)
        if buffer[position : position + 1] == b"]":
            return position + 1
        while True:
            position = yield from self.whitespace((yield from element(position)))
            separator = buffer[position : position + 1]
            if separator == b"]":
                return position + 1
            if separator != b",":
                raise NotAnObject(Problem.NOT_JSON)
            position = yield from self.whitespace(position + 1)
            yield from self.spent(_ITEM_COST)

    def kept(
        self, start: int, keep: frozenset[str], depth: int
    ) -> Generator[None, None, tuple[Any, int]]:
        """The value at ``start`` as Python values, objects with only the
        members named in ``keep`` (the last of a key counts, as for
        ``json.loads``), containers deeper than ``depth`` as None; and where
        it ends."""
        buffer = self.buffer
        first = buffer[start : start + 1]
        if first not in (b"{", b"["):
            end = yield from self.value_end(start)
            self.counted()
            return _loaded(buffer[start:end]), end
        if depth <= 0:
            return None, (yield from self.container_end(start))
        if first == b"[":
            items: list[Any] = []

            def element(position: int) -> Generator[None, None, int]:
                value, end = yield from self.kept(position, keep, depth - 1)
                items.append(value)
                return end

            return items, (yield from self.array(start, element))
        members: dict[str, Any] = {}

        def member(key: str, position: int) -> Generator[None, None, int]:
            if key not in keep:
                # Kept for its case-folded key only: not one asked for.
                return (yield from self.value_end(position))
            members[key], end = yield from self.kept(position, keep, depth - 1)
            return end

        self.counted()
        scan = yield from self.object(start, keep, False, member)
        return members, scan.close_at + 1

    def counted(self) -> None:
        """One more value read: they cost like brackets, and count with them."""
        self.brackets += 1
        if self.brackets > MAX_BRACKETS:
            raise NotAnObject(Problem.TOO_COMPLEX)

    def container_end(self, start: int) -> Generator[None, None, int]:
        """Past the bracket that closes the one at ``start``."""
        buffer, end = self.buffer, self.end
        # The closing bracket each open one needs, innermost last.
        expected = bytearray([_CLOSING[buffer[start]]])
        position = start + 1
        while True:
            window = min(position + STEP, end)
            match = _RUN.match(buffer, position, window)
            assert match is not None  # the pattern matches the empty string
            self.work += match.end() - position
            position = match.end()
            if position >= end:
                raise NotAnObject(Problem.NOT_JSON)
            character = buffer[position]
            if character == expected[-1]:
                expected.pop()
                position += 1
                if not expected:
                    return position
            elif character in _CLOSING:
                expected.append(_CLOSING[character])
                position += 1
            elif character == _QUOTE and position < window:
                # A string the run could not finish: it goes past the window.
                position = yield from self.string_end(position)
            elif position < window:
                # A closing bracket that closes nothing open.
                raise NotAnObject(Problem.NOT_JSON)
            self.brackets += 1
            if self.brackets > MAX_BRACKETS:
                raise NotAnObject(Problem.TOO_COMPLEX)
            # Inline, not spent(): a generator per bracket would double the cost.
            self.work += _ITEM_COST
            if self.work >= STEP:
                self.work = 0
                yield


def _loaded(value: bytes) -> Any:
    """A string, number or word as Python; None for one Python does not read
    (a bad escape, a number of thousands of digits). Control characters in
    strings are taken: a lenient upstream would read them."""
    try:
        return json.loads(value, strict=False)
    except ValueError:
        return None


def media_bytes(buffer: Buffer) -> Generator[None, None, int]:
    """The bytes of the strings that are ``data:`` URLs (inline images and
    audio), wherever they are: what a prompt's size leaves out. (Close
    enough: a ``"data:`` after a run of backslashes is taken as no string.)"""
    walk = _Walk(buffer, len(buffer))
    end = walk.end
    total = position = 0
    while True:
        window = min(position + STEP, end)
        found = buffer.find(b'"data:', position, window)
        if found < 0:
            if window >= end:
                return total
            # One may straddle the window's end.
            position = window - 5
            yield
        elif buffer[max(found - 16, 0) : found].endswith(b"\\"):
            position = found + 1  # an escaped quote inside a string
        else:
            try:
                string_end = yield from walk.string_end(found)
            except NotAnObject:
                return total
            total += string_end - found
            position = string_end
