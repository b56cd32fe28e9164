"""What routing needs from a request body: the model, the stream flag, whether
the client asked for usage; and the body as an upstream is asked for usage.

A JSON body is walked (``oaproxy.jsonscan``), never built whole: a body held
in memory at once, one in its spool file (past ``IN_MEMORY_BODY``) through a
read-only map of the file, a step at a time on the cooperator, so that the
reactor keeps serving and nothing of the body is copied. A multipart form
gives its ``model`` field. Whatever keeps a body from being read for its
model is a ``BodyProblem`` (``oaproxy.bodyrules`` says what it costs the
request): routing never guesses.

Asking an upstream for usage (``stream_options.include_usage``) is a splice
of the client's bytes, not a new body.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Callable, Generator, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeVar

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator

from oaproxy.config import Upstream
from oaproxy.jsonscan import (
    Buffer,
    Member,
    NotAnObject,
    ObjectScan,
    Problem,
    media_bytes,
    run,
    scan_object,
    stepped,
)
from oaproxy.multipart import form_values
from oaproxy.relay import RequestBody, Splice

#: Bodies up to this size are walked at once; larger ones a step at a time.
WALK_AT_ONCE = 64 * 1024
#: A model name longer than this (as JSON, quotes and escapes included) is
#: no model's: it is refused rather than copied around.
MODEL_BYTES = 4096

# The members read from a body's object, case folded (MODEL counts too).
_MODEL = "model"
_STREAM_OPTIONS = "stream_options"
_NUMBERS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "n")
_KEYS = frozenset({_MODEL, "stream", _STREAM_OPTIONS, *_NUMBERS})
_INCLUDE_USAGE = frozenset({"include_usage"})
_NUMBER_BYTES = 32
_NOT_WHITESPACE = re.compile(rb"[^ \t\n\r]")
_BOM = b"\xef\xbb\xbf"
_NO_NUMBERS: Mapping[str, int] = MappingProxyType({})
_T = TypeVar("_T")


def media_type(content_type: str | bytes | None) -> str | None:
    """The media type of a Content-Type value, lower case, without parameters."""
    if content_type is None:
        return None
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.partition(";")[0].strip().lower() or None


def parse_json(data: bytes | str) -> Any:
    """json.loads, with None for anything that is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError.
        return None


class BodyKind(Enum):
    EMPTY = "empty"
    JSON = "JSON"  # said so by its content type, or starting with { or [
    FORM = "multipart form"
    OTHER = "other"


class BodyProblem(Enum):
    """Why a body cannot be read for its model (the text ends a sentence
    that starts with "The request body")."""

    NOT_JSON = Problem.NOT_JSON.value
    NOT_AN_OBJECT = Problem.NOT_AN_OBJECT.value
    TOO_COMPLEX = Problem.TOO_COMPLEX.value
    MODEL_NOT_A_STRING = "has a `model` that is not a string"
    MODEL_TOO_LONG = f"has a `model` longer than {MODEL_BYTES} bytes"
    MODEL_TWICE = "has `model` more than once (keys in any case count)"
    FORM_UNREADABLE = "is a form whose `model` field cannot be read"


@frozen
class RequestFields:
    """What the forwarder needs from a request body, read once."""

    kind: BodyKind
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    problem: BodyProblem | None = None
    # Top-level numbers a token estimate reads (max_tokens, n...).
    numbers: Mapping[str, int] = _NO_NUMBERS
    # How to ask an upstream for usage (a stream that did not): the edit.
    usage_splice: Splice | None = None
    # Bytes of inline media (data: URLs), for a body too large to parse.
    media_bytes: int = 0


def body_kind(head: bytes, content_type: str | bytes | None) -> BodyKind:
    """What kind of body starts with ``head`` (its first bytes, up to 64 KiB)."""
    if not head:
        return BodyKind.EMPTY
    kind = media_type(content_type)
    if kind is not None and kind.startswith("multipart/"):
        return BodyKind.FORM
    if kind is not None and (kind == "application/json" or kind.endswith("+json")):
        return BodyKind.JSON
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    # JSON sent as text/plain, or with no type, or behind a wall of spaces:
    # JSON all the same (64 KiB of nothing but whitespace counts too).
    found = _NOT_WHITESPACE.search(head)
    if found is None or head[found.start()] in b"{[":
        return BodyKind.JSON
    return BodyKind.OTHER


