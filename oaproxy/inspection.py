"""What routing needs from a request body: the model, the stream flag, whether
the client asked for usage, its ``"caching"``; and the body each upstream is
sent.

A JSON body is walked (``oaproxy.jsonscan``), never built whole: a body held
in memory at once, one in its spool file (past ``IN_MEMORY_BODY``) through a
read-only map of the file, a step at a time on the cooperator, so that the
reactor keeps serving and nothing of the body is copied. A multipart form
gives its ``model`` field. Whatever keeps a body from being read for its
model is a ``BodyProblem`` (``oaproxy.bodyrules`` says what it costs the
request): routing never guesses.

What an upstream is sent is the client's bytes with splices, never a new
body: ``"caching"`` (openai-forward's parameter, read by the response
cache) cut out of every JSON body, as OpenAI refuses parameters it does not
know; the upstream's own name for an aliased model; and
``stream_options.include_usage`` when oaproxy asks for usage.

Those that need more of a body read it here too: a body of up to
``WALK_AT_ONCE`` parsed whole (``Inspected.parsed``), and the members a
model reads (``Inspected.model_read_items``, for the content filter) of any
body, a list's elements one at a time.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from enum import Enum
from functools import partial
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
    kept_items,
    media_bytes,
    run,
    scan_object,
    scan_text,
    stepped,
)
from oaproxy.multipart import form_values
from oaproxy.requestbody import RequestBody, Splice

#: Bodies up to this size are walked at once, and may be parsed whole (in at
#: most a few milliseconds); larger ones are walked a step at a time.
WALK_AT_ONCE = 64 * 1024
#: A model name longer than this (as JSON, quotes and escapes included) is
#: no model's: it is refused rather than copied around.
MODEL_BYTES = 4096

CACHING = "caching"
#: The members whose texts a model reads (what the content filter checks).
MODEL_READS = ("messages", "prompt", "input", "instructions")

# The members read from a body's object, case folded (MODEL counts too).
_MODEL = "model"
_STREAM_OPTIONS = "stream_options"
_NUMBERS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "n")
_KEYS = frozenset({_MODEL, "stream", _STREAM_OPTIONS, CACHING, *_NUMBERS, *MODEL_READS})
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


def json_object(data: bytes | str) -> dict[str, Any]:
    """A JSON object's members; empty for anything else (not JSON, another value)."""
    value = parse_json(data)
    return value if isinstance(value, dict) else {}


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
    # The client's "caching": true or false; None when it gave none.
    caching: bool | None = None
    # The edits that take every "caching" out of the body.
    cuts: tuple[Splice, ...] = ()
    # Where the model's value (a JSON string) is: an alias is put there.
    model_at: tuple[int, int] | None = None
    # The members a model reads (MODEL_READS), the last of each name.
    read_by_model: tuple[Member, ...] = ()


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
    buffer: Buffer,
    kind: BodyKind,
    content_type: bytes | None,
    scan: ObjectScan | None = None,
    document: Mapping[str, Any] | None = None,
) -> Generator[None, None, RequestFields]:
    """The fields of a body of ``kind`` in ``buffer``, a step at a time
    (given ``scan``, a JSON body's object found already, and ``document``,
    that object parsed)."""
    if kind is BodyKind.FORM:
        values = form_values(buffer, content_type or b"", _MODEL)
        if values is None or len(values) > 1:
            return RequestFields(kind, problem=BodyProblem.FORM_UNREADABLE)
        return RequestFields(kind, model=values[0] if values else None)
    if kind is not BodyKind.JSON:
        return RequestFields(kind)
    try:
        if scan is None:
            scan = yield from scan_object(buffer, _KEYS)
        return (yield from _json_fields(buffer, scan, document))
    except NotAnObject as e:
        return RequestFields(kind, problem=BodyProblem[e.problem.name])


def _json_fields(
    buffer: Buffer, scan: ObjectScan, document: Mapping[str, Any] | None
) -> Generator[None, None, RequestFields]:
    def decoded(member: Member | None, limit: int = MODEL_BYTES) -> Any:
        # Read from the parsed object where there is one: the last of a key.
        if document is None or member is None or member.value_end - member.value_start > limit:
            return _decoded(buffer, member, limit)
        return document[member.key]

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
        model = decoded(member)
        if model is None:
            # A bad escape in it: no parser would take the body.
            return RequestFields(BodyKind.JSON, problem=BodyProblem.NOT_JSON)
    # The last of a key counts, as for json.loads.
    last = {m.key: m for m in members}
    cachings = [m for m in members if m.key == CACHING]
    caching = decoded(cachings[-1], _NUMBER_BYTES) if cachings else None
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
        if name in last:
            value = decoded(last[name], _NUMBER_BYTES)
            if isinstance(value, int) and not isinstance(value, bool):
                numbers[name] = value
    usage_splice = None
    if stream and not include_usage:
        # Its members once the "caching" ones are cut.
        remaining = scan.count - len(cachings)
        usage_splice = _usage_splice(scan, remaining, options, inner, usage)
    return RequestFields(
        BodyKind.JSON,
        model=model,
        stream=stream,
        include_usage=include_usage,
        numbers=MappingProxyType(numbers) if numbers else _NO_NUMBERS,
        usage_splice=usage_splice,
        caching=caching if isinstance(caching, bool) else None,
        cuts=_cuts(cachings) if cachings else (),
        model_at=(models[0].value_start, models[0].value_end) if model is not None else None,
        read_by_model=tuple(last[name] for name in MODEL_READS if name in last),
    )


