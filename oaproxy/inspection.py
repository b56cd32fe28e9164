"""What routing needs from a request body: the model, the stream flag.

The body is parsed once, and only when it is JSON held in memory; a
per-upstream body (the upstream's own name for an aliased model,
``stream_options.include_usage`` added) is made lazily, once for each
distinct rewrite, for the first upstream that wants it.

``"caching"`` (openai-forward's parameter, read by the response cache) is
taken out of every JSON body before it goes anywhere: OpenAI refuses
parameters it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from attrs import define, field, frozen

from oaproxy.config import Upstream
from oaproxy.relay import RequestBody

_COMPACT = (",", ":")
CACHING = "caching"


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


def _looks_like_json_object(body: bytes) -> bool:
    # Only the head is stripped: bodies may be tens of MiB.
    return body[:64].lstrip()[:1] == b"{"


@frozen
class RequestFields:
    """What the forwarder needs from a request body, parsed once.

    ``parsed`` is the decoded JSON object (None for non-JSON or invalid JSON
    bodies); it is shared, not copied: do not mutate it.
    """

    model: str | None
    stream: bool
    include_usage: bool
    parsed: dict[str, Any] | None = field(default=None, eq=False, repr=False)


NOT_JSON = RequestFields(model=None, stream=False, include_usage=False, parsed=None)


def request_fields(body: bytes, content_type: str | bytes | None) -> RequestFields:
    """Model, stream flag and ``stream_options.include_usage`` of a request body.

    A body is JSON when its content type says so or, failing that, when it
    starts with ``{`` (clients that forget the header).  Invalid JSON is not
    an error here: the upstream is the judge of that.
    """
    kind = media_type(content_type)
    if kind is not None and kind.startswith("multipart/"):
        return NOT_JSON
    is_json = kind is not None and (kind == "application/json" or kind.endswith("+json"))
    if not is_json and not _looks_like_json_object(body):
        return NOT_JSON
    parsed = parse_json(body)
    if not isinstance(parsed, dict):
        return NOT_JSON
    model = parsed.get("model")
    stream_options = parsed.get("stream_options")
    return RequestFields(
        model=model if isinstance(model, str) else None,
        stream=parsed.get("stream") is True,
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        parsed=parsed,
    )


def content_texts(content: object) -> Iterator[str]:
    """The texts of a chat message's ``content``: a string, or the text parts
    of a list of parts (images and audio are no text)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def with_stream_usage(parsed: Mapping[str, Any]) -> bytes:
    """The request body again, asking for usage in the stream's last chunk.

    Merges ``"include_usage": true`` into ``stream_options`` (other options
    kept); ``parsed`` is not modified.  The caller must send the new
    Content-Length.
    """
    return rewritten_body(parsed, model=None, include_usage=True)


def rewritten_body(parsed: Mapping[str, Any], *, model: str | None, include_usage: bool) -> bytes:
    """The request body again, with ``model`` in place of the client's (when
    given) and asking for usage in the stream (with ``include_usage``);
    ``parsed`` is not modified."""
    body = dict(parsed)
    if model is not None:
        body["model"] = model
    if include_usage:
        stream_options = body.get("stream_options")
        merged = dict(stream_options) if isinstance(stream_options, dict) else {}
        merged["include_usage"] = True
        body["stream_options"] = merged
    return json_body(body)


def json_body(value: Any) -> bytes:
    """``value`` as a compact JSON body, UTF-8."""
    try:
        return json.dumps(value, separators=_COMPACT, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a "\ud800" escape cannot be UTF-8; escape all.
        return json.dumps(value, separators=_COMPACT).encode("ascii")


@define
class Inspected:
    body: RequestBody
    model: str | None
    stream: bool
    # The client asked for usage itself, so the usage chunk is its own.
    include_usage: bool
    _fields: RequestFields = field(alias="fields", repr=False)
    # The client's "caching": true or false; None when it gave none.
    caching: bool | None = None
    # Rewritten bodies, by (the upstream's model name, whether usage is added).
    _rewritten: dict[tuple[str | None, bool], RequestBody] = field(
        factory=dict, init=False, repr=False
    )

    @property
    def parsed(self) -> dict[str, Any] | None:
        """The JSON body (without "caching"), parsed once; None for other bodies.
        Shared: do not mutate."""
        return self._fields.parsed

    def asks_usage_for(self, upstream: Upstream) -> bool:
        """Whether oaproxy adds ``include_usage`` to this upstream's request."""
        return (
            self.stream
            and upstream.stream_usage
            and not self.include_usage
            and self._fields.parsed is not None
        )

    def body_for(self, upstream: Upstream, *, with_usage: bool = True) -> RequestBody:
        """The body ``upstream`` is sent: with its own name for an aliased
        model, and (``with_usage``) asking for usage when oaproxy does."""
        parsed = self._fields.parsed
        usage = with_usage and self.asks_usage_for(upstream)
        alias = upstream.models.get(self.model) if self.model is not None else None
        if parsed is None or (alias is None and not usage):
            return self.body
        key = (alias, usage)
        body = self._rewritten.get(key)
        if body is None:
            data = rewritten_body(parsed, model=alias, include_usage=usage)
            body = self._rewritten[key] = RequestBody(size=len(data), data=data)
        return body


def inspect_request(body: RequestBody, content_type: bytes | None) -> Inspected:
    fields = NOT_JSON if body.data is None else request_fields(body.data, content_type)
    caching = None
    if fields.parsed is not None and CACHING in fields.parsed:
        given = fields.parsed[CACHING]
        caching = given if isinstance(given, bool) else None
        parsed = {name: value for name, value in fields.parsed.items() if name != CACHING}
        data = json_body(parsed)
        body = RequestBody(size=len(data), data=data)
        fields = attrs.evolve(fields, parsed=parsed)
    return Inspected(
        body=body,
        model=fields.model,
        stream=fields.stream,
        include_usage=fields.include_usage,
        fields=fields,
        caching=caching,
    )
