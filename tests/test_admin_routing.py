"""The admin API with routing: the store's upstreams take every key of the
file's (route, weight, backup, models, type, proxy…), read by the loader's
own rules; enabled: false means one thing whether the file or the store says
it; /admin/ is no route prefix; the live state shown is the breakers' and the
balancing's."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import openai
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.admin.changes import (
    Decide,
    Refusal,
    RefusalKind,
    add_upstream,
    change_upstream,
    set_enabled,
)
from oaproxy.admin.describe import describe_upstream
from oaproxy.admin.overlay import overlay
from oaproxy.admin.sealing import Sealer
from oaproxy.admin.stored import EMPTY, Source, StoredUpstream, StoreSnapshot
from oaproxy.admin.tables import PutUpstream
from oaproxy.config import Config, ConfigError, UpstreamType
from oaproxy.config.model import REPLICATE_ENDPOINT
from oaproxy.config.values import RESERVED_ROOTS
from oaproxy.paths import request_path
from oaproxy.service import ProxyService
from oaproxy.summary import summary
from oaproxy.web import RootResource
from tests.adminclient import STORE_KEY
from tests.doubles import make_config
from tests.fakeupstream import Status, Wait
from tests.live import chat
from tests.test_admin_api import AdminCase
from tests.test_admin_config import FILE, applied, context, file_config

PROXY_SECRET = "pw-proxy-0123456789"
PROXY = f"http://user:{PROXY_SECRET}@proxy.test:3128"


def running(config: Config, stored: StoreSnapshot) -> Config:
    return overlay(config, stored, Sealer.from_config(config))


def added(config: Config, body: dict[str, Any]) -> tuple[StoreSnapshot, Config]:
    """The store once ``body`` is added, and the config it makes with ``config``."""
    stored = applied(EMPTY, add_upstream(context(config), body)(EMPTY))
    return stored, running(config, stored)


def refused(change: Callable[[], Decide], stored: StoreSnapshot = EMPTY) -> Refusal:
    """The refusal of the change ``change()`` makes, on ``stored``."""
    try:
        change()(stored)
    except Refusal as e:
        return e
    raise AssertionError("not refused")


class StoredSettingsTests(SynchronousTestCase):
    def test_every_routing_key(self) -> None:
        """route, weight, backup, models and content_filter are stored and run as in the file."""
        body = {
            "name": "team",
            "endpoint": "https://team.test/v1",
            "route": "/team",
            "weight": 3,
            "backup": True,
            "models": {"gpt-4o": "team-4o"},
            "content_filter": False,
        }
        _, config = added(file_config(), body)
        upstream = config.upstreams[-1]
        self.assertEqual(
            (upstream.route, upstream.weight, upstream.backup, upstream.content_filter),
            ("/team", 3, True, False),
        )
        self.assertEqual(dict(upstream.models), {"gpt-4o": "team-4o"})
        self.assertEqual(config.route_prefixes, ("/team",))
        shown = describe_upstream(upstream, stored=EMPTY, state=None)["settings"]
        self.assertEqual((shown["route"], shown["models"]), ("/team", {"gpt-4o": "team-4o"}))

    def test_types(self) -> None:
        """echo needs no endpoint and takes none; replicate has its default; openai needs one."""
        _, config = added(file_config(), {"name": "demo", "type": "echo"})
        self.assertEqual(config.upstreams[-1].type, UpstreamType.ECHO)
        self.assertIsNone(config.upstreams[-1].endpoint)
        _, config = added(file_config(), {"name": "mistral", "type": "replicate"})
        self.assertEqual(config.upstreams[-1].endpoint, REPLICATE_ENDPOINT)
        cases = [
            ({"type": "echo", "endpoint": "https://e.test/v1"}, "endpoint", "it has no endpoint"),
            ({"type": "echo", "sk": "sk-echo-0123456789"}, "sk", "it has no sk"),
            ({}, "endpoint", "upstream has no endpoint"),
        ]
        for settings, param, message in cases:
            refusal = refused(functools.partial(add_upstream, context(), {"name": "x", **settings}))
            self.assertEqual((refusal.kind, refusal.param), (RefusalKind.INVALID, param))
            self.assertIn(message, refusal.message)

    def test_type_change_of_a_file_upstream(self) -> None:
        """A file upstream made echo keeps the file's endpoint: refused, naming the type."""
        refusal = refused(lambda: change_upstream(context(), "main", {"type": "echo"}))
        self.assertEqual(refusal.param, "type")
        self.assertIn("an echo upstream answers by itself: it has no endpoint", refusal.message)

    def test_route_is_checked(self) -> None:
        """A stored route is checked as the file's: /admin is oaproxy's own."""
        refusal = refused(
            lambda: add_upstream(
                context(), {"name": "x", "endpoint": "https://x.test/v1", "route": "/admin"}
            )
        )
        self.assertEqual(refusal.param, "route")
        self.assertIn("/admin is a path oaproxy serves itself", refusal.message)

    def test_proxy_inherited_own_or_none(self) -> None:
        """Without proxy the top-level one is inherited; none goes direct; an own one is taken."""
        config = file_config(FILE + "proxy: http://top.test:3128\n")
        for proxy, expected in (
            (None, "http://top.test:3128"),
            ("none", None),
            ("http://own.test:8080", "http://own.test:8080"),
        ):
            body: dict[str, Any] = {"name": "x", "endpoint": "https://x.test/v1", "proxy": proxy}
            _, ran = added(config, body)
            way_out = ran.upstreams[-1].proxy
            self.assertEqual(None if way_out is None else way_out.url, expected, proxy)

    def test_proxy_credentials_are_sealed(self) -> None:
        """A proxy URL with credentials is sealed like an sk, never in settings, the audit
        or the API; it still runs; without store_key it is refused."""
        change = add_upstream(
            context(), {"name": "x", "endpoint": "https://x.test/v1", "proxy": PROXY}
        )(EMPTY)
        [write] = change.writes
        assert isinstance(write, PutUpstream)
        self.assertNotIn(PROXY_SECRET, write.row.settings)
        self.assertIsNotNone(write.row.sealed)
        self.assertNotIn(PROXY_SECRET, change.audit.changes)
        config = running(file_config(), applied(EMPTY, change))
        upstream = config.upstreams[-1]
        assert upstream.proxy is not None
        self.assertEqual(upstream.proxy.credentials, f"user:{PROXY_SECRET}")
        shown = describe_upstream(upstream, stored=EMPTY, state=None)
        self.assertNotIn(PROXY_SECRET, json.dumps(shown))
        self.assertTrue(shown["settings"]["proxy_credentials_set"])
        without = make_config(FILE.replace(f"store_key: {STORE_KEY}\n", ""))
        refusal = refused(
            lambda: add_upstream(
                context(without), {"name": "y", "endpoint": "https://y.test/v1", "proxy": PROXY}
            )
        )
        self.assertEqual((refusal.param, refusal.code), ("proxy", "store_key_missing"))

    def test_proxy_changed_from_sealed_to_plain(self) -> None:
        """A PATCHed proxy without credentials replaces the sealed one; the sk stays."""
        body = {
            "name": "x",
            "endpoint": "https://x.test/v1",
            "sk": "sk-x-0123456789",
            "proxy": PROXY,
        }
        stored, _ = added(file_config(), body)
        change = change_upstream(context(), "x", {"proxy": "http://plain.test:3128"})(stored)
        upstream = running(file_config(), applied(stored, change)).upstreams[-1]
        assert upstream.proxy is not None
        self.assertEqual(
            (upstream.proxy.url, upstream.proxy.credentials), ("http://plain.test:3128", None)
        )
        self.assertEqual(upstream.sk, "sk-x-0123456789")


