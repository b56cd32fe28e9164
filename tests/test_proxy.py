"""The outbound proxy in memory: the ``proxy:`` keys, the CONNECT tunnel, routes
per (proxy, origin), and where the credentials may and may not go. The
real-socket tests are in test_proxy_live.py."""

from __future__ import annotations

import base64
from textwrap import dedent
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from oaproxy.config import ConfigError, parse_config
from oaproxy.credentials import Redactor, config_secrets
from oaproxy.outbound import AgentFor, ReusedEndpoints
from oaproxy.relay import BytesProducer
from oaproxy.summary import summary
from oaproxy.upstreamclient import (
    HTTPProxy,
    IProxyEndpointFactory,
    ProxyEndpoint,
    ProxyRefused,
    ProxyUnreachable,
    TunnelEndpoint,
    UpstreamAgent,
    UpstreamPool,
)
from oaproxy.upstreamclient.tunnel import MAX_ANSWER_HEAD_BYTES
from oaproxy.upstreams import UpstreamClients
from tests.doubles import RecordingAgent, words_as_said
from tests.payloads import chat_body
from tests.test_upstreamclient import OK, MemoryUpstream

PATH = "etc/proxy.yaml"
PROXY = HTTPProxy("proxy.test", 3128, "user:pa:ss")
BASIC = b"Basic " + base64.b64encode(b"user:pa:ss")
OTHER_PROXY = HTTPProxy("other.test", 8080)


def parse(text: str) -> Any:
    return parse_config(dedent(text), PATH, {})


class ConfigTests(SynchronousTestCase):
    def refused(self, text: str) -> ConfigError:
        error = self.assertRaises(ConfigError, parse, text)
        self.assertNotIn("\n", str(error))
        return error

    def test_global_proxy_inherited_overridden_or_none(self) -> None:
        """The top-level proxy applies to upstreams without their own; ``none`` goes direct."""
        config = parse(
            """\
            proxy: http://us%40er:p%3Ass@127.0.0.1:3128
            upstreams:
              - endpoint: https://a.example/v1
              - endpoint: https://b.example/v1
                proxy: none
              - endpoint: https://c.example/v1
                proxy: http://[::1]:8080/
              - endpoint: https://d.example/v1
                proxy:
            """
        )
        inherited = HTTPProxy("127.0.0.1", 3128, "us@er:p:ss")
        self.assertEqual(config.proxy, inherited)
        self.assertEqual(
            [u.proxy for u in config.upstreams],
            [inherited, None, HTTPProxy("::1", 8080), inherited],
        )
        self.assertEqual(config.upstreams[2].proxy.url, "http://[::1]:8080")

    def test_no_proxy_by_default(self) -> None:
        """Without ``proxy:`` (or with ``proxy: none``) everything goes direct."""
        for top in ("", "proxy: none\n", "proxy: NONE\n"):
            config = parse(top + "upstreams:\n  - endpoint: https://a.example/v1\n")
            self.assertIsNone(config.proxy)
            self.assertIsNone(config.upstreams[0].proxy)

    def test_bad_proxy_values_refused(self) -> None:
        """Each unusable proxy value is refused on its line, never quoting the password."""
        for value, message in [
            ("https://u:hunter22@p:3128", "must be none or an http://host:port URL"),
            ("socks5://u:hunter22@p:1080", "must be none or an http://host:port URL"),
            ("http://u:hunter22@p", "the proxy URL needs a port"),
            ("http://u:hunter22@p:3128/x", "must not have a path, query or fragment"),
            ("http://u:hunter22@p:3128?x=1", "must not have a path, query or fragment"),
            ("http://u:hunter22@p:99999", "not a valid URL"),
            ("http://u:hunter22@:3128", "the proxy URL has no host"),
        ]:
            error = self.refused(
                f"upstreams:\n  - endpoint: https://a.example/v1\n    proxy: {value}\n"
            )
            self.assertEqual((error.line, error.key), (3, "upstreams[0].proxy"), value)
            self.assertIn(message, error.message)
            self.assertNotIn("hunter22", str(error))

    def test_endpoint_with_user_information_refused(self) -> None:
        """``http://user:pw@host/v1`` is refused naming file, line and key, never the password."""
        error = self.refused(
            "authorization: k\nupstreams:\n  - endpoint: http://user:hunter22@host/v1\n"
        )
        self.assertEqual(
            str(error),
            f"{PATH}:3: upstreams[0].endpoint: the URL must not hold user information"
            " (user:password@); give the upstream's key as sk",
        )

    def test_alert_urls_with_user_information_refused(self) -> None:
        """Feishu webhooks and Matrix homeservers with user information are refused too."""
        for notify in (
            "feishu: {webhook: 'https://u:hunter22@open.feishu.cn/hook/x'}",
            "matrix: {homeserver: 'https://u:hunter22@m.example', access_token: t, room_id: r}",
        ):
            error = self.refused(
                f"notify:\n  {notify}\nupstreams:\n  - endpoint: https://a.example/v1\n"
            )
            self.assertIn("must not hold user information", error.message)
            self.assertNotIn("hunter22", str(error))

    def test_credentials_never_shown(self) -> None:
        """The config's repr and the startup summary name the proxy without its credentials."""
        config = parse(
            """\
            proxy: http://user:hunter22@127.0.0.1:3128
            notify:
              feishu: {webhook: 'https://open.feishu.cn/hook/x'}
            upstreams:
              - endpoint: https://a.example/v1
            """
        )
        lines = "\n".join(summary(config, ["tcp:0"], [], ["feishu (open.feishu.cn)"]))
        self.assertIn("through proxy http://127.0.0.1:3128", lines)
        self.assertIn("alerts: feishu (open.feishu.cn); through proxy http://127.0.0.1:3128", lines)
        for text in (lines, repr(config)):
            self.assertNotIn("hunter22", text)
            self.assertNotIn("user:", text)

    def test_credentials_redacted(self) -> None:
        """A proxy quoting its credentials (password or Basic token) has them redacted."""
        config = parse(
            "proxy: http://user:hunter22-long@p:3128\nupstreams:\n  - endpoint: http://a/v1\n"
        )
        token = base64.b64encode(b"user:hunter22-long")
        redactor = Redactor(config_secrets(config))
        answer = b"denied user:hunter22-long (Basic " + token + b")"
        self.assertEqual(redactor.redact_bytes(answer), b"denied [redacted] (Basic [redacted])")


