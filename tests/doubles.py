"""In-memory doubles for the fast tests of the forwarder, relay, routing and web layer.

- ``RecordingAgent``: an ``IAgent`` like treq's ``_agentspy`` that records each
  ``request()`` call (an ``AgentCall``); the test fires (or fails) the
  response by hand, or never, and sees whether the caller cancelled it.
- ``FakeResponse``: an ``IResponse`` whose body the test delivers chunk by
  chunk and ends with ``ResponseDone``, ``ResponseFailed`` or
  ``PotentialDataLoss``; its ``UpstreamTransport`` records pause, resume and
  stop, the calls by which the relay drives the upstream connection.
  ``ChunkConsumer`` keeps what a body producer writes.
- ``make_config``: a ``Config`` through the real parser; ``bare_exchange``:
  an exchange as a candidate filter sees it; ``headers``: Twisted
  ``Headers`` from a mapping.
- ``Harness`` and ``Client``: the real ``ProxySite`` (built by the daemon's
  own factory) on a ``StringTransport``, with a ``Clock``, the recording
  agents and a cooperator driven by the clock; ``Client.reply()`` parses what
  the site wrote back (``parse_reply``, ``dechunk``, ``Reply``). A ``Client``
  talks to any ``Site``.
- ``Scrape``: a Prometheus exposition, parsed.
- Around the proxy: ``SinkCounters`` (a sink as metrics and readiness see
  it), ``capture_log`` (every log event of a test), ``run_cli`` (the command
  line in process).

(Real sockets and processes are in ``tests.live``; request bodies and SSE
chunks in ``tests.payloads``; records in ``tests.records``.)
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from attrs import define, field, frozen
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer

from oaproxy.cli import main as cli_main
from oaproxy.config import Config, parse_config
from oaproxy.exchange import Exchange
from oaproxy.generation import Shared, build_generation
from oaproxy.pipeline import Observer
from oaproxy.record import Record, record_document
from oaproxy.web import ProxySite
from tests.payloads import chat_body, http_request

# The wall-clock time the harness gives records (the reactor clock starts at 0).
WALL_TIME = 1_700_000_000.0


def make_config(yaml_text: str, environ: Mapping[str, str] | None = None) -> Config:
    """A ``Config`` from YAML text, through the real parser."""
    return parse_config(yaml_text, "test.yaml", environ or {})


# ---------------------------------------------------------------------------
# The upstream side


class _Bare:
    """Attributes as given; compared by identity, and weakly referable."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


def words_as_said(text: str, extra: str | None = None) -> str:
    """A ``credentials.Words`` that changes nothing: for tests of texts as they come."""
    return text


def bare_exchange(route: str | None = None) -> Exchange:
    """An exchange as a candidate filter may see it: its call's route, and
    an identity of its own (breakers key their probes by it, weakly)."""
    return cast(Exchange, _Bare(call=_Bare(route=route)))


def headers(pairs: Mapping[str, str | list[str]] | None = None) -> Headers:
    """Twisted ``Headers`` from a mapping of names to one value or a list."""
    result = Headers()
    for name, value in (pairs or {}).items():
        values = value if isinstance(value, list) else [value]
        result.setRawHeaders(name.encode("latin-1"), [v.encode("latin-1") for v in values])
    return result