def read_fields(
    buffer: Buffer, kind: BodyKind, content_type: bytes | None
) -> Generator[None, None, RequestFields]:
    """The fields of a body of ``kind`` in ``buffer``, a step at a time."""
    if kind is BodyKind.FORM:
        values = form_values(buffer, content_type or b"", _MODEL)
        if values is None or len(values) > 1:
            return RequestFields(kind, problem=BodyProblem.FORM_UNREADABLE)
        return RequestFields(kind, model=values[0] if values else None)
    if kind is not BodyKind.JSON:
        return RequestFields(kind)
    try:
        scan = yield from scan_object(buffer, _KEYS)
        return (yield from _json_fields(buffer, scan))
    except NotAnObject as e:
        return RequestFields(kind, problem=BodyProblem[e.problem.name])


def _json_fields(buffer: Buffer, scan: ObjectScan) -> Generator[None, None, RequestFields]:
    members = scan.members
    models = [m for m in members if m.key.casefold() == _MODEL]
    if len(models) > 1:
        return RequestFields(BodyKind.JSON, problem=BodyProblem.MODEL_TWICE)
    model = None
    if models:
        [member] = models
        if member.key != _MODEL or buffer[member.value_start : member.value_start + 1] != b'"':
            # "Model": a parser that ignores case would see it; this one would not.
            return RequestFields(BodyKind.JSON, problem=BodyProblem.MODEL_NOT_A_STRING)
        if member.value_end - member.value_start > MODEL_BYTES:
            return RequestFields(BodyKind.JSON, problem=BodyProblem.MODEL_TOO_LONG)
        model = _decoded(buffer, member)
        if model is None:
            # A bad escape in it: no parser would take the body.
            return RequestFields(BodyKind.JSON, problem=BodyProblem.NOT_JSON)
    # The last of a key counts, as for json.loads.
    last = {m.key: m for m in members}
    stream = _token(buffer, last.get("stream")) == b"true"
    options = last.get(_STREAM_OPTIONS)
    inner = None
    if options is not None and buffer[options.value_start : options.value_start + 1] == b"{":
        inner = yield from scan_object(
            buffer, _INCLUDE_USAGE, options.value_start, options.value_end, whole=False
        )
    usage = {m.key: m for m in inner.members}.get("include_usage") if inner else None
    include_usage = _token(buffer, usage) == b"true"
    numbers = {}
    for name in _NUMBERS:
        value = _decoded(buffer, last.get(name), _NUMBER_BYTES)
        if isinstance(value, int) and not isinstance(value, bool):
            numbers[name] = value
    return RequestFields(
        BodyKind.JSON,
        model=model,
        stream=stream,
        include_usage=include_usage,
        numbers=MappingProxyType(numbers),
        usage_splice=(
            _usage_splice(scan, options, inner, usage) if stream and not include_usage else None
        ),
    )


def _usage_splice(
    scan: ObjectScan, options: Member | None, inner: ObjectScan | None, usage: Member | None
) -> Splice:
    """The edit that makes ``stream_options.include_usage`` true: in the body
    ``scan``, whose ``options`` (if any) is the object ``inner`` (if it is
    one) holding ``usage`` (if it does)."""
    if usage is not None:
        return Splice(usage.value_start, usage.value_end, b"true")
    if inner is not None:
        # Inside the client's options, before the others (if any).
        at = inner.open_at + 1
        return Splice(at, at, b'"include_usage":true' + (b"," if inner.count else b""))
    if options is not None:
        # null, or not an object: replaced, as the client's options say nothing.
        return Splice(options.value_start, options.value_end, b'{"include_usage":true}')
    at = scan.open_at + 1
    comma = b"," if scan.count else b""
    return Splice(at, at, b'"stream_options":{"include_usage":true}' + comma)


def _token(buffer: Buffer, member: Member | None) -> bytes | None:
    """The first bytes of a member's value: enough to tell ``true``."""
    if member is None:
        return None
    return bytes(buffer[member.value_start : min(member.value_end, member.value_start + 8)])


def _decoded(buffer: Buffer, member: Member | None, limit: int = MODEL_BYTES) -> Any:
    """A member's (short) value as Python; None for a long or undecodable one."""
    if member is None or member.value_end - member.value_start > limit:
        return None
    try:
        return json.loads(buffer[member.value_start : member.value_end])
    except ValueError:
        # A bad escape in a string the walk stepped over.
        return None


