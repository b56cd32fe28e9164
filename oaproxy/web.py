"""The HTTP front: the resource tree, the body cap, reading a request's client
address, OpenAI-shaped error answers.

``/v1/*`` and each route prefix's ``<route>/v1/*`` go to the request
pipeline of the config that made the tree (``oaproxy.pipeline``; paths are
read by ``oaproxy.paths``); ``OPTIONS`` is a CORS preflight; ``/healthz`` says
the process serves; ``/admin/`` is the admin API (``oaproxy.admin.resource``).
No route prefix can shadow these (``config.values.RESERVED_ROOTS``). A reload
puts a new tree in the site (``ProxySite.serve``): new requests use it, those
in flight keep theirs.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from oaproxy.answers import write_answer
from oaproxy.errors import ErrorAnswer
from oaproxy.headers import UPSTREAM_HEADER
from oaproxy.paths import route_of

if TYPE_CHECKING:
    from oaproxy.pipeline import Pipeline

# Bodies up to this size are read into memory (they are parsed for the model
# anyway); larger ones stay in twisted.web's spool file and are replayed from it.
IN_MEMORY_BODY = 1024 * 1024

CORS_HEADERS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-methods": b"GET, POST, PUT, PATCH, DELETE, OPTIONS",
    b"access-control-max-age": b"86400",
    # Browser clients may read which upstream answered.
    b"access-control-expose-headers": UPSTREAM_HEADER,
}


class ProxyRequest(server.Request):
    """A request whose body is capped at ``max_body_bytes`` while it arrives,
    and whose answer carries oaproxy's own headers.

    Over the cap the rest of the body is read and thrown away (never held),
    and the resource answers 413.

    ``answer_headers`` are put on whatever answer the request gets, when its
    head is written: an answer of oaproxy's own (a refusal, a cache hit), a
    relayed upstream answer or stream, alike; they replace the upstream's
    headers of the same name (a limit's ``x-ratelimit-*`` describe the
    client's limit, the upstream's the shared upstream key).
    """

    too_large = False
    received = 0
    _limit = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # twisted.web would parse form bodies into request.args, reading a
        # whole multipart upload into memory: a proxy passes them on untouched.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        self.answer_headers = Headers()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            for name, values in self.answer_headers.getAllRawHeaders():
                self.responseHeaders.setRawHeaders(name, values)
        super().write(data)

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
    """The site of every listener; ``serve`` puts a config's resource tree in
    place for the requests that come next (those in flight keep theirs)."""

    requestFactory = ProxyRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, max_body_bytes: int, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.max_body_bytes = max_body_bytes

    def serve(self, root: Resource, max_body_bytes: int) -> None:
        self.resource = root
        self.max_body_bytes = max_body_bytes

    def log(self, request: http.Request) -> None:
        """No access log line: each request's record says more, in the sinks."""


def answer_headers(request: server.Request) -> Headers:
    """The headers oaproxy gives this request's answer (see ``ProxyRequest``)."""
    return cast(ProxyRequest, request).answer_headers


class ProxyResource(Resource):
    """``/v1/*`` (and ``<route>/v1/*``): CORS, then the request pipeline of
    one config."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return self

    def render(self, request: server.Request) -> bytes | int:
        for name, value in CORS_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"server", b"oaproxy")
        if request.method == b"OPTIONS":
            return self._preflight(request)
        return self.pipeline.handle(request)

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


def declared_size(request: server.Request) -> int:
    """The body's size without reading it (what arrived, or was announced)."""
    if getattr(request, "too_large", False):
        return int(request.received)  # type: ignore[attr-defined]
    content = cast(IO[bytes], request.content)
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def peer(request: server.Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "unix"


def client_ip(request: server.Request, trusted: tuple[Any, ...]) -> str:
    """The client's address: the peer, or ``X-Forwarded-For`` from a trusted proxy.

    Walks the forwarded chain from the right and stops at the first address
    that is not a trusted proxy, so a client cannot forge its own entry.
    """
    peer_address = peer(request)
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    if not forwarded or not trusted:
        return peer_address
    chain = [
        part.strip().decode("ascii", "replace") for value in forwarded for part in value.split(b",")
    ]
    chain.append(peer_address)
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
        return write_answer(
            request,
            ErrorAnswer(
                404,
                f"Unknown path {request.path.decode('utf-8', 'replace')}; the API is under /v1/.",
                code="not_found",
            ),
        )


class RoutedResource(ProxyResource):
    """``<route>/v1/*``: the whole path is the pipeline's to read."""

    isLeaf = True


class RootResource(Resource):
    def __init__(
        self,
        proxy: ProxyResource,
        *,
        metrics: Resource,
        ready: Resource,
        routes: Collection[str] = (),
        admin: Resource | None = None,
    ) -> None:
        super().__init__()
        proxy.putChild(b"metrics", metrics)
        self.putChild(b"v1", proxy)
        self.putChild(b"metrics", metrics)
        self.putChild(b"healthz", HealthResource())
        self.putChild(b"readyz", ready)
        if admin is not None:
            self.putChild(b"admin", admin)
        self._routes = tuple(routes)
        self._routed = RoutedResource(proxy.pipeline)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if self._routes and route_of(request.uri, self._routes) is not None:
            return self._routed
        return NotFoundResource()
