"""A fake outbound HTTP proxy on a real socket (127.0.0.1:0), scripted by the test.

``FakeProxy`` records the head of every request it gets (``ProxiedRequest``:
method, target, headers) and then, unless told to ``refuse`` with a status:

- ``CONNECT host:port``: answers 200 and tunnels the connection to
  ``127.0.0.1:port`` (whatever the host: every test server is local), bytes
  passed both ways untouched;
- an absolute-form request (``POST http://host:port/path``): sends it on to
  ``127.0.0.1:port`` in origin form, with ``Connection: close`` and without
  ``Proxy-Authorization``, and relays the answer; one request per connection.

``arrived`` fires with the next request it records.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure


@frozen
class ProxiedRequest:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]  # lower-case names

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())


class _Relay(Protocol):
    """The proxy's connection to where a request goes; relays what comes back."""

    def __init__(self, client: _ProxyConnection, first: bytes) -> None:
        self._client = client
        self._first = first

    def connectionMade(self) -> None:
        self._client.relay = self
        transport: Any = self.transport
        transport.write(self._first)
        self._client.resume()

    def dataReceived(self, data: bytes) -> None:
        self._client.send(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._client.close()

    def send(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def close(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()


class _RelayFactory(ClientFactory):
    noisy = False

    def __init__(self, client: _ProxyConnection, first: bytes) -> None:
        self._client = client
        self._first = first

    def buildProtocol(self, addr: Any) -> _Relay:
        return _Relay(self._client, self._first)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._client.send(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        self._client.close()


class _ProxyConnection(Protocol):
    def __init__(self, proxy: FakeProxy) -> None:
        self._proxy = proxy
        self._buffer = b""
        self._request: ProxiedRequest | None = None
        self._tunnel = False
        self.relay: _Relay | None = None

    def connectionMade(self) -> None:
        self._proxy.open.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None and self._tunnel:
            self.relay.send(data)
            return
        self._buffer += data
        if self._request is None:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self._buffer = rest
            self._request = self._parse(head)
            self._proxy.record(self._request)
            if self._proxy.refuse is not None:
                status = self._proxy.refuse
                self.send(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % status)
                self.close()
                return
            if self._request.method == b"CONNECT":
                self._open_tunnel(self._request)
                return
        self._forward()

    def _parse(self, head: bytes) -> ProxiedRequest:
        line, *lines = head.split(b"\r\n")
        method, target, _ = line.split(b" ", 2)
        headers = {}
        for header in lines:
            name, _, value = header.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return ProxiedRequest(method, target, headers)

    def _open_tunnel(self, request: ProxiedRequest) -> None:
        self._tunnel = True
        port = int(request.target.rpartition(b":")[2])
        self.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        transport: Any = self.transport
        transport.pauseProducing()
        self._proxy.connect(port, _RelayFactory(self, self._buffer))
        self._buffer = b""

    def _forward(self) -> None:
        request = self._request
        assert request is not None
        length = int(request.header(b"content-length") or b"0")
        if self.relay is not None or len(self._buffer) < length:
            return
        target = urlsplit(request.target.decode("ascii"))
        path = target.path + (f"?{target.query}" if target.query else "")
        lines = [b"%s %s HTTP/1.1" % (request.method, path.encode("ascii"))]
        for name, value in request.headers.items():
            if name not in (b"proxy-authorization", b"connection"):
                lines.append(name + b": " + value)
        lines.append(b"connection: close")
        first = b"\r\n".join(lines) + b"\r\n\r\n" + self._buffer[:length]
        self._buffer = b""
        transport: Any = self.transport
        transport.pauseProducing()
        assert target.port is not None
        self._proxy.connect(target.port, _RelayFactory(self, first))

    def resume(self) -> None:
        transport: Any = self.transport
        transport.resumeProducing()

    def send(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def close(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._proxy.open.remove(self)
        if self.relay is not None:
            self.relay.close()


class FakeProxy(Factory):
    noisy = False

    def __init__(self, reactor: Any, refuse: int | None = None) -> None:
        self._reactor = reactor
        #: The status every request is refused with; None: served.
        self.refuse = refuse
        self.requests: list[ProxiedRequest] = []
        self.open: list[_ProxyConnection] = []
        self._waiting: list[Deferred[ProxiedRequest]] = []
        self._port: Any = None

    def start(self) -> str:
        """Listen; the proxy's URL without credentials (``http://127.0.0.1:N``)."""
        self._port = self._reactor.listenTCP(0, self, interface="127.0.0.1")
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        port: int = self._port.getHost().port
        return port

    def stop(self) -> Any:
        for connection in list(self.open):
            transport: Any = connection.transport
            transport.abortConnection()
        return self._port.stopListening()

    def buildProtocol(self, addr: Any) -> _ProxyConnection:
        return _ProxyConnection(self)

    def connect(self, port: int, factory: ClientFactory) -> None:
        self._reactor.connectTCP("127.0.0.1", port, factory)

    def record(self, request: ProxiedRequest) -> None:
        self.requests.append(request)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(request)

    def arrived(self) -> Deferred[ProxiedRequest]:
        d: Deferred[ProxiedRequest] = Deferred()
        self._waiting.append(d)
        return d
