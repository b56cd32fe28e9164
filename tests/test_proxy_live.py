"""The outbound proxy on real sockets: a fake proxy (tests.fakeproxy) between
the daemon and fake upstreams, alerts and a local TLS upstream."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import openai
import yaml
from twisted.internet import ssl
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.web import resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS
from zope.interface import implementer

from oaproxy.outbound import ReusedEndpoints
from oaproxy.relay import BytesProducer
from oaproxy.upstreamclient import HTTPProxy, NoResponse, UpstreamAgent, UpstreamPool
from tests.fakeproxy import FakeProxy
from tests.live import (
    EndToEndCase,
    LiveCase,
    chat,
    free_port,
    reactor,
    refused_endpoint,
    write_yaml,
)
from tests.payloads import SK_MAIN, upstream
from tests.test_alerts import FakeEndpoint, QuietSite
from tests.test_upstreamclient_live import _self_signed_localhost, _TrustFile, read

PROXY_USER = "proxy-user"
PROXY_PASSWORD = "proxy-pass-Zq9!x"
BASIC = b"Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode())
#: What would give the proxy's credentials away, in any form.
PROXY_SECRETS = (PROXY_PASSWORD, BASIC.decode()[len("Basic ") :])
FEISHU_TOKEN = "feishu-hook-token-0f1e2d"


def with_credentials(url: str) -> str:
    """``http://user:password@host:port`` from ``http://host:port``."""
    return url.replace("http://", f"http://{PROXY_USER}:{PROXY_PASSWORD.replace('!', '%21')}@")


@implementer(ILogObserver)
class LoggedText:
    """Every log event of a test, as text, to prove no secret is in one."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "\n".join((formatEvent(e) or "") + " " + repr(e) for e in self.events)


class OutboundProxyCase(EndToEndCase):
    def setUp(self) -> None:
        self.logged = LoggedText()
        globalLogPublisher.addObserver(self.logged)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged)

    def fake_proxy(self, refuse: int | None = None) -> tuple[FakeProxy, str]:
        """A fake proxy, and its URL without credentials."""
        proxy = FakeProxy(reactor, refuse)
        url = proxy.start()
        self.addCleanup(proxy.stop)
        return proxy, url

    def feishu(self) -> tuple[FakeEndpoint, dict[str, Any]]:
        """A fake Feishu webhook, and the notify section that posts to it."""
        hook = FakeEndpoint()
        port = reactor.listenTCP(0, QuietSite(hook), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        webhook = f"http://127.0.0.1:{port.getHost().port}/open-apis/bot/v2/hook/{FEISHU_TOKEN}"
        return hook, {"feishu": {"webhook": webhook}}

    def assert_no_proxy_secret(self, *texts: str) -> None:
        for text in (*texts, self.logged.text):
            for secret in PROXY_SECRETS:
                self.assertNotIn(secret, text)


class HTTPUpstreamTests(OutboundProxyCase):
    async def test_absolute_form_with_proxy_authorization(self) -> None:
        """An http upstream is asked through the proxy in absolute form, with Basic credentials."""
        fake = await self.fake()
        proxy, url = self.fake_proxy()
        running = await self.proxy([upstream("main", fake.endpoint)], proxy=with_credentials(url))
        completion = await self.sdk(running, chat)
        self.assertEqual(completion.choices[0].message.content, "Hello, world!")
        [asked] = proxy.requests
        self.assertEqual(asked.method, b"POST")
        self.assertEqual(asked.target, fake.endpoint.encode() + b"/chat/completions")
        self.assertEqual(asked.header(b"proxy-authorization"), BASIC)
        self.assertEqual(asked.header(b"host"), b"127.0.0.1:%d" % fake.port)
        [seen] = fake.requests
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + SK_MAIN.encode())
        record = await running.records.nth(1)
        self.assertIn(f"through proxy {url}", self.logged.text)
        self.assert_no_proxy_secret(json.dumps(record))

    async def test_upstream_proxy_none_goes_direct(self) -> None:
        """``proxy: none`` on an upstream sends its requests straight to it."""
        fake = await self.fake()
        proxy, url = self.fake_proxy()
        running = await self.proxy([upstream("main", fake.endpoint, proxy="none")], proxy=url)
        await self.sdk(running, chat)
        self.assertEqual(len(fake.requests), 1)
        self.assertEqual(proxy.requests, [])

    async def test_proxy_down_fails_over(self) -> None:
        """A proxy nobody listens on fails the attempt, naming the proxy; the next upstream answers."""
        fake = await self.fake()
        dead = f"http://127.0.0.1:{free_port()}"
        running = await self.proxy(
            [
                upstream("via-dead", "http://api.example.test/v1", proxy=with_credentials(dead)),
                upstream("direct", fake.endpoint, proxy="none"),
            ]
        )
        await self.sdk(running, chat)
        record = await running.records.nth(1)
        first, second = record["attempts"]
        self.assertTrue(
            first["error"].startswith(f"connect error: ProxyUnreachable: proxy {dead} unreachable"),
            first["error"],
        )
        self.assertEqual((second["upstream"], second["status"]), ("direct", 200))
        self.assert_no_proxy_secret(json.dumps(record))


class RefusedTunnelTests(OutboundProxyCase):
    async def test_refused_connect_fails_over(self) -> None:
        """A proxy refusing CONNECT (407, 403, 502) fails the attempt with that reason; failover answers."""
        fake = await self.fake()
        proxy, url = self.fake_proxy()
        running = await self.proxy(
            [
                upstream("tunnelled", "https://api.example.test/v1"),
                upstream("direct", fake.endpoint, proxy="none"),
            ],
            proxy=with_credentials(url),
        )
        for n, (status, phrase) in enumerate(
            [(407, "Proxy Authentication Required"), (403, "Forbidden"), (502, "Bad Gateway")],
            start=1,
        ):
            proxy.refuse = status
            completion = await self.sdk(running, chat)
            self.assertEqual(completion.choices[0].message.content, "Hello, world!")
            record = await running.records.nth(n)
            first = record["attempts"][0]
            self.assertEqual(
                first["error"],
                f"connect error: ProxyRefused: proxy {url} refused CONNECT "
                f"api.example.test:443: {status} {phrase}",
            )
            self.assert_no_proxy_secret(json.dumps(record))
        for asked in proxy.requests:
            self.assertEqual((asked.method, asked.target), (b"CONNECT", b"api.example.test:443"))
            self.assertEqual(asked.header(b"proxy-authorization"), BASIC)

    async def test_exhausted_502_names_the_proxy_never_its_password(self) -> None:
        """With no upstream left, the client's 502 says the proxy refused, without its credentials."""
        _, url = self.fake_proxy(refuse=407)
        running = await self.proxy(
            [upstream("tunnelled", "https://api.example.test/v1")], proxy=with_credentials(url)
        )
        error = await self.sdk_error(running, chat, openai.APIStatusError)
        self.assertEqual(error.status_code, 502)
        message = error.response.text
        self.assertIn(f"proxy {url} refused CONNECT api.example.test:443: 407", message)
        self.assert_no_proxy_secret(message, json.dumps(await running.records.nth(1)))

    async def test_http_407_fails_over(self) -> None:
        """A 407 to an absolute-form request is the proxy's refusal: failed over, never passed on."""
        fake = await self.fake()
        proxy, url = self.fake_proxy(refuse=407)
        running = await self.proxy(
            [
                upstream("via-proxy", "http://api.example.test/v1"),
                upstream("direct", fake.endpoint, proxy="none"),
            ],
            proxy=with_credentials(url),
        )
        await self.sdk(running, chat)
        record = await running.records.nth(1)
        self.assertEqual(
            record["attempts"][0]["error"],
            f"connect error: ProxyRefused: proxy {url} refused: 407 Proxy Authentication Required",
        )
        self.assertEqual(record["status"], 200)
        self.assertEqual(proxy.requests[0].target, b"http://api.example.test/v1/chat/completions")


