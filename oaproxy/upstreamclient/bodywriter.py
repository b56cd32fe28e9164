"""Writing one request body to an upstream connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web._newclient import ExcessWrite, WrongBodyLength
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from oaproxy.upstreamclient.protocol import UpstreamConnection

# -- the request body -----------------------------------------------------------


@implementer(IConsumer)
class BodyWriter:
    """Writes one request body: framed by its length (which it must match) or
    chunked. The first write goes out together with the request head, in one
    TLS record where there is TLS. Once closed it refuses writes, so a
    producer that outlives its request can never write into the next one.
    """

    __slots__ = (
        "_chunked",
        "_connection",
        "_head",
        "_left",
        "_open",
        "_producer",
        "_registered",
        "_transport",
    )

    def __init__(
        self, connection: UpstreamConnection, transport: Any, head: bytes, producer: IBodyProducer
    ) -> None:
        self._connection = connection
        self._transport = transport
        self._head: bytes | None = head
        self._producer = producer
        length = producer.length
        self._chunked = length is UNKNOWN_LENGTH
        self._left: int = 0 if self._chunked else length
        self._open = True
        self._registered = False

    def start(self) -> None:
        try:
            produced = self._producer.startProducing(self)
        except Exception:  # noqa: BLE001 - any producer error fails this request
            self._failed(Failure())
            return
        if produced.called and not isinstance(produced.result, Failure):
            # A body written at once (bytes in memory): no callbacks to run.
            self._produced(None)
            return
        if self._open:
            self._transport.registerProducer(self._producer, True)
            self._registered = True
        produced.addCallbacks(self._produced, self._failed)

    def write(self, data: bytes) -> None:
        if not self._open:
            raise ExcessWrite()
        size = len(data)
        if not size:
            return
        if self._chunked:
            parts = [b"%x\r\n" % size, data, b"\r\n"]
        else:
            self._left -= size
            if self._left < 0:
                self._failed(Failure(WrongBodyLength("too many bytes written")))
                raise ExcessWrite()
            parts = [data]
        if self._head is not None:
            parts.insert(0, self._head)
            self._head = None
        self._transport.writeSequence(parts)

    @property
    def all_written(self) -> bool:
        return self._head is None and not self._chunked and self._left == 0

    def _produced(self, _: object) -> None:
        if not self._open:
            return
        if not self._chunked and self._left:
            self._failed(Failure(WrongBodyLength("too few bytes written")))
            return
        parts = []
        if self._head is not None:
            parts.append(self._head)
            self._head = None
        if self._chunked:
            parts.append(b"0\r\n\r\n")
        if parts:
            self._transport.writeSequence(parts)
        self._close()
        self._connection.request_written()

    def _failed(self, failure: Failure) -> None:
        if not self._open:
            return
        self._close()
        self._connection.request_failed(failure)

    def stop(self) -> None:
        """The request ended before its body was written: stop the producer."""
        if not self._open:
            return
        self._close()
        self._producer.stopProducing()

    def _close(self) -> None:
        self._open = False
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    # IConsumer: the body producer is registered with the transport itself.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass
