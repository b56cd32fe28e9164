"""The admin API on a real socket, the service in the test's reactor, the
store in sqlite (and, below, PostgreSQL): its auth, each call, validation
errors, changes in effect at once, records and usage, and no secret ever
shown, stored in clear or logged."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, cast

import openai
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from oaproxy.admin.changes import add_key, new_key_secret
from oaproxy.admin.loading import UNREAD, StoreUnreadable, load
from oaproxy.admin.tables import take_change
from oaproxy.service import ProxyService
from oaproxy.sinks.sql import AUDIT_TABLE, TABLE, open_database, placeholder
from tests.adminclient import ADMIN_KEY, STORE_KEY, AdminClient
from tests.fakeupstream import FAKE_MODEL, FakeUpstream
from tests.live import (
    POSTGRES_DSN,
    SHARED_POSTGRES,
    ProxyCase,
    RunningProxy,
    chat,
    postgres_schema,
    reachable,
    reactor,
    unavailable,
    wait_for,
    write_yaml,
)
from tests.payloads import CLIENT_KEY, OTHER_KEY, proxy_config
from tests.test_admin_config import context

SK_FILE = "sk-file-upstream-0123456789"
SK_NEW = "sk-new-upstream-0123456789"


class AdminCase(ProxyCase):
    """The service with a store and /admin/, an admin client on it."""

    timeout = 30
    client_key = CLIENT_KEY

    def database(self) -> dict[str, Any]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return {"dbtype": "sqlite", "dbaddr": os.path.join(directory, "db.sqlite")}

    async def start(self, **top: Any) -> tuple[RunningProxy, AdminClient, FakeUpstream]:
        """The service with one file upstream ("file", on a fake, for FAKE_MODEL) and ``top``."""
        self.fake_file = await self.fake()
        settings: dict[str, Any] = {
            "admin_key": ADMIN_KEY,
            "store_key": STORE_KEY,
            **self.database(),
            **top,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        config = proxy_config(
            "admin-test",
            {"alice": CLIENT_KEY, "bob": OTHER_KEY},
            [
                {
                    "name": "file",
                    "endpoint": self.fake_file.endpoint,
                    "sk": SK_FILE,
                    "allow": [FAKE_MODEL],
                }
            ],
            **settings,
        )
        self.settings = settings
        proxy = await self.start_proxy(config, self.mktemp() + ".yaml")
        self.log_text: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.log_text.append(formatEvent(event) or "")

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return proxy, AdminClient(proxy.port), self.fake_file

    def assert_no_secret(self, *texts: str, secrets: tuple[str, ...] = ()) -> None:
        for text in texts:
            for secret in (SK_FILE, SK_NEW, STORE_KEY, ADMIN_KEY, *secrets):
                self.assertNotIn(secret, text)


class AdminAPITests(AdminCase):
    # -- the door ----------------------------------------------------------------

    async def test_off_without_admin_key(self) -> None:
        """Without admin_key there is no /admin/: 404, whatever the key."""
        _, admin, _ = await self.start(admin_key=None)
        answer = await admin.call("GET", "/upstreams")
        self.assertEqual((answer.status, answer.error["code"]), (404, "not_found"))

    async def test_auth(self) -> None:
        """No key, a wrong key, a client key, a bare "Bearer": 401; the admin key: 200."""
        proxy, admin, _ = await self.start()
        for key in (None, "wrong", CLIENT_KEY, ""):
            answer = await AdminClient(proxy.port, key).call("GET", "/upstreams")
            self.assertEqual(answer.status, 401, key)
            self.assertEqual(answer.error["code"], "invalid_api_key")
            self.assertEqual(answer.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual((await admin.call("GET", "/upstreams")).status, 200)
        self.assertIsNone(
            (await admin.call("GET", "/upstreams")).headers.getRawHeaders(
                b"access-control-allow-origin"
            )
        )

    async def test_unknown_route_and_method(self) -> None:
        """An unknown path is 404; a known one with another method 405 with Allow."""
        _, admin, _ = await self.start()
        self.assertEqual((await admin.call("GET", "/nothing")).status, 404)
        answer = await admin.call("PUT", "/upstreams")
        self.assertEqual(answer.status, 405)
        self.assertEqual(answer.headers.getRawHeaders(b"allow"), [b"GET, POST"])

    # -- upstreams -----------------------------------------------------------------

    async def test_list_upstreams(self) -> None:
        """Each upstream with its settings, source, enabled and live state; sk_set, never the sk."""
        proxy, admin, _ = await self.start()
        await self.sdk(proxy, chat)
        answer = await admin.call("GET", "/upstreams")
        self.assertEqual(answer.body["object"], "list")
        [listed] = answer.body["data"]
        self.assertEqual(
            {k: listed[k] for k in ("object", "name", "source", "enabled")},
            {"object": "upstream", "name": "file", "source": "config", "enabled": True},
        )
        self.assertTrue(listed["settings"]["sk_set"])
        self.assertEqual(listed["settings"]["timeout"], 10.0)
        state = listed["state"]
        self.assertEqual(state["circuit"], "closed")
        self.assertEqual((state["in_flight"], state["attempts_5m"]), (0, {"ok": 1, "failed": 0}))
        self.assertIsInstance(state["ttfb_average"], float)
        self.assert_no_secret(json.dumps(answer.body))

    async def test_add_upstream_serves_at_once(self) -> None:
        """A new upstream (201) serves the next request, with its own sk."""
        proxy, admin, _ = await self.start()
        fresh = await self.fake()
        body = {"name": "fresh", "endpoint": fresh.endpoint, "sk": SK_NEW, "allow": ["only-new"]}
        answer = await admin.call("POST", "/upstreams", body)
        self.assertEqual(answer.status, 201, answer.body)
        self.assertEqual(
            (answer.body["name"], answer.body["source"], answer.body["settings"]["allow"]),
            ("fresh", "admin", ["only-new"]),
        )
        await self.sdk(proxy, lambda client: chat(client, "only-new"))
        self.assertEqual(fresh.requests[0].header(b"authorization"), b"Bearer " + SK_NEW.encode())
        self.assert_no_secret(json.dumps(answer.body), *self.log_text)

    async def test_values_literal(self) -> None:
        """${NAME} in a body is text: the upstream is sent exactly that."""
        proxy, admin, _ = await self.start()
        fresh = await self.fake()
        body = {"name": "lit", "endpoint": fresh.endpoint, "sk": "${HOME}", "allow": "lit-model"}
        self.assertEqual((await admin.call("POST", "/upstreams", body)).status, 201)
        await self.sdk(proxy, lambda client: chat(client, "lit-model"))
        self.assertEqual(fresh.requests[0].header(b"authorization"), b"Bearer ${HOME}")

    async def test_validation_errors(self) -> None:
        """A bad field is 400 naming it, as the config file would; a taken name 409."""
        _, admin, fake = await self.start()
        cases = [
            ({"name": "x", "endpoint": fake.endpoint, "timeout": "9"}, "timeout"),
            ({"name": "x", "endpoint": fake.endpoint, "tiemout": 9}, "tiemout"),
            ({"name": "x"}, "endpoint"),
            ({"endpoint": fake.endpoint}, "name"),
            ({"name": "x", "endpoint": fake.endpoint, "authorization": "k"}, "authorization"),
        ]
        for body, param in cases:
            answer = await admin.call("POST", "/upstreams", body)
            self.assertEqual((answer.status, answer.error["param"]), (400, param), answer.body)
            self.assertEqual(answer.error["type"], "invalid_request_error")
        self.assertIn(
            "expected a number, got a string",
            (await admin.call("POST", "/upstreams", cases[0][0])).error["message"],
        )
        for raw in (b"{nope", b'{"name": "x", "name": "y"}', b'{"timeout": NaN}'):
            not_json = await admin.call("POST", "/upstreams", raw=raw)
            self.assertEqual((not_json.status, not_json.error["code"]), (400, "invalid_json"))
        taken = await admin.call("POST", "/upstreams", {"name": "file", "endpoint": fake.endpoint})
        self.assertEqual((taken.status, taken.error["code"]), (409, "conflict"))
        self.assertEqual([u["name"] for u in (await admin.get("/upstreams"))["data"]], ["file"])

    async def test_change_disable_enable_a_file_upstream(self) -> None:
        """A file upstream is changed (an overlay), disabled (not used), enabled; never deleted."""
        proxy, admin, fake = await self.start()
        changed = await admin.call(
            "PATCH", "/upstreams/file", {"timeout": 3, "allow": [FAKE_MODEL]}
        )
        self.assertEqual(changed.status, 200, changed.body)
        self.assertEqual(changed.body["overridden"], ["allow", "timeout"])
        self.assertEqual(changed.body["settings"]["timeout"], 3.0)
        renamed = await admin.call("PATCH", "/upstreams/file", {"name": "other"})
        self.assertEqual((renamed.status, renamed.error["param"]), (400, "name"))
        deleted = await admin.call("DELETE", "/upstreams/file")
        self.assertEqual(deleted.status, 409)
        self.assertIn("disable it", deleted.error["message"])
        disabled = await admin.call("POST", "/upstreams/file/disable")
        self.assertFalse(disabled.body["enabled"])
        await self.assertFailure(self.sdk(proxy, chat), openai.NotFoundError)
        self.assertEqual(len(fake.requests), 0)
        listed = await admin.get("/upstreams")
        self.assertEqual([(u["name"], u["enabled"]) for u in listed["data"]], [("file", False)])
        await admin.call("POST", "/upstreams/file/enable")
        await self.sdk(proxy, chat)
        self.assertEqual(len(fake.requests), 1)
        missing = await admin.call("POST", "/upstreams/nope/disable")
        self.assertEqual(missing.status, 404)

    async def test_new_sk_for_a_file_upstream(self) -> None:
        """A file upstream's sk replaced through the API is used, and null gives back the file's."""
        proxy, admin, fake = await self.start()
        changed = await admin.call("PATCH", "/upstreams/file", {"sk": SK_NEW})
        self.assertEqual(changed.body["overridden"], ["sk"])
        await self.sdk(proxy, chat)
        self.assertEqual(fake.requests[-1].header(b"authorization"), f"Bearer {SK_NEW}".encode())
        await admin.call("PATCH", "/upstreams/file", {"sk": None})
        await self.sdk(proxy, chat)
        self.assertEqual(fake.requests[-1].header(b"authorization"), f"Bearer {SK_FILE}".encode())
        self.assertEqual((await admin.upstream("file") or {})["overridden"], [])
        self.assert_no_secret(self.stored_text(), *self.log_text)

    async def test_remove_an_admin_upstream(self) -> None:
        """An upstream of the store is removed (200), then gone (404)."""
        _, admin, fake = await self.start()
        await admin.call("POST", "/upstreams", {"name": "extra", "endpoint": fake.endpoint})
        patched = await admin.call("PATCH", "/upstreams/extra", {"deny": ["x"]})
        self.assertEqual(patched.body["settings"]["deny"], ["x"])
        removed = await admin.call("DELETE", "/upstreams/extra")
        self.assertEqual(removed.body, {"object": "upstream", "name": "extra", "deleted": True})
        self.assertEqual((await admin.call("GET", "/upstreams/extra")).status, 404)

    async def test_sk_needs_store_key(self) -> None:
        """Without store_key an sk is refused, saying why; an upstream without one is not."""
        _, admin, fake = await self.start(store_key=None)
        body = {"name": "x", "endpoint": fake.endpoint, "sk": SK_NEW}
        answer = await admin.call("POST", "/upstreams", body)
        self.assertEqual((answer.status, answer.error["code"]), (400, "store_key_missing"))
        self.assertIn("store_key", answer.error["message"])
        del body["sk"]
        self.assertEqual((await admin.call("POST", "/upstreams", body)).status, 201)

    # -- keys --------------------------------------------------------------------------

    async def test_keys(self) -> None:
        """A new key is shown once, works at once, is kept as its SHA-256; removed, refused."""
        proxy, admin, _ = await self.start()
        listed = await admin.get("/keys")
        self.assertEqual([k["name"] for k in listed["data"]], ["alice", "bob"])
        answer = await admin.call(
            "POST", "/keys", {"name": "carol", "rate_limit": "100/minute", "upstreams": ["file"]}
        )
        self.assertEqual(answer.status, 201, answer.body)
        secret = answer.body["key"]
        self.assertTrue(secret.startswith("sk-oaproxy-"))
        self.assertEqual(
            (
                answer.body["source"],
                answer.body["upstreams"],
                answer.body["settings"]["rate_limit"],
            ),
            ("admin", ["file"], "100/minute"),
        )
        await self.sdk(proxy, chat, key=secret)
        shown = json.dumps(await admin.get("/keys")) + json.dumps(await admin.get("/keys/carol"))
        self.assertNotIn(secret, shown)
        bad = await admin.call("POST", "/keys", {"name": "dave", "budget": {"usd": 1, "tokens": 2}})
        self.assertEqual((bad.status, bad.error["param"]), (400, "budget"))
        taken = await admin.call("POST", "/keys", {"name": "alice"})
        self.assertEqual(taken.status, 409)
        self.assertEqual((await admin.call("DELETE", "/keys/alice")).status, 409)
        self.assertEqual((await admin.call("DELETE", "/keys/carol")).status, 200)
        await self.assertFailure(self.sdk(proxy, chat, key=secret), openai.AuthenticationError)
        self.assertNotIn(secret, self.stored_text())
        self.assert_no_secret(*self.log_text, secrets=(secret,))

    def stored_text(self) -> str:
        """Every row of the store's tables, as text."""
        connection = open_database(self.settings["dbtype"], self.settings["dbaddr"])
        try:
            cursor = connection.cursor()
            texts = []
            for table in ("oaproxy_upstreams", "oaproxy_keys", AUDIT_TABLE):
                cursor.execute(f"SELECT * FROM {table}")
                texts.append(repr(cursor.fetchall()))
            return "\n".join(texts)
        finally:
            connection.close()

    def set_record_text(self, record_id: str, text: str) -> None:
        """Overwrite one record row's stored JSON, as a hand edit would."""
        connection = open_database(self.settings["dbtype"], self.settings["dbaddr"])
        try:
            mark = placeholder(self.settings["dbtype"])
            connection.cursor().execute(
                f"UPDATE {TABLE} SET record = {mark} WHERE id = {mark}", [text, record_id]
            )
            connection.commit()
        finally:
            connection.close()

    async def test_audit(self) -> None:
        """Every change is in the audit log, table and API, saying what changed but no secret."""
        _, admin, fake = await self.start()
        await admin.call(
            "POST", "/upstreams", {"name": "x", "endpoint": fake.endpoint, "sk": SK_NEW}
        )
        await admin.call("PATCH", "/upstreams/x", {"sk": None, "timeout": 4})
        await admin.call("POST", "/upstreams/file/disable")
        secret = (await admin.call("POST", "/keys", {"name": "k"})).body["key"]
        audit = await admin.get("/audit?limit=3")
        self.assertTrue(audit["has_more"])
        self.assertEqual(
            [(e["action"], e["target"], e["changes"]) for e in audit["data"]],
            [
                ("key.added", "k", {"upstreams": None}),
                ("upstream.disabled", "file", {"enabled": False}),
                ("upstream.changed", "x", {"sk": "removed", "timeout": 4}),
            ],
        )
        older = await admin.get(f"/audit?before={audit['data'][-1]['id']}")
        self.assertEqual(older["data"][0]["changes"]["sk"], "set")
        self.assertTrue(older["data"][0]["actor"].startswith("admin API from 127.0.0.1"))
        self.assert_no_secret(self.stored_text(), *self.log_text, secrets=(secret,))
        taken = [line for line in self.log_text if "store change by admin API" in line]
        # Once each: the entries this daemon made are not logged again when it reads them.
        self.assertEqual(len(taken), 4, taken)

    # -- records ---------------------------------------------------------------------------

    async def test_records_and_usage(self) -> None:
        """Records newest first, a page at a time, filtered; one whole; usage by key and model."""
        proxy, admin, _ = await self.start(prices={FAKE_MODEL: {"input": 1, "output": 2}})
        for key in (CLIENT_KEY, CLIENT_KEY, OTHER_KEY):
            await self.sdk(proxy, chat, key=key)
        sink = proxy.service.sinks["sql"]
        await wait_for(lambda: sink.written >= 3, timeout=10)
        first = await admin.get("/records?limit=2")
        self.assertEqual([r["key_name"] for r in first["data"]], ["bob", "alice"])
        self.assertTrue(first["has_more"])
        self.assertNotIn("request_body", first["data"][0])
        rest = await admin.get(f"/records?limit=2&before={first['next']}")
        self.assertEqual([r["key_name"] for r in rest["data"]], ["alice"])
        self.assertFalse(rest["has_more"])
        times = [r["time"] for r in first["data"] + rest["data"]]
        self.assertEqual(times, sorted(times, reverse=True))
        alice = await admin.get("/records?key=alice&model=" + FAKE_MODEL)
        self.assertEqual(len(alice["data"]), 2)
        whole = await admin.get("/records/" + first["data"][0]["id"])
        self.assertEqual((whole["object"], whole["key_name"]), ("record", "bob"))
        self.assertIn("messages", json.dumps(whole["request_body"]))
        self.assertEqual((await admin.call("GET", "/records/nope")).status, 404)
        used = await admin.get("/usage?by=key")
        self.assertEqual(
            [(g["key"], g["requests"]) for g in used["data"]], [("alice", 2), ("bob", 1)]
        )
        self.assertEqual(used["total"]["requests"], 3)
        self.assertGreater(used["total"]["cost"], 0)
        empty = await admin.get(f"/usage?since={times[0] + 1}")
        self.assertEqual(empty["total"]["requests"], 0)
        bad = await admin.call("GET", "/records?since=yesterday-ish")
        self.assertEqual((bad.status, bad.error["param"]), (400, "since"))
        bad = await admin.call("GET", "/usage?by=day")
        self.assertEqual((bad.status, bad.error["param"]), (400, "by"))
        self.assertEqual(len((await admin.get("/records?outcome=ok,exhausted"))["data"]), 3)
        self.assertEqual((await admin.get("/records?outcome=exhausted"))["data"], [])
        bad = await admin.call("GET", "/records?outcome=fine")
        self.assertEqual((bad.status, bad.error["param"]), (400, "outcome"))
        # A row that holds no record (edited by hand): a 500 in plain words.
        record_id = first["data"][1]["id"]
        self.set_record_text(record_id, '{"id": "x"}')
        broken = await admin.call("GET", "/records/" + record_id)
        self.assertEqual((broken.status, broken.error["code"]), (500, "bad_record"))
        self.assertEqual(
            broken.error["message"], "The stored record cannot be read; the proxy's log says why."
        )

    async def test_status(self) -> None:
        """/admin/status: readiness, the sinks' queues, the store version in use."""
        _, admin, _ = await self.start()
        await admin.call("POST", "/upstreams/file/disable")
        status = await admin.get("/status")
        self.assertEqual((status["object"], status["hostname"]), ("status", "admin-test"))
        self.assertGreater(status["store_version"], 0)
        self.assertIn("sql", status["sinks"])

    async def test_no_store(self) -> None:
        """With dbtype none the API reads the config; a change or a query is 409 no_store."""
        _, admin, fake = await self.start(dbtype="none", dbaddr=None)
        self.assertEqual(len((await admin.get("/upstreams"))["data"]), 1)
        for method, path, body in (
            ("POST", "/upstreams", {"name": "x", "endpoint": fake.endpoint}),
            ("POST", "/upstreams/file/disable", None),
            ("GET", "/records", None),
        ):
            answer = await admin.call(method, path, body)
            self.assertEqual((answer.status, answer.error["code"]), (409, "no_store"), path)


