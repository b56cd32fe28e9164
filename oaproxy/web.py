"""The HTTP front: the resource tree, the body cap, reading a request's client
address, OpenAI-shaped error answers.

``/v1/*`` and each route prefix's ``<route>/v1/*`` go to the request
pipeline of the config that made the tree (``oaproxy.pipeline``; paths are
read by ``oaproxy.paths``); ``OPTIONS`` is a CORS preflight
(``oaproxy.cors``); ``/healthz`` says the process serves; ``/admin/`` is the
admin API (``oaproxy.admin.resource``). No route prefix can shadow these
(``config.values.RESERVED_ROOTS``). A reload puts a new tree in the site
(``ProxySite.serve``): new requests use it, those in flight keep theirs.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection, Sequence
from enum import Enum
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http import NO_BODY_CODES, datetimeToString, unquote
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from oaproxy.answerhead import (
    OAPROXY_SERVER,
    TWISTED_SERVER,
    DateLine,
    Fields,
    head_parts,
    single_lines,
)
from oaproxy.answers import write_answer
from oaproxy.bodybudget import BodyBudget
from oaproxy.channel import ClientClose, ProxyChannel
from oaproxy.config import Config
from oaproxy.cors import CorsPolicy
from oaproxy.descriptors import connection_cap
from oaproxy.errors import ErrorAnswer
from oaproxy.logthrottle import RepeatLimit
from oaproxy.paths import route_of

if TYPE_CHECKING:
    from oaproxy.metrics import Metrics
    from oaproxy.pipeline import Pipeline

# Bodies up to this size are read into memory; larger ones stay in
# twisted.web's spool file, are read there for their model and replayed from it.
IN_MEMORY_BODY = 1024 * 1024

#: The methods the OpenAI API uses; any other gets 405 and is never forwarded.
API_METHODS: tuple[bytes, ...] = (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS")


class BodyRefusal(Enum):
    """Why a body was thrown away as it came (the resource then says so)."""

    TOO_LARGE = "over max_body_bytes"  # 413
    BUSY = "over max_inflight_body_bytes"  # 503


class ProxyRequest(server.Request):
    """A request whose body is capped at ``max_body_bytes`` while it arrives,
    counted against the site's ``BodyBudget`` until the request ends, and
    whose answer carries oaproxy's own headers.

    A body over the cap, or a large one over the budget, is read and thrown
    away (never held), and the resource answers 413 or 503 (``refused``).

    ``answer_headers`` are put on whatever answer the request gets, when its
    head is written: an answer of oaproxy's own (a refusal, a cache hit), a
    relayed upstream answer or stream, alike; they replace the upstream's
    headers of the same name (a limit's ``x-ratelimit-*`` describe the
    client's limit, the upstream's the shared upstream key).

    The head is written in one pass (``oaproxy.answerhead``): the ``Server``
    and ``Date`` lines ready-made, then the upstream's headers passed on
    (``pass_headers``), those set on the request and ``answer_headers``,
    each copied once, into the head itself.
    """

    refused: BodyRefusal | None = None
    received = 0
    _limit = 0
    # What this body holds of the budget, and whether it is counted as it comes.
    _held = 0
    _counted_as_it_comes = False

    # The answer's Server line (oaproxy's own answers say oaproxy), and the
    # upstream's headers passed on (``pass_headers``).
    server_line = TWISTED_SERVER
    passed: Fields = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # twisted.web would parse form bodies into request.args, reading a
        # whole multipart upload into memory: a proxy passes them on untouched.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        self.answer_headers = Headers()

    def process(self) -> None:
        """twisted.web's, but for the ``Server`` and ``Date`` it would set on
        every request's headers: the head writes them ready-made."""
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = self.site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:  # noqa: BLE001 - as twisted.web: any failure is answered 500
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if self.startedWriting or self._inFakeHead or self.finished or self._disconnected:
            # twisted.web's: the body, or its refusals.
            super().write(data)
            return
        if self._write_head():
            super().write(data)
        else:
            # HEAD, 204, 304: no body, whatever is written.
            self.write = _no_body  # type: ignore[method-assign]

    def _write_head(self) -> bool:
        """Write the head in one pass (``oaproxy.answerhead``); whether a body
        follows."""
        self.startedWriting = 1
        code = self.code
        extra: list[tuple[bytes, Sequence[bytes]]] = []
        if self.lastModified is not None and not self.responseHeaders.hasHeader(b"Last-Modified"):
            extra.append((b"Last-Modified", [datetimeToString(self.lastModified)]))
        if self.etag is not None:
            extra.append((b"ETag", [self.etag]))
        if self.cookies:
            extra.append((b"Set-Cookie", self.cookies))
        parts, chunked = head_parts(
            (self.clientproto, b" ", b"%d" % code, b" ", self.code_message, b"\r\n"),
            self.server_line,
            self.channel.site.date.line(),  # type: ignore[attr-defined]
            (
                self.passed,
                self.responseHeaders.getAllRawHeaders(),
                self.answer_headers.getAllRawHeaders(),
            ),
            chunkable=self.clientproto == b"HTTP/1.1" and self.method != b"HEAD",
            code=code,
            default_type=self.defaultContentType,
            extra=extra,
        )
        self.chunked = chunked
        self.channel.writeSequence(parts)
        return self.method != b"HEAD" and code not in NO_BODY_CODES

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site  # type: ignore[attr-defined]
        self._limit = site.config.max_body_bytes
        self._budget: BodyBudget = site.bodies
        if length is not None and length > self._limit:
            self._refuse(BodyRefusal.TOO_LARGE, length)
        elif length is not None and not self._budget.take(length, length):
            self._refuse(BodyRefusal.BUSY, length)
        else:
            self._held = length or 0
            # Chunked: counted as it comes, against the budget then.
            self._counted_as_it_comes = length is None
            self.notifyFinish().addBoth(self._give_back)
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused is not None:
            return
        self.received += len(data)
        if self.received > self._limit:
            cast("IO[bytes]", self.content).close()
            self._refuse(BodyRefusal.TOO_LARGE, self.received)
            return
        if self._counted_as_it_comes:
            if not self._budget.take(len(data), self.received):
                cast("IO[bytes]", self.content).close()
                self._refuse(BodyRefusal.BUSY, self.received)
                return
            self._held += len(data)
        cast("IO[bytes]", self.content).write(data)

    def _refuse(self, why: BodyRefusal, received: int) -> None:
        self.refused = why
        self.received = received
        # No "100 Continue" for a body that will be refused anyway.
        self.requestHeaders.removeHeader(b"expect")
        self.content = BytesIO()
        self._give_back(None)

    def _give_back(self, result: object) -> None:
        held, self._held = self._held, 0
        if held:
            self._budget.give_back(held)


