"""An upstream's response as the forwarder sees it (an ``IResponse``), and
the response headers as llhttp hands them over, made into ``Headers`` cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

if TYPE_CHECKING:
    from oaproxy.upstreamclient.protocol import UpstreamConnection

# Shared like twisted.internet.protocol.connectionDone: body protocols only
# check() it, and a complete response is the common case.
RESPONSE_DONE = Failure(ResponseDone("Response body fully received"))

_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}


# -- response headers ---------------------------------------------------------


def _headers_by_storage() -> bool:
    """Whether a ``Headers`` can be given its name -> values dict directly.

    ``Headers.addRawHeader`` canonicalizes the name and sanitizes the value on
    every call (about 3 µs for a typical response's headers); llhttp already
    refused values with CR, LF or NUL, so the dict is built here with the names
    canonicalized once per distinct spelling, and handed over (1.5 µs). Only
    when Twisted stores headers the way this probe expects; otherwise the
    public API is used.
    """
    probe = Headers()
    probe.addRawHeader(b"x-probe-name", b"v")
    return getattr(probe, "_rawHeaders", None) == {b"X-Probe-Name": [b"v"]}


_BY_STORAGE = _headers_by_storage()
CANONICAL_NAMES: dict[bytes, bytes] = {}
# Like Twisted's own cache: an upstream inventing names cannot grow it forever.
_MAXCANONICAL_NAMES = 10_000


def canonical_name(name: bytes) -> bytes:
    probe = Headers()
    probe.addRawHeader(name, b"")
    canonical = next(iter(probe.getAllRawHeaders()))[0]
    if len(CANONICAL_NAMES) < _MAXCANONICAL_NAMES:
        CANONICAL_NAMES[name] = canonical
    return canonical


def add_header(raw: dict[bytes, list[bytes]], name: bytes, value: bytes) -> None:
    """One header as llhttp read it, added to ``raw`` under its canonical
    name (``make_headers``' input), stripped of trailing blanks as
    twisted.web strips them."""
    canonical = CANONICAL_NAMES.get(name) or canonical_name(name)
    value = value.rstrip(b" \t")
    values = raw.get(canonical)
    if values is None:
        raw[canonical] = [value]
    else:
        values.append(value)


def make_headers(raw: dict[bytes, list[bytes]]) -> Headers:
    headers = Headers()
    if _BY_STORAGE:
        headers._rawHeaders = raw
    else:
        for name, values in raw.items():
            headers.setRawHeaders(name, values)
    return headers


def is_chunked(transfer_encoding: list[bytes]) -> bool:
    """llhttp's rule: the body is chunked when the last coding is ``chunked``."""
    return transfer_encoding[-1].rsplit(b",", 1)[-1].strip().lower() == b"chunked"


# -- the response --------------------------------------------------------------


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """A response as Twisted's ``Agent`` gives it: ``code``, ``phrase``,
    ``headers``, ``length`` and ``deliverBody``.

    It is also its body's transport: the protocol given to ``deliverBody``
    can ``pauseProducing``/``resumeProducing`` the upstream connection and
    ``stopProducing`` it (which aborts the connection; the protocol's
    ``connectionLost`` then comes when it is closed). Once the body ended
    these do nothing, as the connection may be serving another request.
    Body bytes that arrive before ``deliverBody`` are held for it.
    """

    __slots__ = (
        "_buffer",
        "_connection",
        "_ended",
        "_protocol",
        "_version",
        "code",
        "headers",
        "length",
        "phrase",
    )

    previousResponse = None
    request = None

    def __init__(
        self,
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
        version: str,
        connection: UpstreamConnection,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._version = version
        self._connection: UpstreamConnection | None = connection
        self._protocol: Any = None
        self._buffer: list[bytes] = []
        self._ended: Failure | None = None

    @property
    def version(self) -> tuple[bytes, int, int]:
        return _VERSIONS.get(self._version, (b"HTTP", 1, 1))

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self)
        if self._buffer:
            held, self._buffer = self._buffer, []
            for data in held:
                protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
        else:
            self._protocol = protocol

    # The body's transport.

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause_body()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume_body()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection.stop_body(self)

    # What Twisted's body transport also answers (readBody aborts with it).
    loseConnection = abortConnection = stopProducing

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError("1xx responses are skipped, not kept")

    # From the connection.

    def _end(self, reason: Failure) -> None:
        self._connection = None
        self._ended = reason
        protocol = self._protocol
        if protocol is not None:
            # The protocol keeps its transport (this); no cycle is left for the GC.
            self._protocol = None
            protocol.connectionLost(reason)