# -- the tunnel --------------------------------------------------------------------------


class Recorder(Protocol):
    """The protocol inside the tunnel."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IStreamClientEndpoint)
class ToProxy:
    """The endpoint to the proxy: a ``StringTransport`` per connection, made
    at once, or failing with ``error``, or (``hold``) never."""

    def __init__(self, error: Exception | None = None, hold: bool = False) -> None:
        self.error = error
        self.hold = hold
        self.transports: list[StringTransport] = []
        self.protocols: list[Protocol] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            return Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)

    def answer(self, data: bytes) -> None:
        self.protocols[-1].dataReceived(data)


class TunnelTests(SynchronousTestCase):
    def open(
        self, to_proxy: ToProxy, proxy: HTTPProxy = PROXY, host: bytes = b"api.example"
    ) -> tuple[Deferred[Any], Recorder]:
        inner = Recorder()
        tunnel = TunnelEndpoint(to_proxy, proxy, host, 443)
        return tunnel.connect(Factory.forProtocol(lambda: inner)), inner

    def test_connect_request(self) -> None:
        """The CONNECT names host:port (IPv6 in brackets) and carries the Basic credentials."""
        to_proxy = ToProxy()
        self.open(to_proxy)
        self.open(to_proxy, HTTPProxy("proxy.test", 3128), b"::1")
        self.assertEqual(
            [t.value() for t in to_proxy.transports],
            [
                b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n"
                b"Proxy-Authorization: " + BASIC + b"\r\n\r\n",
                b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n",
            ],
        )

    def test_established_then_bytes_both_ways(self) -> None:
        """On 2xx the inner protocol is connected on the proxy's connection; bytes pass both ways."""
        to_proxy = ToProxy()
        established, inner = self.open(to_proxy)
        for piece in (b"HTTP/1.1 200 Connection", b" established\r\nVia: x\r\n\r", b"\nhello"):
            self.assertNoResult(established)
            to_proxy.answer(piece)
        self.assertIs(self.successResultOf(established), inner)
        self.assertEqual(inner.received, b"hello")
        transport = to_proxy.transports[0]
        self.assertIs(inner.transport, transport)
        transport.clear()
        written: Any = inner.transport
        written.write(b"ping")
        to_proxy.answer(b"pong")
        self.assertEqual((transport.value(), inner.received), (b"ping", b"hellopong"))
        to_proxy.protocols[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(inner.lost)

    def test_refused(self) -> None:
        """A non-2xx answer fails with ProxyRefused (our phrase, not the proxy's), connection aborted."""
        for status, said in [
            (407, "407 Proxy Authentication Required"),
            (403, "403 Forbidden"),
            (502, "502 Bad Gateway"),
            (599, "599"),
        ]:
            to_proxy = ToProxy()
            established, inner = self.open(to_proxy)
            to_proxy.answer(b"HTTP/1.1 %d user:pa:ss is wrong\r\n\r\n" % status)
            error = self.failureResultOf(established, ProxyRefused).value
            self.assertEqual(error.status, status)
            self.assertEqual(
                str(error), f"proxy http://proxy.test:3128 refused CONNECT api.example:443: {said}"
            )
            self.assertTrue(to_proxy.transports[0].disconnected)
            self.assertIsNone(inner.transport)

    def test_not_http_refused(self) -> None:
        """An answer that is not HTTP, or a head over the limit, fails the tunnel."""
        for answer, said in [
            (b"SSH-2.0-OpenSSH\r\n\r\n", "answered CONNECT with something that is not HTTP"),
            (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * MAX_ANSWER_HEAD_BYTES, "a head too large"),
        ]:
            to_proxy = ToProxy()
            established, _ = self.open(to_proxy)
            to_proxy.answer(answer)
            error = self.failureResultOf(established, ProxyRefused).value
            self.assertIsNone(error.status)
            self.assertIn(said, str(error))
            self.assertTrue(to_proxy.transports[0].disconnected)

    def test_hangup_before_answer(self) -> None:
        """A proxy that closes before answering fails the tunnel with ProxyUnreachable."""
        to_proxy = ToProxy()
        established, _ = self.open(to_proxy)
        to_proxy.protocols[0].connectionLost(Failure(ConnectionDone()))
        error = self.failureResultOf(established, ProxyUnreachable).value
        self.assertEqual(
            str(error), "proxy http://proxy.test:3128 closed the connection before answering"
        )

    def test_proxy_unreachable(self) -> None:
        """Failing to reach the proxy says so, naming it (never its credentials)."""
        for endpoint in (
            TunnelEndpoint(ToProxy(ConnectionRefusedError()), PROXY, b"api.example", 443),
            ProxyEndpoint(ToProxy(ConnectionRefusedError()), PROXY),
        ):
            error = self.failureResultOf(endpoint.connect(Factory()), ProxyUnreachable).value
            self.assertTrue(
                str(error).startswith("proxy http://proxy.test:3128 unreachable: Connection was"),
                str(error),
            )

    def test_cancel_while_connecting_or_waiting(self) -> None:
        """Cancelling stops the connection to the proxy, or aborts it while CONNECT is unanswered."""
        held = ToProxy(hold=True)
        established, _ = self.open(held)
        established.cancel()
        self.failureResultOf(established, CancelledError)
        self.assertEqual(held.cancelled, 1)

        to_proxy = ToProxy()
        established, inner = self.open(to_proxy)
        established.cancel()
        self.failureResultOf(established, CancelledError)
        self.assertTrue(to_proxy.transports[0].disconnected)
        to_proxy.answer(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: nothing is connected
        to_proxy.protocols[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(inner.transport)

    def test_silent_proxy_cut_by_the_deadline(self) -> None:
        """A proxy that never answers CONNECT: the request's deadline aborts the connection."""
        clock = Clock()
        to_proxy = ToProxy()
        pool = UpstreamPool(clock, TunnelEndpoints(to_proxy))
        d = UpstreamAgent(pool, proxy=PROXY).request(b"GET", b"https://api.example/v1/models")
        d.addTimeout(10, clock)
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertTrue(to_proxy.transports[0].disconnected)


@implementer(IAgentEndpointFactory, IProxyEndpointFactory)
class TunnelEndpoints:
    """Routes through a proxy are tunnels over ``to_proxy`` (no TLS, in memory)."""

    def __init__(self, to_proxy: ToProxy) -> None:
        self._to_proxy = to_proxy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        raise AssertionError("no direct route here")

    def endpointThroughProxy(self, proxy: HTTPProxy, uri: URI) -> IStreamClientEndpoint:
        return TunnelEndpoint(self._to_proxy, proxy, uri.host, uri.port)


# -- routes through a proxy ----------------------------------------------------------------


@implementer(IProxyEndpointFactory)
class MemoryWaysOut(MemoryUpstream):
    """``MemoryUpstream`` with routes through proxies, remembered as asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.through: list[tuple[HTTPProxy, URI]] = []

    def endpointThroughProxy(self, proxy: HTTPProxy, uri: URI) -> IStreamClientEndpoint:
        self.through.append((proxy, uri))
        return self.endpointForURI(uri)


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ways = MemoryWaysOut()
        self.pool = UpstreamPool(self.clock, self.ways)

    def request(
        self, url: bytes, proxy: HTTPProxy | None, headers: Headers | None = None
    ) -> Deferred[Any]:
        return UpstreamAgent(self.pool, proxy=proxy).request(b"GET", url, headers)

    def test_http_through_proxy_is_absolute_form_with_credentials(self) -> None:
        """http through a proxy: absolute-form target, Host, our Proxy-Authorization only."""
        self.request(
            b"http://api.example:8080/v1/models?x=1",
            PROXY,
            Headers({b"Proxy-Authorization": [b"Basic caller"], b"Accept": [b"*/*"]}),
        )
        self.assertEqual(
            self.ways.last.sent(),
            b"GET http://api.example:8080/v1/models?x=1 HTTP/1.1\r\n"
            b"Host: api.example:8080\r\n"
            b"Proxy-Authorization: " + BASIC + b"\r\n"
            b"Accept: */*\r\n\r\n",
        )

    def test_https_through_proxy_is_origin_form_without_credentials(self) -> None:
        """https through a proxy: inside the tunnel the request is as if direct, no proxy credentials."""
        self.request(b"https://api.example/v1/models", PROXY)
        self.assertEqual(
            self.ways.last.sent(), b"GET /v1/models HTTP/1.1\r\nHost: api.example\r\n\r\n"
        )
        [(proxy, uri)] = self.ways.through
        self.assertEqual(
            (proxy, uri.scheme, uri.host, uri.port), (PROXY, b"https", b"api.example", 443)
        )

    def test_connections_kept_per_proxy_and_origin(self) -> None:
        """Direct, through one proxy, through another: three routes, each reusing its own connection."""
        url = b"http://api.example/v1/models"
        ways = (None, PROXY, OTHER_PROXY)
        links = []
        for proxy in ways:
            d = self.request(url, proxy)
            links.append(self.ways.last)
            self.ways.last.feed(OK)
            self.successResultOf(d)
        self.assertEqual([p for p, _ in self.ways.through], [PROXY, OTHER_PROXY])
        for proxy, link in zip(ways, links):
            link.sent()
            d = self.request(url, proxy)
            target = b"/v1/models" if proxy is None else url
            self.assertTrue(link.sent().startswith(b"GET " + target + b" "))
            link.feed(OK)
            self.successResultOf(d)
            self.assertEqual(len(self.pool.route(b"http://api.example", proxy).idle), 1)
        self.assertEqual(len(self.ways.links), 3)

    def test_407_from_the_proxy_fails_the_request(self) -> None:
        """A 407 to an absolute-form request fails it with ProxyRefused; the connection is closed."""
        d = self.request(b"http://api.example/v1/models", PROXY)
        self.ways.last.feed(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
        )
        error = self.failureResultOf(d, ProxyRefused).value
        self.assertEqual(
            str(error), "proxy http://proxy.test:3128 refused: 407 Proxy Authentication Required"
        )
        self.assertTrue(self.ways.last.closing)
        self.assertEqual(len(self.pool.route(b"http://api.example", PROXY).idle), 0)

    def test_407_on_a_direct_route_is_an_answer(self) -> None:
        """Without a proxy a 407 is just the upstream's answer, passed on."""
        d = self.request(b"http://api.example/v1/models", None)
        self.ways.last.feed(b"HTTP/1.1 407 Odd\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 407)


class ReusedEndpointsTests(SynchronousTestCase):
    def test_endpoints_through_a_proxy(self) -> None:
        """http through a proxy connects to the proxy; https gets TLS over a tunnel; each made once."""
        endpoints = ReusedEndpoints(Clock())
        http = URI.fromBytes(b"http://api.example/v1")
        https = URI.fromBytes(b"https://api.example/v1")
        plain = endpoints.endpointThroughProxy(PROXY, http)
        tunnelled = endpoints.endpointThroughProxy(PROXY, https)
        self.assertIsInstance(plain, ProxyEndpoint)
        self.assertNotIsInstance(tunnelled, (ProxyEndpoint, TunnelEndpoint))  # TLS-wrapped
        self.assertIs(endpoints.endpointThroughProxy(PROXY, https), tunnelled)
        self.assertIsNot(endpoints.endpointThroughProxy(OTHER_PROXY, https), tunnelled)
        self.assertIsNot(endpoints.endpointForURI(https), tunnelled)


WAYS_OUT = """
proxy: http://proxy.test:3128
upstreams:
  - {name: mistral, type: replicate, sk: r8-token, allow: [owner/name]}
  - {name: demo, type: echo}
  - {name: direct, endpoint: "https://direct.test/v1", proxy: none}
"""


class UpstreamTypesTests(SynchronousTestCase):
    def test_each_type_goes_out_its_upstreams_way(self) -> None:
        """Replicate's calls go through the agent for its upstream's proxy (the
        fresh one for the retry), an openai upstream's through the agent for
        its own way out, and echo needs none."""
        config = parse(WAYS_OUT)
        ways: dict[tuple[HTTPProxy | None, bool], RecordingAgent] = {}

        def agents(fresh: bool) -> AgentFor:
            return lambda proxy: cast(IAgent, ways.setdefault((proxy, fresh), RecordingAgent()))

        clients = UpstreamClients(
            config.upstreams,
            agents(False),
            agents(True),
            clock=Clock(),
            wall_clock=lambda: 0.0,
            max_event_bytes=config.max_event_bytes,
            words=words_as_said,
        )
        mistral, demo, direct = config.upstreams
        self.assertIs(clients(direct).agent, ways[(None, False)])
        self.assertIs(clients(direct).fresh_agent, ways[(None, True)])
        via = HTTPProxy("proxy.test", 3128)
        self.assertEqual(mistral.proxy, via)
        for fresh, client in (
            (False, clients(mistral).agent),
            (True, clients(mistral).fresh_agent),
        ):
            client.request(
                b"POST",
                mistral.url(b"/chat/completions"),
                Headers({b"authorization": [b"Bearer r8-token"]}),
                BytesProducer(chat_body("owner/name")),
            )
            [create] = ways[(via, fresh)].calls
            self.assertEqual(
                create.uri, b"https://api.replicate.com/v1/models/owner/name/predictions"
            )
        answered = self.successResultOf(clients(demo).agent.request(b"GET", demo.url(b"/models")))
        self.assertEqual(answered.code, 200)
        self.assertEqual(sum(len(agent.calls) for agent in ways.values()), 2)