def _cuts(members: Sequence[Member]) -> tuple[Splice, ...]:
    """The edits that take ``members`` (in the body's order) out of their
    object, with their commas: each run of them next to each other is cut
    up to the member after it, or else from the end of the value before it."""
    runs: list[list[Member]] = []
    for member in members:
        if runs and runs[-1][-1].next_start == member.start:
            runs[-1].append(member)
        else:
            runs.append([member])
    cuts = []
    for together in runs:
        first, last = together[0], together[-1]
        if last.next_start is not None:
            cuts.append(Splice(first.start, last.next_start, b""))
        elif first.previous_end is not None:
            cuts.append(Splice(first.previous_end, last.value_end, b""))
        else:
            cuts.append(Splice(first.start, last.value_end, b""))
    return tuple(cuts)


def _usage_splice(
    scan: ObjectScan,
    remaining: int,
    options: Member | None,
    inner: ObjectScan | None,
    usage: Member | None,
) -> Splice:
    """The edit that makes ``stream_options.include_usage`` true: in the body
    ``scan`` (which keeps ``remaining`` members of its own), whose
    ``options`` (if any) is the object ``inner`` (if it is one) holding
    ``usage`` (if it does)."""
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
    comma = b"," if remaining else b""
    return Splice(at, at, b'"stream_options":{"include_usage":true}' + comma)


def _token(buffer: Buffer, member: Member | None) -> bytes | None:
    """The first bytes of a member's value: enough to tell ``true``."""
    if member is None:
        return None
    return bytes(buffer[member.value_start : min(member.value_end, member.value_start + 8)])


def content_texts(content: object) -> Iterator[str]:
    """The texts of a chat message's ``content``: a string, or the text parts
    of a list of parts (images and audio are no text)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def _decoded(buffer: Buffer, member: Member | None, limit: int = MODEL_BYTES) -> Any:
    """A member's (short) value as Python; None for a long or undecodable one."""
    if member is None or member.value_end - member.value_start > limit:
        return None
    try:
        return json.loads(buffer[member.value_start : member.value_end])
    except ValueError:
        # A bad escape in a string the walk stepped over.
        return None


#: Reads one item of a member a model reads: ``(name, item, listed)``,
#: ``listed`` when the item is an element of the member's list value; True
#: to stop.
ItemReader = Callable[[str, Any, bool], bool]


@define
class Inspected:
    """A request body and what was read from it."""

    body: RequestBody
    fields: RequestFields
    # Where a large body's later readings run, a step at a time; None: at once.
    cooperator: Cooperator | None = None
    # Parsed on first use (or given, read with the fields), for bodies in
    # memory only (see text_characters).
    _parsed: Any = field(default=None, repr=False)

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
    def caching(self) -> bool | None:
        """The client's ``"caching"``: true or false; None when it gave none."""
        return self.fields.caching

    @property
    def problem(self) -> BodyProblem | None:
        return self.fields.problem

    @property
    def is_json_object(self) -> bool:
        return self.fields.kind is BodyKind.JSON and self.fields.problem is None

    def parsed(self) -> dict[str, Any] | None:
        """The JSON body as Python objects, for one walked at once (parsing a
        larger one would hold the reactor); None for others. Shared: do not
        mutate. It still holds ``"caching"``."""
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

    def model_read_items(self, keep: frozenset[str], read: ItemReader) -> bool | Deferred[bool]:
        """Give ``read`` each item of the members a model reads
        (``MODEL_READS``): each element of a list, or the value itself, as
        Python values (objects with only the members named in ``keep``,
        unless the body is parsed whole anyway). Whether ``read`` stopped
        early; a Deferred of it for a large body, walked a step at a time.
        Raises (or fails with) ``NotAnObject`` for a body with more to read
        than a walk reads (``oaproxy.jsonscan.MAX_BRACKETS``)."""
        parsed = self.parsed()
        if parsed is not None:
            return any(read(*item) for item in parsed_items(parsed))
        members = self.fields.read_by_model
        if not self.is_json_object or not members:
            return False

        def walk(buffer: Buffer) -> Generator[None, None, bool]:
            for member in members:
                found = yield from kept_items(buffer, member, keep, partial(read, member.key))
                if found:
                    return True
            return False

        return _walked(self.body, walk, self.cooperator)

    def asks_usage_for(self, upstream: Upstream) -> bool:
        """Whether oaproxy adds ``include_usage`` to this upstream's request."""
        return upstream.stream_usage and self.fields.usage_splice is not None

    def body_for(self, upstream: Upstream, *, with_usage: bool = True) -> RequestBody:
        """The body ``upstream`` is sent: the client's without ``"caching"``,
        with the upstream's own name for an aliased model, and (with
        ``with_usage``) asking for usage when oaproxy does."""
        fields = self.fields
        splices = list(fields.cuts)
        alias = upstream.models.get(self.model) if self.model is not None else None
        if alias is not None and fields.model_at is not None:
            splices.append(Splice(*fields.model_at, json.dumps(alias).encode("ascii")))
        if with_usage and self.asks_usage_for(upstream):
            assert fields.usage_splice is not None
            splices.append(fields.usage_splice)
        return self.body.edited(*splices)


