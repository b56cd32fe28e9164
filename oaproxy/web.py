"""The HTTP front: the resource tree, the body cap, reading a request's path
and client address, OpenAI-shaped error answers.

``/v1/*`` goes to the request pipeline of the config that made the tree
(``oaproxy.pipeline``); ``OPTIONS`` is a CORS preflight; ``/healthz`` says
the process serves; ``/admin/`` is the admin API (``oaproxy.admin.resource``). A reload puts a new tree in the site
(``ProxySite.serve``): new requests use it, those in flight keep theirs.
"""

from __future__ import annotations

import ipaddress
import json
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import unquote_to_bytes

from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from oaproxy.errors import ErrorAnswer

if TYPE_CHECKING:
    from oaproxy.pipeline import Pipeline

# Bodies up to this size are read into memory (they are parsed for the model
# anyway); larger ones stay in twisted.web's spool file and are replayed from it.
IN_MEMORY_BODY = 1024 * 1024

CORS_HEADERS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-methods": b"GET, POST, PUT, PATCH, DELETE, OPTIONS",
    b"access-control-max-age": b"86400",
}


class ProxyRequest(server.Request):
    """A request whose body is capped at ``max_body_bytes`` while it arrives.

    Over the cap the rest of the body is read and thrown away (never held),
    and the resource answers 413.

    ``answer_headers`` are put on whatever answer the request gets, when its
    head is written: an error of oaproxy's own, a relayed upstream answer or
    stream, alike; they replace the upstream's headers of the same name
    (a limit's ``x-ratelimit-*`` describe the client's limit, the upstream's
    the shared upstream key).
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


def answer_error(request: server.Request, error: ErrorAnswer) -> bytes:
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class ProxyResource(Resource):
    """``/v1/*``: CORS, then the request pipeline of one config."""

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
        return answer_error(
            request,
            ErrorAnswer(
                404,
                f"Unknown path {request.path.decode('utf-8', 'replace')}; the API is under /v1/.",
                code="not_found",
            ),
        )


class RootResource(Resource):
    def __init__(
        self,
        proxy: ProxyResource,
        *,
        metrics: Resource,
        ready: Resource,
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

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFoundResource()
