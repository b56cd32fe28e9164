"""What routing needs from a request body: the model, the stream flag.

The body is parsed once, and only when it is JSON held in memory; a
per-upstream body (``stream_options.include_usage`` added) is made lazily,
once, for the first upstream that wants it.

``"caching"`` (openai-forward's parameter, read by the response cache) is
taken out of every JSON body before it goes anywhere: OpenAI refuses
parameters it does not know.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import define, field

from oaproxy.capture import NOT_JSON, RequestFields, json_body, request_fields, with_stream_usage
from oaproxy.config import Upstream
from oaproxy.relay import RequestBody

CACHING = "caching"


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
    _with_usage: RequestBody | None = field(default=None, init=False, repr=False)

    @property
    def parsed(self) -> dict[str, Any] | None:
        """The body's JSON object (without "caching"); shared: do not mutate it."""
        return self._fields.parsed

    def asks_usage_for(self, upstream: Upstream) -> bool:
        """Whether oaproxy adds ``include_usage`` to this upstream's request."""
        return (
            self.stream
            and upstream.stream_usage
            and not self.include_usage
            and self._fields.parsed is not None
        )

    def body_for(self, upstream: Upstream) -> RequestBody:
        if not self.asks_usage_for(upstream):
            return self.body
        if self._with_usage is None:
            assert self._fields.parsed is not None
            data = with_stream_usage(self._fields.parsed)
            self._with_usage = RequestBody(size=len(data), data=data)
        return self._with_usage


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
