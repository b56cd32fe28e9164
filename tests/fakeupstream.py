"""A fake OpenAI-compatible upstream on a real socket, scripted by the test.

``FakeUpstream`` serves a twisted.web resource on ``tcp:0:interface=127.0.0.1``
in the test's reactor. What it answers is decided per request: a queue of
one-shot behaviours (``fake.script(...)``), else ``fake.default`` (``Auto()``
answers like OpenAI by path). Every request is recorded (method, path,
headers, body) with ``ended()``, a Deferred that says when its response ended
and whether the connection was lost first, so a test can assert what the
proxy sent and that it hung up.

``ConnectionTracker`` follows the server-side connections of any factory
(the fake's and the proxy's own site), so that cleanup can close them and wait
until the reactor is really clean: trial fails a test that leaves a socket.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from tests.payloads import FAKE_MODEL, error_body, sse_event, stream_chunk, usage_chunk

DEFAULT_CHUNKS = ("Hel", "lo, ", "wor", "ld!")
DEFAULT_USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


# Behaviours: what the fake does with one request.


@frozen
class Auto:
    """Answer like OpenAI, by path: chat (stream or not), embeddings, models,
    transcriptions (echoing a digest of the upload)."""


@frozen
class Chat:
    """A non-stream chat completion."""

    text: str = "Hello, world!"
    usage: dict[str, int] = field(factory=lambda: dict(DEFAULT_USAGE))


@frozen
class Stream:
    """An SSE chat completion stream.

    ``delay`` seconds pass (on the reactor) between two chunks. The usage chunk
    is sent only when the request asked for it (``stream_options.include_usage``),
    as OpenAI does. ``close_after``: the connection is aborted after that many
    content chunks (no final chunk, no ``[DONE]``; what was sent is flushed). ``hang_after``: after that
    many content chunks nothing more is ever sent. Without ``role_chunk`` the
    stream does not open with the usual ``{"role": "assistant"}`` chunk, so
    ``close_after=0``/``hang_after=0`` send the headers and not one event.
    ``chunk_id`` is every chunk's ``id``.
    """

    chunks: tuple[str, ...] = DEFAULT_CHUNKS
    delay: float = 0.0
    usage: dict[str, int] = field(factory=lambda: dict(DEFAULT_USAGE))
    close_after: int | None = None
    hang_after: int | None = None
    role_chunk: bool = True
    chunk_id: str = "chatcmpl-fake"


@frozen
class Embeddings:
    dimensions: int = 4


@frozen
class Models:
    ids: tuple[str, ...] = (FAKE_MODEL, "text-embedding-3-small", "whisper-1")


@frozen
class TranscriptionEcho:
    """Answers a multipart upload with the SHA-256, size and content type of
    its ``file`` part (and of the whole body), so a test can check that the
    bytes arrived exactly as the client sent them."""


@frozen
class Status:
    """Any status with an OpenAI-shaped error body (or ``body`` as given)."""

    code: int
    message: str = "fake upstream error"
    type: str = "server_error"
    error_code: str | None = None
    body: bytes | None = None

    def render_body(self) -> bytes:
        if self.body is not None:
            return self.body
        return json.dumps(error_body(self.message, self.error_code, self.type)).encode("utf-8")


@frozen
class Hang:
    """Never answer; the request stays open until the far end gives up."""


@frozen
class Drop:
    """Read the request, then close the connection without any answer."""


@frozen
class Wait:
    """Answer like ``then`` (a ``Chat``), but only once the test calls
    ``FakeUpstream.release()``: requests in flight together, for as long as
    the test needs."""

    then: Chat = field(factory=Chat)


Behaviour = (
    Auto | Chat | Stream | Embeddings | Models | TranscriptionEcho | Status | Hang | Drop | Wait
)


@define
class RecordedRequest:
    method: bytes
    path: bytes  # with the query
    headers: Headers
    body: bytes
    # "finished" (the response was sent whole) or "lost" (the connection
    # went away first: the proxy hung up); None while the request is open.
    ended_as: str | None = None
    # Reactor time at which the connection was lost (None while it is not).
    lost_at: float | None = None
    _waiters: list[Deferred[str]] = field(factory=list, repr=False)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def ended(self) -> Deferred[str]:
        """Fires with ``ended_as`` once the request is over."""
        if self.ended_as is not None:
            return succeed(self.ended_as)
        d: Deferred[str] = Deferred()
        self._waiters.append(d)
        return d

    def _end(self, how: str, when: float) -> None:
        self.ended_as = how
        if how == "lost":
            self.lost_at = when
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(how)


class ConnectionTracker:
    """Follows the connections a factory builds, to close them in cleanup.

    Patches the factory instance's ``buildProtocol`` (no wrapper protocol, so
    the transport the code under test sees is the real TCP transport).
    """

    def __init__(self, factory: Any) -> None:
        self.open: set[Any] = set()
        self._waiting: list[Deferred[None]] = []
        build = factory.buildProtocol

        def build_protocol(addr: Any) -> Any:
            protocol = build(addr)
            if protocol is not None:
                self._track(protocol)
            return protocol

        factory.buildProtocol = build_protocol

    def _track(self, protocol: Any) -> None:
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self.open.discard(protocol)
                if not self.open:
                    waiting, self._waiting = self._waiting, []
                    for d in waiting:
                        d.callback(None)

        protocol.connectionLost = connection_lost

    def close_all(self) -> Deferred[None]:
        """Abort every open connection; fire once all of them are gone."""
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for protocol in list(self.open):
            transport = _transport(protocol)
            if transport is not None:
                transport.abortConnection()
        return d


def _transport(protocol: Any) -> Any:
    # twisted.web's Site builds a _GenericHTTPChannelProtocol, a proxy whose
    # real channel (and transport) is in ``_channel``.
    transport = getattr(protocol, "transport", None)
    if transport is None:
        transport = getattr(getattr(protocol, "_channel", None), "transport", None)
    return transport


_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?')


def multipart_parts(body: bytes, content_type: bytes) -> dict[str, tuple[bytes, bytes]]:
    """{field name: (part content type, bytes)} of a multipart/form-data body."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ValueError("no multipart boundary")
    delimiter = b"--" + match.group(1)
    parts: dict[str, tuple[bytes, bytes]] = {}
    for raw in body.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            break
        head, _, content = raw[2:].partition(b"\r\n\r\n")
        # The CRLF before the next delimiter belongs to the delimiter.
        content = content[:-2] if content.endswith(b"\r\n") else content
        name_match = re.search(rb'name="([^"]*)"', head)
        type_match = re.search(rb"(?im)^content-type:\s*(.+?)\s*$", head)
        name = name_match.group(1).decode() if name_match else ""
        parts[name] = (type_match.group(1) if type_match else b"", content)
    return parts


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: server.Request) -> bytes | int:
        return self._fake._render(request)