class AlertTests(OutboundProxyCase):
    async def test_alert_posts_go_through_the_proxy(self) -> None:
        """The top-level proxy carries alert posts too, with its credentials."""
        hook, notify = self.feishu()
        proxy, url = self.fake_proxy()
        running = await self.proxy(
            [upstream("dead", refused_endpoint(), proxy="none")],
            proxy=with_credentials(url),
            notify=notify,
        )
        await self.sdk_error(running, chat, openai.InternalServerError)
        await running.service.generation.notifier.drained()
        self.assertEqual(len(hook.seen), 1)
        [asked] = proxy.requests
        self.assertEqual(asked.method, b"POST")
        self.assertEqual(asked.target, notify["feishu"]["webhook"].encode())
        self.assertEqual(asked.header(b"proxy-authorization"), BASIC)
        self.assert_no_proxy_secret()


class EnvironmentTests(OutboundProxyCase):
    def set_environment(self, **values: str) -> None:
        for name, value in values.items():
            self.addCleanup(_restore, name, os.environ.get(name))
            os.environ[name] = value

    async def test_proxy_variables_ignored(self) -> None:
        """HTTP(S)_PROXY, ALL_PROXY and NO_PROXY are not read: upstreams and alerts go direct."""
        proxy, url = self.fake_proxy()
        self.set_environment(
            HTTP_PROXY=url,
            HTTPS_PROXY=url,
            ALL_PROXY=url,
            http_proxy=url,
            https_proxy=url,
            all_proxy=url,
            NO_PROXY="",
            no_proxy="",
        )
        fake = await self.fake()
        hook, notify = self.feishu()
        running = await self.proxy(
            [
                upstream("good", fake.endpoint, allow=["gpt-4o-mini"]),
                upstream("dead", refused_endpoint(), allow=["dead-model"]),
            ],
            notify=notify,
        )
        await self.sdk(running, chat)
        await self.sdk_error(
            running, lambda client: chat(client, "dead-model"), openai.InternalServerError
        )
        await running.service.generation.notifier.drained()
        self.assertEqual((len(fake.requests), len(hook.seen)), (1, 1))
        self.assertEqual(proxy.requests, [])


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class ReloadTests(OutboundProxyCase):
    async def test_sighup_reload_changes_the_proxy(self) -> None:
        """After a reload new requests take the new proxy, then none."""
        fake = await self.fake()
        first, first_url = self.fake_proxy()
        second, second_url = self.fake_proxy()
        running = await self.proxy([upstream("main", fake.endpoint)], proxy=first_url)
        with open(running.config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        await self.sdk(running, chat)
        for url, expected in [(second_url, (1, 1)), ("none", (1, 1))]:
            config["proxy"] = url
            write_yaml(running.config_path, config)
            self.assertTrue(await running.service.reload())
            await self.sdk(running, chat)
            self.assertEqual((len(first.requests), len(second.requests)), expected)
        self.assertEqual(len(fake.requests), 3)


# -- https through a CONNECT tunnel ----------------------------------------------------


class _Echo(resource.Resource):
    """Says what it got: method, target, Host, and whether proxy credentials came."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        answer = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "host": (request.getHeader(b"host") or b"").decode(),
            "proxy_authorization": request.getHeader(b"proxy-authorization") is not None,
        }
        return json.dumps(answer).encode()


class TunnelTests(LiveCase):
    def listen_tls(self) -> tuple[bytes, str, list[bytes | None]]:
        """An https server for localhost: its origin, its certificate's PEM
        file, and the server names (SNI) its handshakes asked for."""
        cert_pem, key_pem = _self_signed_localhost()
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(key_pem)
        contexts = ssl.DefaultOpenSSLContextFactory(
            str(directory / "key.pem"), str(directory / "cert.pem")
        )
        names: list[bytes | None] = []
        contexts.getContext().set_tlsext_servername_callback(
            lambda connection: names.append(connection.get_servername())
        )
        port = reactor.listenSSL(0, server.Site(_Echo()), contexts, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return b"https://localhost:%d" % port.getHost().port, str(directory / "cert.pem"), names

    def tunnel_client(self, **endpoints: Any) -> tuple[FakeProxy, HTTPProxy, UpstreamPool]:
        fake = FakeProxy(reactor)
        fake.start()
        self.addCleanup(fake.stop)
        proxy = HTTPProxy("127.0.0.1", fake.port, f"{PROXY_USER}:{PROXY_PASSWORD}")
        pool = UpstreamPool(reactor, ReusedEndpoints(reactor, **endpoints))
        self.addCleanup(pool.closeCachedConnections)
        return fake, proxy, pool

    async def test_https_through_connect_verified_end_to_end(self) -> None:
        """CONNECT with credentials, then the upstream's own TLS (trusted root, SNI) inside, kept alive."""
        origin, certificate, names = self.listen_tls()
        trusted = BrowserLikePolicyForHTTPS(trustRoot=_TrustFile(certificate))
        fake, proxy, pool = self.tunnel_client(tls=trusted)
        agent = UpstreamAgent(pool, proxy=proxy)
        for _ in range(2):
            response = await agent.request(b"POST", origin + b"/v1/x", None, BytesProducer(b"a"))
            self.assertEqual(
                json.loads(await read(response)),
                {
                    "method": "POST",
                    "uri": "/v1/x",
                    "host": origin.decode()[len("https://") :],
                    "proxy_authorization": False,
                },
            )
        [connect] = fake.requests
        port = origin.rpartition(b":")[2]
        self.assertEqual((connect.method, connect.target), (b"CONNECT", b"localhost:" + port))
        self.assertEqual(connect.header(b"proxy-authorization"), BASIC)
        self.assertEqual(names, [b"localhost"])
        self.assertEqual(len(pool.route(origin, proxy).idle), 1)
        self.assertEqual(len(pool.route(origin).idle), 0)

    async def test_untrusted_upstream_through_tunnel_refused(self) -> None:
        """Through the tunnel the upstream's certificate is checked: the platform's roots refuse it."""
        origin, _, _ = self.listen_tls()
        fake, proxy, pool = self.tunnel_client()
        try:
            await UpstreamAgent(pool, proxy=proxy).request(b"GET", origin + b"/v1/x")
        except NoResponse as e:
            self.assertTrue(type(e.reasons[0].value).__module__.startswith("OpenSSL"))
        else:
            self.fail("an untrusted certificate was accepted through the tunnel")
        self.assertEqual(len(fake.requests), 1)
        self.assertEqual(len(pool.route(origin, proxy).idle), 0)
        self.flushLoggedErrors()