@implementer(IPushProducer)
class UpstreamTransport:
    """The transport a response body protocol sees; records what is asked of it."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @property
    def paused(self) -> int:
        return self.events.count("pause")

    @property
    def resumed(self) -> int:
        return self.events.count("resume")

    @property
    def stopped(self) -> bool:
        return "stop" in self.events or "lose" in self.events or "abort" in self.events

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")

    def loseConnection(self) -> None:
        self.events.append("lose")

    def abortConnection(self) -> None:
        self.events.append("abort")


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test delivers by hand.

    Body events sent before ``deliverBody`` are held and replayed to the
    protocol, as twisted.web's own ``Response`` does.
    """

    def __init__(
        self,
        code: int = 200,
        headers: Headers | None = None,
        phrase: bytes = b"OK",
        length: int | object = UNKNOWN_LENGTH,
    ) -> None:
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = phrase
        self.headers = headers if headers is not None else Headers()
        self.length = length
        self.request = None
        self.previousResponse: IResponse | None = None
        self.transport = UpstreamTransport()
        self.protocol: Protocol | None = None
        self._held: list[bytes | Failure] = []
        self.ended = False

    def deliverBody(self, protocol: Protocol) -> None:
        assert self.protocol is None, "deliverBody called twice"
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        held, self._held = self._held, []
        for item in held:
            self._deliver(item)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def _deliver(self, item: bytes | Failure) -> None:
        if self.protocol is None:
            self._held.append(item)
        elif isinstance(item, Failure):
            self.protocol.connectionLost(item)
        else:
            self.protocol.dataReceived(item)

    def write(self, data: bytes) -> FakeResponse:
        assert not self.ended, "the body already ended"
        self._deliver(data)
        return self

    def _end(self, reason: Failure) -> None:
        assert not self.ended, "the body already ended"
        self.ended = True
        self._deliver(reason)

    def finish(self) -> None:
        """A clean end: Content-Length reached or the last chunk read."""
        self._end(Failure(ResponseDone()))

    def lose(self) -> None:
        """The connection closed a body that had no length: maybe whole."""
        self._end(Failure(PotentialDataLoss()))

    def fail(self, reason: BaseException | None = None) -> None:
        """The connection broke in the middle of the body."""
        cause = reason if reason is not None else ConnectionLost("upstream went away")
        self._end(Failure(ResponseFailed([Failure(cause)])))


@implementer(IConsumer)
class ChunkConsumer:
    """A body producer's consumer that keeps each chunk written to it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        raise AssertionError("body producers do not register with their consumer")

    def unregisterProducer(self) -> None:
        raise AssertionError("body producers do not register with their consumer")


@define(eq=False)
class AgentCall:
    """One ``IAgent.request`` call, and the means to answer it."""

    method: bytes
    uri: bytes
    headers: Headers
    producer: IBodyProducer | None
    deferred: Deferred[IResponse] = field(init=False)
    cancelled: bool = False
    chunks: list[bytes] = field(factory=list)
    body_finished: bool = False
    response: FakeResponse | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def host(self) -> str:
        """The first label of the host asked: "a" for ``https://a.test/v1/…``."""
        return self.uri.split(b"//")[1].split(b".")[0].decode()

    def header(self, name: bytes) -> list[bytes] | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else list(values)

    def json(self) -> Any:
        return json.loads(self.body)

    def respond(
        self,
        code: int = 200,
        content_type: bytes | None = b"application/json",
        body: bytes | None = None,
        headers: Headers | None = None,
        phrase: bytes = b"OK",
    ) -> FakeResponse:
        """Fire the response headers; with ``body`` also the whole body."""
        response_headers = headers if headers is not None else Headers()
        if content_type is not None:
            response_headers.setRawHeaders(b"content-type", [content_type])
        response = FakeResponse(code, response_headers, phrase)
        self.response = response
        self.deferred.callback(cast(IResponse, response))
        if body is not None:
            response.write(body)
            response.finish()
        return response

    def fail(self, error: BaseException) -> None:
        self.deferred.errback(Failure(error))


