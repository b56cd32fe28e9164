"""The HTTP front: resource tree, body cap, client auth, OpenAI-shaped errors.

``/v1/*`` is proxied for every method; ``OPTIONS`` is a CORS preflight;
``/healthz`` says the process serves. The resources read the current
``Runtime`` (config, router, forwarder) through a callable on every request,
so a reload swaps it for new requests while those in flight keep theirs.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from io import BytesIO
from typing import IO, Any, cast
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from oaproxy.config import Config
from oaproxy.errors import ErrorAnswer, error_body
from oaproxy.forward import Call, Exchange, Forwarder
from oaproxy.headers import forwarded_for
from oaproxy.inspection import Inspected
from oaproxy.record import Outcome
from oaproxy.relay import RequestBody
from oaproxy.routing import Caller, Router

# Bodies up to this size are read into memory (they are parsed for the model
# anyway); larger ones stay in twisted.web's spool file and are replayed from it.
IN_MEMORY_BODY = 1024 * 1024

CORS_HEADERS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-methods": b"GET, POST, PUT, PATCH, DELETE, OPTIONS",
    b"access-control-max-age": b"86400",
}


@frozen
class Runtime:
    """What one config makes: built once per (re)load, never per request."""

    config: Config
    router: Router
    forwarder: Forwarder
    # Called when a request goes to the forwarder (in-flight, active gauges),
    # and once per client request when it is over (records, metrics, alerts).
    started: Callable[[Exchange, server.Request], None]
    finished: Callable[[Exchange, server.Request], None]
    # Parses the body for routing: model, stream, the per-upstream body.
    inspect: Callable[[RequestBody, bytes | None], Inspected]
    # Wall-clock time for records (the reactor's clock may be a test Clock).
    wall_clock: Callable[[], float]


class ProxyRequest(server.Request):
    """A request whose body is capped at ``max_body_bytes`` while it arrives.

    Over the cap the rest of the body is read and thrown away (never held),
    and the resource answers 413.
    """

    too_large = False
    received = 0
    _limit = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # twisted.web would parse form bodies into request.args, reading a
        # whole multipart upload into memory: a proxy passes them on untouched.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        self._limit = self.channel.site.max_body_bytes  # type: ignore[attr-defined]
        if length is not None and length > self._limit:
            self.received = length
            # No "100 Continue" for a body that will be refused anyway.
            self.requestHeaders.removeHeader(b"expect")
            self._discard()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self.received += len(data)
        if self.received > self._limit:
            cast(IO[bytes], self.content).close()
            self._discard()
            return
        cast(IO[bytes], self.content).write(data)

    def _discard(self) -> None:
        self.too_large = True
        self.content = BytesIO()


class ProxySite(server.Site):
    requestFactory = ProxyRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, runtime: Callable[[], Runtime], **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._runtime = runtime

    @property
    def max_body_bytes(self) -> int:
        return self._runtime().config.max_body_bytes

    def log(self, request: http.Request) -> None:
        """No access log line: each request's record says more, in the sinks."""


def answer_error(request: server.Request, error: ErrorAnswer) -> bytes:
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class ProxyResource(Resource):
    """``/v1/*``: authenticate, choose candidates, hand over to the forwarder."""

    log = Logger()

    def __init__(self, runtime: Callable[[], Runtime], clock: Any) -> None:
        super().__init__()
        self._runtime = runtime
        self._clock = clock

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return self

    def render(self, request: server.Request) -> bytes | int:
        for name, value in CORS_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"server", b"oaproxy")
        if request.method == b"OPTIONS":
            return self._preflight(request)
        runtime = self._runtime()
        uri: bytes = request.uri
        content_type = request.getHeader(b"content-type")
        caller = runtime.router.authenticate(request.getHeader(b"authorization"))
        path = route_path(uri)
        refusal = self._refusal(request, runtime, caller, path)
        if refusal is not None:
            # Refused before the body is read or parsed: a client without a
            # key cannot make the reactor parse 64 MiB of JSON for a 401.
            body = RequestBody(size=_declared_size(request), data=None)
        else:
            body = _request_body(cast(IO[bytes], request.content), content_type)
        inspected = runtime.inspect(body, content_type)
        exchange = Exchange(
            call=Call(
                method=request.method,
                path=uri,
                upstream_path=uri[3:],
                headers=request.requestHeaders,
                inspected=inspected,
                authorization=request.getHeader(b"authorization"),
                forwarded_for=forwarded_for(request.requestHeaders, _peer(request)),
            ),
            started=self._clock.seconds(),
            time=runtime.wall_clock(),
            key_name=caller.key.name if caller.key is not None else None,
            client_ip=client_ip(request, runtime.config.trusted_proxies),
            user_agent=_text(request.getHeader(b"user-agent")),
        )
        if refusal is not None:
            return self._refuse(request, runtime, exchange, refusal)
        assert path is not None
        candidates = runtime.router.candidates(caller, inspected.model, path)
        if isinstance(candidates, ErrorAnswer):
            return self._refuse(request, runtime, exchange, candidates)
        runtime.started(exchange, request)
        self._forward(request, runtime, exchange, candidates)
        return server.NOT_DONE_YET

    def _refusal(
        self, request: server.Request, runtime: Runtime, caller: Caller, path: str | None
    ) -> ErrorAnswer | None:
        """An answer that needs no look at the body, or None."""
        if getattr(request, "too_large", False):
            return ErrorAnswer(
                413,
                f"Request body too large: the limit is {runtime.config.max_body_bytes} bytes.",
                code="request_too_large",
            )
        if path is None:
            return ErrorAnswer(
                400,
                "Invalid path: the API is under /v1/, spelled plainly, with no '.' or '..' segments.",
                code="invalid_path",
            )
        return runtime.router.unauthorized(caller)

    def _refuse(
        self, request: server.Request, runtime: Runtime, exchange: Exchange, error: ErrorAnswer
    ) -> bytes:
        """Answer an error of oaproxy's own; it is recorded like any request."""
        body = answer_error(request, error)
        exchange.status = error.status
        exchange.outcome = Outcome.CLIENT_ERROR
        exchange.response_body = body
        exchange.bytes_out = len(body)
        exchange.ttfb = exchange.finished = self._clock.seconds()
        exchange.ttfb -= exchange.started
        runtime.finished(exchange, request)
        return body

    def _forward(
        self, request: server.Request, runtime: Runtime, exchange: Exchange, candidates: Any
    ) -> None:
        work: list[Deferred[Exchange]] = []

        def client_gone(reason: Failure) -> None:
            exchange.client_disconnected()
            if work:
                work[0].cancel()

        # Subscribed first: a disconnect at any point reaches the upstream.
        request.notifyFinish().addErrback(client_gone)
        d = runtime.forwarder.forward(request, exchange, candidates)
        work.append(d)

        def done(result: Exchange | Failure) -> None:
            if isinstance(result, Failure) and not exchange.client_gone:
                self.log.failure("forwarding failed", failure=result)
                _fail_unfinished(request)
                exchange.outcome = Outcome.ERROR
            exchange.finished = self._clock.seconds()
            runtime.finished(exchange, request)

        d.addBoth(done).addErrback(
            lambda failure: self.log.failure("finishing a request failed", failure=failure)
        )

    def _preflight(self, request: server.Request) -> int:
        asked = request.getHeader(b"access-control-request-headers")
        request.setHeader(
            b"access-control-allow-headers",
            asked or b"authorization, content-type, openai-beta",
        )
        request.setResponseCode(204)
        # Finished here: twisted.web would add "Content-Length: 0" to a
        # returned b"", which a 204 must not carry.
        request.finish()
        return server.NOT_DONE_YET