def parsed_items(body: Mapping[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """The items of the members a model reads in a parsed body, as
    ``Inspected.model_read_items`` gives them: ``(name, item, listed)``."""
    for name in MODEL_READS:
        value = body.get(name)
        if isinstance(value, list):
            for item in value:
                yield name, item, True
        elif value is not None:
            yield name, value, False


class Inspector:
    """Reads request bodies: at once when small, on ``cooperator`` otherwise."""

    def __init__(self, cooperator: Cooperator) -> None:
        self._cooperator = cooperator

    def __call__(
        self, body: RequestBody, content_type: bytes | None
    ) -> Inspected | Deferred[Inspected]:
        kind = body_kind(body.head[:WALK_AT_ONCE], content_type)
        found: RequestFields | Deferred[RequestFields]
        if kind is BodyKind.JSON and body.size > WALK_AT_ONCE:
            found = _walked(
                body, lambda buffer: _large_json_fields(buffer, content_type), self._cooperator
            )
        elif kind is BodyKind.JSON and body.data is not None and body.data.isascii():
            # Small and ASCII (most bodies): the C scanner finds the object,
            # which is kept for parsed().
            return _small_json(body, body.data, self._cooperator)
        elif kind in (BodyKind.JSON, BodyKind.FORM):
            # A form's parts are found by memmem: at once, whatever its size.
            found = _walked(body, lambda buffer: read_fields(buffer, kind, content_type), None)
        else:
            # Nothing in it is read (a large upload, say).
            found = RequestFields(kind)
        if isinstance(found, Deferred):
            return found.addCallback(lambda fields: Inspected(body, fields, self._cooperator))
        return Inspected(body, found, self._cooperator)


def _small_json(body: RequestBody, data: bytes, cooperator: Cooperator) -> Inspected:
    """A small ASCII JSON body inspected: through ``scan_text`` (the walk
    where it declines)."""
    found = scan_text(data.decode("ascii"), _KEYS)
    if found is None:
        return Inspected(body, run(read_fields(data, BodyKind.JSON, None)), cooperator)
    scan, document = found
    fields = run(read_fields(data, BodyKind.JSON, None, scan, document))
    return Inspected(body, fields, cooperator, document if fields.problem is None else None)


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


def _walked(
    body: RequestBody,
    walk: Callable[[Buffer], Generator[None, None, _T]],
    cooperator: Cooperator | None,
) -> _T | Deferred[_T]:
    """``walk`` over the body's bytes: at once without a cooperator or for a
    small body, else a step at a time (cancelling the Deferred stops it). A
    body in its spool file is read through a read-only map of the file."""
    if body.data is not None:
        if cooperator is None or body.size <= WALK_AT_ONCE:
            return run(walk(body.data))
        return _stepped(cooperator, walk(body.data))
    mapped = _mapped(body)
    if cooperator is None:
        with mapped:
            return run(walk(mapped))
    return _stepped(cooperator, _dropping_pages(mapped, walk(mapped))).addBoth(_closing(mapped))


def _stepped(cooperator: Cooperator, walk: Generator[None, None, _T]) -> Deferred[_T]:
    found: list[_T] = []
    task = cooperator.cooperate(stepped(walk, found.append))
    # Cancelled (the client went away), the walk stops where it is.
    result: Deferred[_T] = Deferred(lambda _: task.stop())
    task.whenDone().addCallbacks(lambda _: result.callback(found[0]), result.errback)
    return result


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