class EnabledTests(SynchronousTestCase):
    FILE_OFF = FILE + "  - {name: spare, endpoint: 'https://spare.test/v1', enabled: false}\n"

    def test_one_meaning(self) -> None:
        """The store's disable and the file's enabled: false both make enabled false,
        the upstream in disabled_upstreams and the same summary line."""
        config = file_config(self.FILE_OFF)
        stored = applied(EMPTY, set_enabled(context(config), "main", False)(EMPTY))
        ran = running(config, stored)
        self.assertEqual([u.name for u in ran.upstreams], ["guarded"])
        self.assertEqual(
            [(u.name, u.enabled) for u in ran.disabled_upstreams],
            [("main", False), ("spare", False)],
        )
        lines = summary(ran, [], [], [])
        for name in ("main", "spare"):
            self.assertIn(f"upstream {name}: disabled (enabled: false)", lines)
        for upstream in ran.disabled_upstreams:
            shown = describe_upstream(upstream, stored=stored, state=None)
            self.assertEqual((shown["source"], shown["enabled"]), ("config", False))

    def test_the_file_disables_for_good(self) -> None:
        """An upstream the file disables cannot be enabled by the store (409), nor PATCHed
        enabled; other changes of it are kept, and it stays disabled."""
        config = file_config(self.FILE_OFF)
        for change in (
            lambda: set_enabled(context(config), "spare", True),
            lambda: change_upstream(context(config), "spare", {"enabled": True}),
        ):
            refusal = refused(change)
            self.assertEqual((refusal.kind, refusal.param), (RefusalKind.CONFLICT, "enabled"))
            self.assertIn("enabled: false in the config file", refusal.message)
        stored = applied(EMPTY, change_upstream(context(config), "spare", {"timeout": 5})(EMPTY))
        [spare] = running(config, stored).disabled_upstreams
        self.assertEqual((spare.timeout, spare.enabled), (5, False))
        refusal = refused(lambda: add_upstream(context(config), {"name": "spare", "type": "echo"}))
        self.assertEqual(refusal.kind, RefusalKind.CONFLICT)

    def test_enabled_in_a_body(self) -> None:
        """enabled in a POST adds the upstream disabled; in a PATCH it is the switch
        (null: enabled again); it is checked by the file's reader."""
        stored, config = added(file_config(), {"name": "x", "type": "echo", "enabled": False})
        self.assertEqual([u.name for u in config.disabled_upstreams], ["x"])
        self.assertNotIn("enabled", json.loads(stored.upstreams[0].settings))
        stored = applied(stored, change_upstream(context(), "x", {"enabled": None})(stored))
        self.assertEqual(running(file_config(), stored).upstreams[-1].name, "x")
        stored = applied(stored, change_upstream(context(), "x", {"enabled": False})(stored))
        self.assertFalse(stored.upstreams[0].enabled)
        refusal = refused(lambda: change_upstream(context(), "x", {"enabled": "no"}), stored)
        self.assertEqual(refusal.param, "enabled")

    def test_enabled_in_settings_refused(self) -> None:
        """A row whose settings say enabled (edited by hand) is refused: the column says it."""
        row = StoredUpstream(
            "x", Source.ADMIN.value, True, '{"type": "echo", "enabled": false}', None
        )
        with self.assertRaises(ConfigError) as caught:
            running(file_config(), StoreSnapshot(1, (row,)))
        self.assertEqual(caught.exception.key, "oaproxy_upstreams[x].enabled")