def _fail_unfinished(request: server.Request) -> None:
    """A bug must still answer the client, never leave it hanging."""
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        request.channel.transport.abortConnection()  # type: ignore[union-attr]
        return
    body = error_body("Internal proxy error.", type="server_error", code="internal_error")
    request.setResponseCode(500)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def route_path(uri: bytes) -> str | None:
    """The request path as routing sees it: percent-decoded, without empty
    segments (so ``/v1//files`` or ``/v1/%66iles`` cannot slip past
    ``deny: [/v1/files]``); None for a path with ``.`` or ``..`` segments,
    which no API has and which would climb out of an upstream's base path.

    None too unless the raw path starts with the bytes ``/v1``: twisted.web
    finds this resource through the decoded ``%761``, but the upstream URL is
    the endpoint plus the raw path after those three bytes, which must not be
    anything else (``/%761/x`` would make ``https://10.0.0.1`` ``…161/x``).
    """
    raw = uri.split(b"?", 1)[0]
    if not raw.startswith(b"/v1") or raw[3:4] not in (b"", b"/"):
        return None
    decoded = unquote_to_bytes(raw).decode("utf-8", "replace")
    segments = [segment for segment in decoded.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        return None
    return "/" + "/".join(segments)


def _declared_size(request: server.Request) -> int:
    """The body's size without reading it (what arrived, or was announced)."""
    if getattr(request, "too_large", False):
        return int(request.received)  # type: ignore[attr-defined]
    content = cast(IO[bytes], request.content)
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def _request_body(content: IO[bytes], content_type: bytes | None) -> RequestBody:
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    # JSON is read whatever its size: its model decides the route.
    if size <= IN_MEMORY_BODY or (content_type or b"").startswith(b"application/json"):
        return RequestBody(size=size, data=content.read())
    return RequestBody(size=size, data=None, file=content)


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None


def _peer(request: server.Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "unix"


def client_ip(request: server.Request, trusted: tuple[Any, ...]) -> str:
    """The client's address: the peer, or ``X-Forwarded-For`` from a trusted proxy.

    Walks the forwarded chain from the right and stops at the first address
    that is not a trusted proxy, so a client cannot forge its own entry.
    """
    peer = _peer(request)
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    if not forwarded or not trusted:
        return peer
    chain = [
        part.strip().decode("ascii", "replace") for value in forwarded for part in value.split(b",")
    ]
    chain.append(peer)
    for hop in reversed(chain):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop
        if not any(address in network for network in trusted):
            return hop
    return chain[0]


class HealthResource(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"status": "ok"}).encode("ascii")


class NotFoundResource(Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return answer_error(
            request,
            ErrorAnswer(
                404,
                f"Unknown path {request.path.decode('utf-8', 'replace')}; the API is under /v1/.",
                code="not_found",
            ),
        )


class RootResource(Resource):
    def __init__(self, proxy: ProxyResource, *, metrics: Resource, ready: Resource) -> None:
        super().__init__()
        proxy.putChild(b"metrics", metrics)
        self.putChild(b"v1", proxy)
        self.putChild(b"metrics", metrics)
        self.putChild(b"healthz", HealthResource())
        self.putChild(b"readyz", ready)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFoundResource()