@define
class Inspected:
    """A request body and what was read from it."""

    body: RequestBody
    fields: RequestFields
    # Parsed on first use, for bodies in memory only (see text_characters).
    _parsed: Any = field(default=None, init=False, repr=False)

    @property
    def model(self) -> str | None:
        """The JSON body's model (a form's is ``form_model``)."""
        return self.fields.model if self.fields.kind is BodyKind.JSON else None

    @property
    def form_model(self) -> str | None:
        return self.fields.model if self.fields.kind is BodyKind.FORM else None

    @property
    def stream(self) -> bool:
        return self.fields.stream

    @property
    def include_usage(self) -> bool:
        """The client asked for usage itself, so the usage chunk is its own."""
        return self.fields.include_usage

    @property
    def problem(self) -> BodyProblem | None:
        return self.fields.problem

    @property
    def is_json_object(self) -> bool:
        return self.fields.kind is BodyKind.JSON and self.fields.problem is None

    def parsed(self) -> dict[str, Any] | None:
        """The JSON body as Python objects, for one walked at once (parsing a
        larger one would hold the reactor); None for others. Shared: do not
        mutate."""
        data = self.body.data
        if self._parsed is None and self.is_json_object and data and len(data) <= WALK_AT_ONCE:
            try:
                self._parsed = json.loads(data)
            except (ValueError, RecursionError):
                # Deeper than Python parses: the walk read it all the same.
                self._parsed = False
        return self._parsed or None

    def text_characters(self, count: Callable[[Mapping[str, Any]], int]) -> int:
        """``count`` of the parsed body; for one not parsed (too large or too
        deep), its bytes outside inline media: more than its text, never less."""
        parsed = self.parsed()
        if parsed is not None:
            return count(parsed)
        return self.body.size - self.fields.media_bytes

    def asks_usage_for(self, upstream: Upstream) -> bool:
        """Whether oaproxy adds ``include_usage`` to this upstream's request."""
        return upstream.stream_usage and self.fields.usage_splice is not None

    def body_for(self, upstream: Upstream) -> RequestBody:
        splice = self.fields.usage_splice
        if splice is None or not upstream.stream_usage:
            return self.body
        return self.body.edited(splice)


class Inspector:
    """Reads request bodies: at once when small, on ``cooperator`` otherwise."""

    def __init__(self, cooperator: Cooperator) -> None:
        self._cooperator = cooperator

    def __call__(
        self, body: RequestBody, content_type: bytes | None
    ) -> Inspected | Deferred[Inspected]:
        kind = body_kind(body.head[:WALK_AT_ONCE], content_type)
        if kind is BodyKind.JSON and body.size > WALK_AT_ONCE:
            if body.data is not None:
                return self._stepped(body, _large_json_fields(body.data, content_type))
            mapped = _mapped(body)
            walk = _dropping_pages(mapped, _large_json_fields(mapped, content_type))
            return self._stepped(body, walk).addBoth(_closing(mapped))
        if body.data is not None:
            return Inspected(body, run(read_fields(body.data, kind, content_type)))
        if kind is BodyKind.FORM:
            # A form's parts are found by memmem: at once, whatever its size.
            with _mapped(body) as mapped:
                return Inspected(body, run(read_fields(mapped, kind, content_type)))
        # A large upload of another kind: nothing in it is read.
        return Inspected(body, RequestFields(kind))

    def _stepped(
        self, body: RequestBody, walk: Generator[None, None, RequestFields]
    ) -> Deferred[Inspected]:
        found: list[RequestFields] = []
        task = self._cooperator.cooperate(stepped(walk, found.append))
        # Cancelled (the client went away), the walk stops where it is.
        inspected: Deferred[Inspected] = Deferred(lambda _: task.stop())
        task.whenDone().addCallbacks(
            lambda _: inspected.callback(Inspected(body, found[0])), inspected.errback
        )
        return inspected


def unread(body: RequestBody) -> Inspected:
    """A body refused before it was read: nothing is said of it."""
    return Inspected(body, RequestFields(BodyKind.OTHER))


def _large_json_fields(
    buffer: Buffer, content_type: bytes | None
) -> Generator[None, None, RequestFields]:
    fields = yield from read_fields(buffer, BodyKind.JSON, content_type)
    if fields.problem is None:
        # Too large to parse for a token estimate: its inline media are left out.
        fields = evolve(fields, media_bytes=(yield from media_bytes(buffer)))
    return fields


def _dropping_pages(
    mapped: mmap.mmap, walk: Generator[None, None, _T]
) -> Generator[None, None, _T]:
    """The walk, letting go of the pages it read at each step: a walk over a
    60 MiB file must not make the process 60 MiB larger (they stay in the
    page cache, for the attempts that send the file)."""
    while True:
        try:
            next(walk)
        except StopIteration as done:
            result: _T = done.value
            return result
        mapped.madvise(mmap.MADV_DONTNEED)
        yield


def _mapped(body: RequestBody) -> mmap.mmap:
    """The body's spool file mapped read-only: read in place, never copied in."""
    assert body.file is not None
    return mmap.mmap(body.file.fileno(), 0, access=mmap.ACCESS_READ)


def _closing(mapped: mmap.mmap) -> Callable[[_T], _T]:
    def close(result: _T) -> _T:
        mapped.close()
        return result

    return close