@implementer(IAgent)
class RecordingAgent:
    """An agent that records each request; the test answers it by hand.

    The request body is produced into the call at once, like an agent
    writing it to the connection (a ``FileBodyProducer`` needs the clock
    advanced). Cancelling a call's Deferred marks it ``cancelled`` and stops
    its body producer; ``cancel_error`` imitates twisted's HTTP client,
    which fails a cancelled request with
    ``ResponseNeverReceived([Failure(CancelledError())])``.
    """

    def __init__(self, cancel_error: Callable[[], BaseException] | None = None) -> None:
        self.calls: list[AgentCall] = []
        self._cancel_error = cancel_error

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        assert isinstance(method, bytes) and isinstance(uri, bytes)
        assert bodyProducer is None or IBodyProducer.providedBy(bodyProducer)
        call = AgentCall(method, uri, headers if headers is not None else Headers(), bodyProducer)
        producer: Any = bodyProducer

        def cancel(d: Deferred[IResponse]) -> None:
            call.cancelled = True
            if producer is not None and not call.body_finished:
                producer.stopProducing()
            if self._cancel_error is not None:
                d.errback(Failure(self._cancel_error()))

        call.deferred = Deferred(cancel)
        self.calls.append(call)
        if producer is not None:
            produced: Deferred[None] = producer.startProducing(ChunkConsumer(call.chunks))

            def finished(result: object) -> None:
                call.body_finished = True

            produced.addBoth(finished)
        return call.deferred

    def only(self) -> AgentCall:
        assert len(self.calls) == 1, f"{len(self.calls)} calls, not 1"
        return self.calls[0]


# ---------------------------------------------------------------------------
# The client side


@frozen
class Reply:
    """An HTTP response as the client received it."""

    status: int
    phrase: bytes
    headers: Headers
    body: bytes
    # The whole body arrived (Content-Length reached, or the last chunk).
    complete: bool

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        if values is None:
            return None
        assert len(values) == 1, f"{name!r}: {values!r}"
        return values[0]

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(data: bytes) -> Reply:
    """Parse one HTTP/1.1 response (the first one in ``data``)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.split(b"\r\n")
    version, status, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
    assert version == b"HTTP/1.1", lines[0]
    parsed = Headers()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed.addRawHeader(name.strip(), value.strip())
    code = int(status)
    length = parsed.getRawHeaders(b"content-length")
    if code in (204, 304):
        return Reply(code, phrase, parsed, b"", rest == b"")
    if parsed.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body, complete = dechunk(rest)
        return Reply(code, phrase, parsed, body, complete)
    if length is not None:
        size = int(length[0])
        return Reply(code, phrase, parsed, rest[:size], len(rest) >= size)
    return Reply(code, phrase, parsed, rest, False)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body, up to where it stops, and whether it was complete."""
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, data.startswith(b"\r\n")
        if len(data) < size + 2:
            return body + data[:size], False
        assert data[size : size + 2] == b"\r\n", "bad chunk framing"
        body += data[:size]
        data = data[size + 2 :]


class Scrape:
    """A Prometheus text exposition, parsed, with lookups by sample name and
    exact labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the series with exactly these labels; None if it does not exist."""
        for sample in self.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
        return None

    def count(self, name: str, **labels: str) -> float:
        """As ``value``, 0 where the series does not exist (a counter not yet hit)."""
        value = self.value(name, **labels)
        return 0.0 if value is None else value

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = labels.items()
        return sum(
            float(s.value) for s in self.samples if s.name == name and wanted <= s.labels.items()
        )

    def series(self, name: str) -> list[dict[str, str]]:
        """The label sets of every series of ``name``."""
        return [s.labels for s in self.samples if s.name == name]

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value ``label`` takes in the series of ``name``."""
        return {labels[label] for labels in self.series(name) if label in labels}


class Client:
    """One client connection to a site, on an in-memory transport."""

    def __init__(self, site: Site, peer: str = "10.1.2.3") -> None:
        address = IPv4Address("TCP", peer, 40000)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8888), peerAddress=address
        )
        protocol = site.buildProtocol(address)
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> Client:
        self.protocol.dataReceived(data)
        return self

    def reply(self) -> Reply:
        return parse_reply(self.transport.value())

    @property
    def written(self) -> bytes:
        return self.transport.value()

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone("client went away")))

    def pause(self) -> None:
        """The client's socket buffer is full: the transport pauses its producer."""
        self._producer().pauseProducing()

    def resume(self) -> None:
        self._producer().resumeProducing()

    def _producer(self) -> Any:
        # The HTTPChannel, registered with its transport at connectionMade.
        producer = self.transport.producer
        assert producer is not None
        return producer


class ExchangeLog(Observer):
    """Keeps each finished request's exchange, for tests that look inside."""

    def __init__(self, exchanges: list[Exchange]) -> None:
        self._exchanges = exchanges

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        self._exchanges.append(exchange)