class AdminPathTests(SynchronousTestCase):
    def test_tree_and_paths_agree(self) -> None:
        """Every path the resource tree serves itself is a reserved root no route can
        take, and request_path finds no API under it, whatever the routes."""
        service = ProxyService(make_config(FILE), Clock())
        root = service.generation.root
        assert isinstance(root, RootResource)
        served = {name.decode("ascii") for name in root.children}
        self.assertEqual(served, set(RESERVED_ROOTS))
        for reserved in RESERVED_ROOTS - {"v1"}:
            path = f"/{reserved}/v1/chat/completions".encode()
            self.assertIsNone(request_path(path, ("/ollama", "/team")), reserved)


class LiveStateTests(AdminCase):
    async def test_state_is_the_routers(self) -> None:
        """GET /admin/upstreams shows the balancing's attempts in flight while one
        waits, then the breakers' circuit: open after breaker.failures failures."""
        proxy, admin, fake = await self.start(breaker={"failures": 1, "cooldown": 60})
        fake.script(Wait())
        pending = self.sdk(proxy, chat)
        await fake.received(1)
        state = (await admin.upstream("file") or {})["state"]
        self.assertEqual((state["in_flight"], state["circuit"]), (1, "closed"))
        fake.release()
        await pending
        fake.script(Status(500))
        await self.assertFailure(self.sdk(proxy, chat), openai.InternalServerError)
        await proxy.records.nth(2)
        state = (await admin.upstream("file") or {})["state"]
        self.assertEqual(
            {k: state[k] for k in ("circuit", "circuit_failures", "in_flight", "attempts_5m")},
            {
                "circuit": "open",
                "circuit_failures": 1,
                "in_flight": 0,
                "attempts_5m": {"ok": 1, "failed": 1},
            },
        )
        self.assertIsInstance(state["circuit_open_until"], float)
        self.assertIsInstance(state["ttfb_average"], float)

    async def test_added_upstream_on_a_route(self) -> None:
        """An echo upstream added on a route serves <route>/v1 at once; /admin/v1 stays
        the admin API's (404 there), never a route."""
        proxy, admin, _ = await self.start()
        answer = await admin.call(
            "POST", "/upstreams", {"name": "demo", "type": "echo", "route": "/team"}
        )
        self.assertEqual(answer.status, 201, answer.body)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{proxy.port}/team/v1",
            api_key=self.client_key,
            max_retries=0,
        )
        self.addCleanup(client.close)
        reply = await deferToThread(
            lambda: client.chat.completions.with_raw_response.create(
                model="anything", messages=[{"role": "user", "content": "hello there"}]
            )
        )
        self.assertEqual(reply.headers["x-oaproxy-upstream"], "demo")
        self.assertEqual(reply.parse().choices[0].message.content, "hello there")
        self.assertEqual((await admin.call("GET", "/v1/models")).status, 404)
