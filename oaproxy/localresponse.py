"""Answers made in the process, as ``IResponse``s the forwarder reads like an
upstream's: the echo upstream's, and Replicate's translated into OpenAI's.

A ``LocalResponse`` is a head and then body chunks, written by its maker as
they come and delivered to the body protocol as fast as that protocol's
consumer allows: while the client is slow (the relay pauses its transport)
chunks wait, and the connection behind the answer, if any, is paused too.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from oaproxy.errors import error_body

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


@implementer(IPushProducer)
class _LocalTransport:
    """What the body protocol of a local answer sees as its connection."""

    def __init__(self, response: LocalResponse) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response._pause()

    def resumeProducing(self) -> None:
        self._response._resume()

    def stopProducing(self) -> None:
        self._response._stop()

    loseConnection = abortConnection = stopProducing


@implementer(IResponse)
class LocalResponse:
    """An answer made here. ``write`` adds body bytes, ``finish`` ends it
    cleanly and ``fail`` not; ``behind`` is the connection it is made from
    (paused and stopped with it); ``on_stop`` is told when the reader gives
    up before the end."""

    version = (b"HTTP", 1, 1)
    length = UNKNOWN_LENGTH
    request = None
    previousResponse = None

    def __init__(
        self,
        code: int,
        content_type: bytes = JSON,
        headers: Headers | None = None,
        *,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.code = code
        self.phrase = RESPONSES.get(code, b"Unknown")
        self.headers = headers if headers is not None else Headers()
        self.headers.setRawHeaders(b"content-type", [content_type])
        self.behind: IPushProducer | None = None
        self._on_stop = on_stop
        self._protocol: Protocol | None = None
        self._chunks: deque[bytes] = deque()
        self._end: Failure | None = None
        self._paused = False
        self._stopped = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Protocol) -> None:
        self._protocol = protocol
        protocol.makeConnection(_LocalTransport(self))
        self._flush()

    def write(self, data: bytes) -> None:
        """More of the body; dropped once the reader went away."""
        if not self._stopped and self._end is None:
            self._chunks.append(data)
            self._flush()

    def finish(self) -> None:
        self._ended(Failure(ResponseDone()))

    def fail(self, reason: BaseException) -> None:
        self._ended(Failure(reason))

    def _ended(self, reason: Failure) -> None:
        if self._end is None and not self._stopped:
            self._end = reason
            self._flush()

    def _flush(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        while self._chunks and not self._paused and not self._stopped:
            protocol.dataReceived(self._chunks.popleft())
        if not self._chunks and self._end is not None and not self._stopped:
            end, self._end = self._end, None
            self._stopped = True
            protocol.connectionLost(end)

    def _pause(self) -> None:
        self._paused = True
        if self.behind is not None:
            self.behind.pauseProducing()

    def _resume(self) -> None:
        self._paused = False
        if self.behind is not None:
            self.behind.resumeProducing()
        self._flush()

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._chunks.clear()
        if self.behind is not None:
            self.behind.stopProducing()
        if self._on_stop is not None:
            self._on_stop()


def json_response(code: int, payload: Any) -> LocalResponse:
    """A whole JSON answer."""
    response = LocalResponse(code, JSON)
    response.write(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    response.finish()
    return response


def error_response(
    code: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    error_code: str | None = None,
    headers: Headers | None = None,
) -> LocalResponse:
    """An OpenAI-shaped error answer."""
    response = LocalResponse(code, JSON, headers)
    response.write(error_body(message, type=type, code=error_code))
    response.finish()
    return response


def sse_data(payload: Any) -> bytes:
    """One SSE event of JSON data, as OpenAI sends them."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class BadBody(ValueError):
    """A request body an upstream made here answers with 400; the message
    (plain words, for the client) says why."""


def request_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``BadBody`` when it is none."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise BadBody("The request body is not JSON.") from None
    if not isinstance(request, dict):
        raise BadBody("The request body must be a JSON object.")
    return request


@implementer(IConsumer)
class _Collector:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


#: An upstream made here (echo, Replicate) parses a request body whole, on
#: the reactor: up to this size, enough for a chat with a long context, and
#: a few milliseconds of parsing at most.
LOCAL_BODY_BYTES = 1024 * 1024


def too_large(producer: IBodyProducer | None, reader: str) -> LocalResponse | None:
    """413 for a body larger than an upstream made here reads (``reader``
    names it): over ``LOCAL_BODY_BYTES``."""
    if producer is None or producer.length is UNKNOWN_LENGTH or producer.length <= LOCAL_BODY_BYTES:
        return None
    return error_response(
        413,
        f"{reader} reads request bodies of up to {LOCAL_BODY_BYTES} bytes;"
        f" this one has {producer.length}.",
        error_code="request_too_large",
    )


def request_bytes(producer: IBodyProducer | None) -> Deferred[bytes]:
    """The whole body an ``IBodyProducer`` produces (at once for bodies in memory)."""
    if producer is None:
        return succeed(b"")
    collector = _Collector()
    produced: Deferred[None] = producer.startProducing(collector)
    return produced.addCallback(lambda _: b"".join(collector.parts))