class Harness:
    """The real resource tree and site, built by the daemon's own factory
    (``build_generation``), with a clock, recording agents and a cooperator
    on the clock."""

    def __init__(
        self,
        config: str | Config,
        *,
        rng: random.Random | None = None,
        cancel_error: Callable[[], BaseException] | None = None,
    ) -> None:
        self.config = make_config(config) if isinstance(config, str) else config
        self.clock = Clock()
        self.agent = RecordingAgent(cancel_error)
        self.fresh_agent = RecordingAgent(cancel_error)
        alert_agent = RecordingAgent()
        self.shared = Shared.create(
            self.clock,
            self.config,
            agents=lambda proxy: cast(IAgent, self.agent),
            fresh_agents=lambda proxy: cast(IAgent, self.fresh_agent),
            alert_agents=lambda proxy: cast(IAgent, alert_agent),
            environ={},
            wall_clock=lambda: WALL_TIME,
            rng=rng,
        )
        self.cooperator = self.shared.cooperator
        self.records: list[Record] = []
        self.shared.records.add_observer(
            cast(ILogObserver, lambda event: self.records.append(event["record"]))
        )
        self.exchanges: list[Exchange] = []
        self.generation = build_generation(
            self.config, self.shared, observers=[ExchangeLog(self.exchanges)]
        )
        # As the daemon's swap_in does (the sinks are the daemon's to run).
        self.shared.follow(self.generation)
        self.pipeline = self.generation.pipeline
        self.forwarder = self.generation.forwarder
        self.site = ProxySite(
            self.generation.root, self.config, self.shared.metrics, reactor=self.clock
        )

    def connect(self, peer: str = "10.1.2.3") -> Client:
        return Client(self.site, peer)

    def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes = b"",
        header_lines: Iterable[tuple[bytes, bytes]] = (),
        *,
        peer: str = "10.1.2.3",
        chunked: bool = False,
    ) -> Client:
        client = self.connect(peer)
        client.send(http_request(method, path, body, header_lines, chunked=chunked))
        return client

    def chat(
        self,
        model: str = "gpt-4o-mini",
        *,
        key: str | None = "sk-client",
        stream: bool = False,
        extra: Mapping[str, Any] | None = None,
        header_lines: Iterable[tuple[bytes, bytes]] = (),
        peer: str = "10.1.2.3",
    ) -> Client:
        """A chat completion request, as an OpenAI SDK sends it."""
        lines = [(b"Content-Type", b"application/json"), *header_lines]
        if key is not None:
            lines.append((b"Authorization", b"Bearer " + key.encode("ascii")))
        body = chat_body(model, stream=stream, **(extra or {}))
        return self.request(b"POST", b"/v1/chat/completions", body, lines, peer=peer)

    def record(self) -> dict[str, Any]:
        """The one record made so far, in its stored form."""
        assert len(self.records) == 1, f"{len(self.records)} records, not 1"
        return record_document(self.records[0])


# ---------------------------------------------------------------------------
# Around the proxy: sinks, logs, the command line


@define
class SinkCounters:
    """What metrics and readiness read of a record sink: its counters alone."""

    queued: int = 0
    written: int = 0
    spilled: int = 0
    dropped: int = 0
    failures: int = 0


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    """A log observer that keeps every event."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


def capture_log(case: SynchronousTestCase) -> EventList:
    """Every log event of the rest of ``case``, from the global publisher."""
    events = EventList()
    observer = cast(ILogObserver, events)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def run_cli(*argv: str, now: float | None = None) -> tuple[int, str, str]:
    """``oaproxy`` run in process with ``argv``: its exit status, stdout and
    stderr; ``now`` is its clock for relative times (else the real time)."""
    out, err = io.StringIO(), io.StringIO()
    clock: Callable[[], float] = time.time if now is None else lambda: now
    status = cli_main(list(argv), stdout=out, stderr=err, clock=clock)
    return status, out.getvalue(), err.getvalue()