class FakeUpstream:
    """A scripted OpenAI upstream on 127.0.0.1, port chosen by the OS."""

    def __init__(self, reactor: Any, default: Behaviour | None = None) -> None:
        self.reactor = reactor
        self.default: Behaviour = default if default is not None else Auto()
        self.requests: list[RecordedRequest] = []
        self._script: list[Behaviour] = []
        self._site = server.Site(_FakeResource(self))
        self._site.noisy = False
        self._site.displayTracebacks = False
        self.connections = ConnectionTracker(self._site)
        # IListeningPort and IDelayedCall: typed Any, as mypy without the
        # mypy-zope plugin cannot call methods through zope interfaces.
        self._port: Any = None
        self._timers: set[Any] = set()
        # Requests left open on purpose (Hang), finished by stop() if needed.
        self._open: set[server.Request] = set()
        # Requests that Wait for release().
        self._waiting: list[tuple[server.Request, RecordedRequest, Chat]] = []
        self._arrivals: list[tuple[int, Deferred[RecordedRequest]]] = []

    def script(self, *behaviours: Behaviour) -> None:
        """Answer the next requests with these, in order, then ``default``."""
        self._script.extend(behaviours)

    def release(self) -> None:
        """Answer every request that waits (``Wait``)."""
        waiting, self._waiting = self._waiting, []
        for request, recorded, then in waiting:
            self._open.discard(request)
            if request._disconnected:
                continue
            body = self._answer(request, recorded, then)
            assert isinstance(body, bytes)
            request.write(body)
            request.finish()

    def received(self, count: int = 1) -> Deferred[RecordedRequest]:
        """Fires with the ``count``-th request (1-based) once it has arrived."""
        if len(self.requests) >= count:
            return succeed(self.requests[count - 1])
        d: Deferred[RecordedRequest] = Deferred()
        self._arrivals.append((count, d))
        return d

    async def start(self) -> FakeUpstream:
        endpoint = serverFromString(self.reactor, "tcp:0:interface=127.0.0.1")
        self._port = await endpoint.listen(self._site)
        return self

    @property
    def port(self) -> int:
        assert self._port is not None
        port: int = self._port.getHost().port
        return port

    @property
    def endpoint(self) -> str:
        """The base URL an upstream's ``endpoint:`` takes."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> Deferred[Any]:
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            waits.append(Deferred.fromCoroutine(self._stop_listening(self._port)))
            self._port = None
        waits.append(self.connections.close_all())
        return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

    @staticmethod
    async def _stop_listening(port: Any) -> None:
        await port.stopListening()

    # Serving.

    def _later(self, delay: float, f: Callable[[], None]) -> None:
        timer: Any

        def run() -> None:
            self._timers.discard(timer)
            f()

        timer = self.reactor.callLater(delay, run)
        self._timers.add(timer)

    def _render(self, request: server.Request) -> bytes | int:
        assert request.content is not None
        request.content.seek(0)
        recorded = RecordedRequest(
            method=request.method,
            path=request.uri,
            headers=request.requestHeaders.copy(),
            body=request.content.read(),
        )

        def finished(_: None) -> None:
            recorded._end("finished", self.reactor.seconds())

        def lost(reason: Failure) -> None:
            self._open.discard(request)
            recorded._end("lost", self.reactor.seconds())

        request.notifyFinish().addCallbacks(finished, lost)
        self.requests.append(recorded)
        arrived = [(n, d) for n, d in self._arrivals if n == len(self.requests)]
        self._arrivals = [(n, d) for n, d in self._arrivals if n != len(self.requests)]
        for _, d in arrived:
            d.callback(recorded)
        behaviour = self._script.pop(0) if self._script else self.default
        if isinstance(behaviour, Auto):
            behaviour = self._auto(request, recorded)
        return self._answer(request, recorded, behaviour)

    def _auto(self, request: server.Request, recorded: RecordedRequest) -> Behaviour:
        path = request.path
        if path.endswith(b"/chat/completions"):
            try:
                stream = recorded.json().get("stream") is True
            except ValueError:
                return Status(400, "the body is not JSON", "invalid_request_error")
            return Stream() if stream else Chat()
        if path.endswith(b"/embeddings"):
            return Embeddings()
        if path.endswith(b"/models"):
            return Models()
        if path.endswith(b"/audio/transcriptions"):
            return TranscriptionEcho()
        return Status(404, f"no such path {path!r}", "invalid_request_error", "not_found")

    def _answer(
        self, request: server.Request, recorded: RecordedRequest, behaviour: Behaviour
    ) -> bytes | int:
        model = FAKE_MODEL
        try:
            asked = recorded.json()
            if isinstance(asked, dict) and isinstance(asked.get("model"), str):
                model = asked["model"]
        except ValueError:
            asked = None
        if isinstance(behaviour, Chat):
            return self._json(
                request,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": behaviour.text},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": behaviour.usage,
                },
            )
        if isinstance(behaviour, Embeddings):
            inputs = asked.get("input") if isinstance(asked, dict) else None
            count = len(inputs) if isinstance(inputs, list) else 1
            return self._json(
                request,
                {
                    "object": "list",
                    "data": [
                        {
                            "object": "embedding",
                            "index": i,
                            "embedding": [0.25 * (i + 1)] * behaviour.dimensions,
                        }
                        for i in range(count)
                    ],
                    "model": model,
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                },
            )
        if isinstance(behaviour, Models):
            return self._json(
                request,
                {
                    "object": "list",
                    "data": [
                        {"id": i, "object": "model", "created": 0, "owned_by": "fake"}
                        for i in behaviour.ids
                    ],
                },
            )
        if isinstance(behaviour, TranscriptionEcho):
            content_type = request.getHeader(b"content-type") or b""
            answer: dict[str, Any] = {
                "text": "transcribed",
                "content_type": content_type.decode("latin-1"),
                "body_sha256": hashlib.sha256(recorded.body).hexdigest(),
                "body_size": len(recorded.body),
            }
            try:
                parts = multipart_parts(recorded.body, content_type)
            except ValueError:
                parts = {}
            if "file" in parts:
                part_type, data = parts["file"]
                answer.update(
                    file_sha256=hashlib.sha256(data).hexdigest(),
                    file_size=len(data),
                    file_content_type=part_type.decode("latin-1"),
                )
            answer["fields"] = {
                name: data.decode("utf-8", "replace")
                for name, (_, data) in parts.items()
                if name != "file"
            }
            return self._json(request, answer)
        if isinstance(behaviour, Status):
            request.setResponseCode(behaviour.code)
            request.setHeader(b"content-type", b"application/json")
            return behaviour.render_body()
        if isinstance(behaviour, Hang):
            self._open.add(request)
            return server.NOT_DONE_YET
        if isinstance(behaviour, Wait):
            self._open.add(request)
            self._waiting.append((request, recorded, behaviour.then))
            return server.NOT_DONE_YET
        if isinstance(behaviour, Drop):
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.abortConnection()  # type: ignore[attr-defined]
            return server.NOT_DONE_YET
        if isinstance(behaviour, Stream):
            include_usage = (
                isinstance(asked, dict)
                and isinstance(asked.get("stream_options"), dict)
                and asked["stream_options"].get("include_usage") is True
            )
            self._stream(request, behaviour, model, include_usage)
            return server.NOT_DONE_YET
        raise AssertionError(f"unknown behaviour {behaviour!r}")

    def _json(self, request: server.Request, payload: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload).encode("utf-8")

    def _stream(
        self, request: server.Request, behaviour: Stream, model: str, include_usage: bool
    ) -> None:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        events: list[bytes] = []
        if behaviour.role_chunk:
            events.append(
                sse_event(
                    stream_chunk(
                        0, {"role": "assistant", "content": ""}, None, model, behaviour.chunk_id
                    )
                )
            )
        for index, text in enumerate(behaviour.chunks):
            if behaviour.close_after is not None and index == behaviour.close_after:
                events.append(b"CLOSE")
                break
            if behaviour.hang_after is not None and index == behaviour.hang_after:
                events.append(b"HANG")
                break
            events.append(
                sse_event(stream_chunk(0, {"content": text}, None, model, behaviour.chunk_id))
            )
        else:
            events.append(sse_event(stream_chunk(0, {}, "stop", model, behaviour.chunk_id)))
            if include_usage:
                events.append(sse_event(usage_chunk(behaviour.usage, model, behaviour.chunk_id)))
            events.append(b"data: [DONE]\n\n")
        self._open.add(request)
        # Status and headers go out at once, as OpenAI's do, before any event.
        request.write(b"")

        def send(rest: list[bytes]) -> None:
            if request._disconnected:
                return
            if not rest:
                self._open.discard(request)
                request.finish()
                return
            event, rest = rest[0], rest[1:]
            if event == b"CLOSE":
                self._open.discard(request)
                # No last chunk: the far end sees an unclean end of the body.
                # loseConnection, not abort: what was written still goes out.
                channel: Any = request.channel
                channel.transport.loseConnection()
                return
            if event == b"HANG":
                return
            request.write(event)
            self._later(behaviour.delay, lambda: send(rest))

        send(events)