class PostgresAdminAPITests(AdminAPITests):
    """The same, the store in PostgreSQL."""

    def database(self) -> dict[str, Any]:
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running on 127.0.0.1:5432")
        schema = f"oaproxy_admin_{uuid.uuid4().hex[:12]}"
        return {"dbtype": "postgres", "dbaddr": postgres_schema(self, schema, POSTGRES_DSN)}


class UnreadableAtStartTests(ProxyCase):
    timeout = 30

    def test_load_without_store(self) -> None:
        """A store that cannot be read at start leaves the file alone, to be followed."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "db.sqlite"))
        path = os.path.join(directory, "config.yaml")
        write_yaml(
            path,
            proxy_config(
                "t",
                {"alice": CLIENT_KEY},
                [{"name": "file", "endpoint": "https://file.test/v1"}],
                dbtype="sqlite",
                dbaddr=os.path.join(directory, "db.sqlite"),
            ),
        )
        self.assertRaises(StoreUnreadable, load, path, create_store=True)
        loaded = load(path, create_store=True, without_store=True)
        self.assertIs(loaded.stored, UNREAD)
        self.assertEqual([u.name for u in loaded.config.upstreams], ["file"])

    async def test_applied_once_readable(self) -> None:
        """A daemon that could not read its store applies it at its first successful look."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "config.yaml")
        write_yaml(
            path,
            proxy_config(
                "t",
                {"alice": CLIENT_KEY},
                [{"name": "file", "endpoint": "https://file.test/v1"}],
                dbtype="sqlite",
                dbaddr=os.path.join(directory, "db.sqlite"),
                store_poll_interval=60,
            ),
        )
        file = load(path, create_store=True).file
        connection = open_database("sqlite", file.dbaddr)
        secret = new_key_secret()
        take_change(connection.cursor(), "sqlite", add_key(context(file), {"name": "late"}, secret))
        connection.commit()
        connection.close()
        service = ProxyService(file, reactor, ("tcp:0:interface=127.0.0.1",), stored=UNREAD)
        service.startService()
        self.addCleanup(service.stopService)
        await wait_for(lambda: service.sources.stored.version > 0, timeout=10)
        caller = service.generation.router.authenticate(b"Bearer " + secret.encode())
        self.assertEqual(caller.key.name if caller.key else None, "late")