class ProxySite(server.Site):
    """The site of every listener; ``serve`` puts a config's resource tree in
    place for the requests that come next (those in flight keep theirs).

    What the connections say about their clients goes through ``client_log``,
    whose repeated lines are rate-limited. Past ``max_connections`` open
    client connections (fewer when the descriptor limit allows no more:
    ``oaproxy.descriptors``) new ones are closed at once, and counted.
    """

    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, config: Config, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.metrics = metrics
        self._repeats = RepeatLimit(globalLogPublisher, self.reactor)
        self.client_log = Logger(namespace="oaproxy.clients", observer=self._repeats)
        self.open_connections = 0
        # One budget for the process: the bodies in flight outlive a reload.
        self.bodies = BodyBudget(config.max_inflight_body_bytes, metrics.front.body_bytes_held)
        self.date = DateLine(self.reactor)
        self.serve(root, config)

    def serve(self, root: Resource, config: Config) -> None:
        self.resource = root
        self.config = config
        self.max_connections = connection_cap(config.max_connections)
        self.bodies.limit = config.max_inflight_body_bytes

    # Any: twisted.web says its HTTP/2-capable wrapper; this site makes ProxyChannels.
    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.open_connections >= self.max_connections:
            # None: the listening port closes the socket at once.
            self.metrics.front.connection_refused()
            self.client_log.info(
                "refusing client connections while {cap} are open, such as {peer}",
                cap=self.max_connections,
                peer=getattr(addr, "host", None) or "unix",
            )
            return None
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.metrics.front.connections_open(self.open_connections)

    def connection_lost(self) -> None:
        self.open_connections -= 1
        self.metrics.front.connections_open(self.open_connections)

    def connection_closed_for(self, why: ClientClose) -> None:
        self.metrics.front.connection_closed(why)

    def stopFactory(self) -> None:
        super().stopFactory()
        self._repeats.flush()

    def log(self, request: http.Request) -> None:
        """No access log line: each request's record says more, in the sinks."""


def answer_headers(request: server.Request) -> Headers:
    """The headers oaproxy gives this request's answer (see ``ProxyRequest``)."""
    return cast(ProxyRequest, request).answer_headers


def pass_headers(request: server.Request, passed: Sequence[tuple[bytes, Sequence[bytes]]]) -> None:
    """The upstream's headers (canonical names, as a ``Headers`` gives them)
    that this request's answer passes on, before those set on the request."""
    cast(ProxyRequest, request).passed = single_lines(passed)


def _no_body(data: bytes) -> None:
    """What a HEAD, 204 or 304 answer writes of its body."""


class ProxyResource(Resource):
    """``/v1/*`` (and ``<route>/v1/*``): CORS, then the request pipeline of
    one config."""

    def __init__(self, pipeline: Pipeline, cors: CorsPolicy) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.cors = cors

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return self

    def render(self, request: server.Request) -> bytes | int:
        cast(ProxyRequest, request).server_line = OAPROXY_SERVER
        origin = request.getHeader(b"origin")
        if request.method == b"OPTIONS":
            asked = request.getHeader(b"access-control-request-headers")
            self.cors.preflight_headers(origin, asked, answer_headers(request))
            return self._preflight(request)
        self.cors.answer_headers(origin, answer_headers(request))
        return self.pipeline.handle(request)

    def _preflight(self, request: server.Request) -> int:
        request.setResponseCode(204)
        # Finished here: twisted.web would add "Content-Length: 0" to a
        # returned b"", which a 204 must not carry.
        request.finish()
        return server.NOT_DONE_YET


def declared_size(request: server.Request) -> int:
    """The body's size without reading it (what arrived, or was announced)."""
    if getattr(request, "refused", None) is not None:
        return int(request.received)  # type: ignore[attr-defined]
    content = cast("IO[bytes]", request.content)
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
        self._routed = RoutedResource(proxy.pipeline, proxy.cors)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if self._routes and route_of(request.uri, self._routes) is not None:
            return self._routed
        return NotFoundResource()
