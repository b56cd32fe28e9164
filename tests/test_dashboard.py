"""The dashboard on a real socket, the service in the test's reactor, the
store in sqlite: every route, the login and its cookie, Bearer, CSRF on
every POST, the headers, escaping of what users control, the forms."""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import openai

from oaproxy.dashboard.resource import CSP
from tests.adminclient import ADMIN_KEY
from tests.dashboardclient import DashboardClient, Page, page_text
from tests.fakeupstream import FAKE_MODEL
from tests.live import (
    POSTGRES_DSN,
    SHARED_POSTGRES,
    RunningProxy,
    chat,
    postgres_schema,
    reachable,
    unavailable,
    wait_for,
)
from tests.payloads import CLIENT_KEY
from tests.test_admin_api import AdminCase

PAGES = (
    "/admin/ui/",
    "/admin/ui/usage",
    "/admin/ui/usage?period=day&stack=model",
    "/admin/ui/usage?period=month",
    "/admin/ui/requests",
    "/admin/ui/requests?key=alice&outcome=ok&since=1h",
    "/admin/ui/upstreams",
    "/admin/ui/keys",
)
#: Every state-changing route, with fields that would change something.
POSTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("/admin/ui/upstreams", {"name": "new", "endpoint": "http://127.0.0.1:9/v1", "enabled": "on"}),
    ("/admin/ui/upstreams/file/disable", {}),
    ("/admin/ui/upstreams/file/enable", {}),
    ("/admin/ui/upstreams/file/remove", {}),
    ("/admin/ui/keys", {"name": "carol"}),
    ("/admin/ui/keys/alice/remove", {}),
    ("/admin/ui/logout", {}),
)


class DashboardCase(AdminCase):
    async def logged_in(self, **top: Any) -> tuple[RunningProxy, DashboardClient]:
        proxy, _, _ = await self.start(**top)
        browser = DashboardClient(proxy.port)
        answer = await browser.login()
        self.assertEqual((answer.status, answer.header("location")), (303, "/admin/ui/"))
        return proxy, browser

    def assert_page(self, page: Page, status: int = 200) -> None:
        self.assertEqual(page.status, status, page_text(page.text).split("Log out")[-1][:600])
        self.assertEqual(page.header("content-security-policy"), CSP)
        self.assertEqual(page.header("cache-control"), "no-store")
        self.assertEqual(page.header("content-type"), "text/html; charset=utf-8")
        self.assertEqual(page.header("x-frame-options"), "DENY")

    async def records(self, proxy: RunningProxy, count: int) -> None:
        sink = proxy.service.sinks["sql"]
        await wait_for(lambda: sink.written >= count, timeout=10)


class DoorTests(DashboardCase):
    async def test_off_without_admin_key(self) -> None:
        """Without admin_key the dashboard is a 404 like any unknown path."""
        proxy, _, _ = await self.start(admin_key=None)
        browser = DashboardClient(proxy.port)
        for path in ("/admin/", "/admin/ui/", "/admin/ui/login", "/admin/ui/static/dashboard.js"):
            self.assertEqual((await browser.get(path)).status, 404, path)

    async def test_admin_root_and_no_session(self) -> None:
        """/admin/ sends to the dashboard; each page without a session to the login form."""
        proxy, _, _ = await self.start()
        browser = DashboardClient(proxy.port)
        root = await browser.get("/admin/")
        self.assertEqual((root.status, root.header("location")), (303, "/admin/ui/"))
        for path in (*PAGES, "/admin/ui/requests/some-id", "/admin/ui/nothing"):
            answer = await browser.get(path)
            self.assertEqual((answer.status, answer.header("location")), (303, "/admin/ui/login"))
        for path, fields in POSTS:
            answer = await browser.post(path, fields)
            self.assertEqual(answer.status, 303, path)
        self.assertEqual((await self.admin_get(proxy, "/upstreams"))["data"][0]["enabled"], True)

    async def admin_get(self, proxy: RunningProxy, path: str) -> Any:
        from tests.adminclient import AdminClient

        return await AdminClient(proxy.port).get(path)

    async def test_login_cookie(self) -> None:
        """The session cookie is HttpOnly, SameSite=Strict, on /admin/, for dashboard_session
        seconds, not Secure over plain HTTP; the login form's nonce cookie likewise."""
        proxy, _, _ = await self.start(dashboard_session=600)
        browser = DashboardClient(proxy.port)
        form = await browser.get("/admin/ui/login")
        self.assert_page(form)
        [nonce] = form.set_cookies
        self.assertIn("HttpOnly", nonce)
        self.assertIn("SameSite=strict", nonce)
        self.assertNotIn("Secure", nonce)
        answer = await browser.post("/admin/ui/login", {"csrf": form.csrf, "admin_key": ADMIN_KEY})
        [session] = [c for c in answer.set_cookies if c.startswith("oaproxy_session=")]
        for part in ("HttpOnly", "SameSite=strict", "Path=/admin/", "Max-Age=600"):
            self.assertIn(part, session)
        self.assertNotIn("Secure", session)
        self.assertNotIn(ADMIN_KEY, session)
        self.assert_page(await browser.get("/admin/ui/"))

    async def test_wrong_key_is_one_answer(self) -> None:
        """Whatever is wrong with the key (none, empty, short, long, almost, not UTF-8),
        the answer is the same 401 page, and no session."""
        proxy, _, _ = await self.start()
        bodies = set()
        for wrong in (
            None,
            b"",
            b"a",
            b"x" * 5000,
            ADMIN_KEY[:-1].encode(),
            b"\xff\xfe",
            CLIENT_KEY.encode(),
        ):
            browser = DashboardClient(proxy.port)
            form = await browser.get("/admin/ui/login")
            fields = f"csrf={form.csrf}".encode()
            if wrong is not None:
                from urllib.parse import quote_from_bytes

                fields += b"&admin_key=" + quote_from_bytes(wrong).encode()
            answer = await browser.request("POST", "/admin/ui/login", raw=fields)
            self.assert_page(answer, 401)
            self.assertNotIn("oaproxy_session", browser.cookies)
            bodies.add(re.sub(r'value="[0-9a-f]+"', "", answer.text))
        self.assertEqual(len(bodies), 1)
        self.assertIn("Wrong admin key.", bodies.pop())
        bearer = await DashboardClient(proxy.port).get("/admin/ui/", bearer="wrong")
        self.assert_page(bearer, 401)
        self.assertIn("Wrong admin key.", bearer.text)

    async def test_login_needs_its_token(self) -> None:
        """A login post without the form's token, or with another browser's, is refused
        even with the right key: another site cannot log a browser in."""
        proxy, _, _ = await self.start()
        browser = DashboardClient(proxy.port)
        other = await DashboardClient(proxy.port).get("/admin/ui/login")
        await browser.get("/admin/ui/login")
        for fields in ({"admin_key": ADMIN_KEY}, {"admin_key": ADMIN_KEY, "csrf": other.csrf}):
            answer = await browser.post("/admin/ui/login", fields)
            self.assert_page(answer, 403)
            self.assertNotIn("oaproxy_session", browser.cookies)

    async def test_logout(self) -> None:
        """Logging out ends the session: the same cookie, kept, no longer opens a page."""
        proxy, browser = await self.logged_in()
        kept = dict(browser.cookies)
        overview = await browser.get("/admin/ui/")
        answer = await browser.post("/admin/ui/logout", {"csrf": overview.csrf})
        self.assertEqual((answer.status, answer.header("location")), (303, "/admin/ui/login"))
        self.assertNotIn("oaproxy_session", browser.cookies)
        replay = DashboardClient(proxy.port)
        replay.cookies = kept
        self.assertEqual((await replay.get("/admin/ui/")).status, 303)

    async def test_forged_cookie(self) -> None:
        """A session cookie changed in any part opens nothing."""
        proxy, browser = await self.logged_in()
        session_id, expires, mac = browser.cookies["oaproxy_session"].split(".")
        for forged in (
            f"{session_id}.{int(expires) + 9999}.{mac}",
            f"{'0' * 32}.{expires}.{mac}",
            f"{session_id}.{expires}.{'0' * 64}",
            "garbage",
        ):
            other = DashboardClient(proxy.port)
            other.cookies = {"oaproxy_session": forged}
            self.assertEqual((await other.get("/admin/ui/")).status, 303, forged)

    async def test_bearer(self) -> None:
        """Authorization: Bearer <admin_key> opens every page; its posts need the token too."""
        proxy, _, _ = await self.start()
        browser = DashboardClient(proxy.port)
        for path in PAGES:
            self.assert_page(await browser.get(path, bearer=ADMIN_KEY))
        refused = await browser.post("/admin/ui/keys", {"name": "carol"}, bearer=ADMIN_KEY)
        self.assert_page(refused, 403)
        token = (await browser.get("/admin/ui/keys", bearer=ADMIN_KEY)).csrf
        made = await browser.post(
            "/admin/ui/keys", {"name": "carol", "csrf": token}, bearer=ADMIN_KEY
        )
        self.assert_page(made)
        self.assertIn("sk-oaproxy-", made.text)

    async def test_another_authorization_scheme(self) -> None:
        """An ``Authorization`` that is not Bearer (``Basic``, from an auth
        proxy in front) leaves it to the session cookie: pages open with
        one, and without one the browser is sent to the login form."""
        proxy, browser = await self.logged_in()
        basic = "Basic " + base64.b64encode(b"alice:proxy-password").decode("ascii")
        for path in PAGES:
            self.assert_page(await browser.get(path, authorization=basic))
        token = (await browser.get("/admin/ui/keys", authorization=basic)).csrf
        made = await browser.post(
            "/admin/ui/keys", {"name": "carol", "csrf": token}, authorization=basic
        )
        self.assert_page(made)
        stranger = DashboardClient(proxy.port)
        sent = await stranger.get("/admin/ui/", authorization=basic)
        self.assertEqual((sent.status, sent.header("location")), (303, "/admin/ui/login"))

    async def test_csrf_on_every_post(self) -> None:
        """Every POST without the token, or with another session's, changes nothing (403)."""
        proxy, browser = await self.logged_in()
        other = DashboardClient(proxy.port)
        await other.login()
        foreign = (await other.get("/admin/ui/")).csrf
        for path, fields in POSTS:
            for token in (None, foreign, "0" * 64):
                given = dict(fields) if token is None else {**fields, "csrf": token}
                self.assert_page(await browser.post(path, given), 403)
        self.assert_page(await browser.get("/admin/ui/"))
        upstreams = await self.admin_get(proxy, "/upstreams")
        self.assertEqual([(u["name"], u["enabled"]) for u in upstreams["data"]], [("file", True)])
        keys = await self.admin_get(proxy, "/keys")
        self.assertEqual(sorted(k["name"] for k in keys["data"]), ["alice", "bob"])

    async def test_static_and_methods(self) -> None:
        """The script and style sheet are served with their types; others 404; PUT 405."""
        _, browser = await self.logged_in()
        script = await browser.get("/admin/ui/static/dashboard.js")
        self.assertEqual((script.status, script.header("content-type")), (200, "text/javascript"))
        self.assertIn("data-confirm", script.text)
        style = await browser.get("/admin/ui/static/dashboard.css")
        self.assertEqual(style.header("content-type"), "text/css; charset=utf-8")
        self.assertEqual((await browser.get("/admin/ui/static/../resource.py")).status, 404)
        self.assertEqual((await browser.get("/admin/ui/static/x.js")).status, 404)
        self.assertEqual((await browser.get("/admin/ui/nothing")).status, 404)
        self.assertEqual((await browser.request("PUT", "/admin/ui/")).status, 405)
        for page in PAGES:
            text = (await browser.get(page)).text
            self.assertNotIn("<script>", text)
            self.assertNotIn(" style=", text)
            # Nothing loaded from elsewhere.
            self.assertEqual(re.findall(r'(?:src|href)="(?!/admin/ui/|\?|#)', text), [])

    async def test_without_store(self) -> None:
        """With dbtype none, Overview and the forms' pages work; the record pages say why not."""
        _, browser = await self.logged_in(dbtype="none", dbaddr=None, store_key=None)
        self.assert_page(await browser.get("/admin/ui/"))
        self.assert_page(await browser.get("/admin/ui/keys"))
        for path in ("/admin/ui/usage", "/admin/ui/requests", "/admin/ui/requests/x"):
            answer = await browser.get(path)
            self.assert_page(answer, 409)
            self.assertIn("no SQL store", answer.text)


class PageTests(DashboardCase):
    async def test_every_page(self) -> None:
        """Each page renders, with what the proxy did: upstreams, a record, usage."""
        proxy, browser = await self.logged_in(prices={FAKE_MODEL: {"input": 1, "output": 2}})
        await self.sdk(proxy, chat)
        await self.records(proxy, 1)
        for path in PAGES:
            self.assert_page(await browser.get(path))
        overview = page_text((await browser.get("/admin/ui/")).text)
        self.assertIn("file", overview)
        self.assertIn("closed", overview)
        self.assertIn("100.0% of 1", overview)
        self.assertIn("1 requests in the last hour", overview)
        usage = page_text((await browser.get("/admin/ui/usage?period=day")).text)
        self.assertIn("alice", usage)
        self.assertIn(FAKE_MODEL, usage)
        listing = await browser.get("/admin/ui/requests")
        [record_id] = re.findall(r'href="/admin/ui/requests/([^"]+)"', listing.text)
        record = await browser.get(f"/admin/ui/requests/{record_id}")
        self.assert_page(record)
        text = page_text(record.text)
        for part in ("Attempts", "file", "200", "Request body", "Answer"):
            self.assertIn(part, text)
        self.assertIn("<svg", record.text)
        self.assert_no_secret(record.text, listing.text, secrets=(CLIENT_KEY,))
        self.assert_page(await browser.get("/admin/ui/requests/nothing-like-it"), 404)

    async def test_requests_filters_and_pages(self) -> None:
        """Filters by key and outcome; a page of 50, then the older records' page."""
        proxy, browser = await self.logged_in()
        for _ in range(3):
            await self.sdk(proxy, chat)
        await self.records(proxy, 3)
        none = await browser.get("/admin/ui/requests?key=bob")
        self.assertIn("No record matches.", none.text)
        self.assertEqual(
            len(
                re.findall(
                    r'href="/admin/ui/requests/',
                    (await browser.get("/admin/ui/requests?key=alice&outcome=ok")).text,
                )
            ),
            3,
        )
        self.assertIn(
            "No record matches.", (await browser.get("/admin/ui/requests?outcome=exhausted")).text
        )
        bad = await browser.get("/admin/ui/requests?since=yesterday-ish")
        self.assert_page(bad, 400)
        self.assertIn("since:", page_text(bad.text))
        paged = await browser.get("/admin/ui/requests?limit=2")
        [older] = re.findall(r'class="next" href="([^"]+)"', paged.text)
        rest = await browser.get(older.replace("&amp;", "&"))
        self.assertEqual(len(re.findall(r'href="/admin/ui/requests/[^"?]', rest.text)), 1)

    async def test_escaping(self) -> None:
        """A prompt, a model and a key name with markup show as text, never as markup."""
        proxy, browser = await self.logged_in()
        attack = "<script>alert(1)</script>"
        # (A name has no "/".)
        name = "k<img src=x onerror=alert(2)>"
        made = await browser.submit("/admin/ui/keys", "/admin/ui/keys", {"name": name})
        self.assert_page(made)
        secret = re.search(r'<code id="new-secret">([^<]+)</code>', made.text)
        assert secret is not None

        def ask(client: openai.OpenAI) -> Any:
            return client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": attack}]
            )

        await self.sdk(proxy, ask, key=secret[1])
        await self.records(proxy, 1)
        pages = [
            await browser.get(p)
            for p in ("/admin/ui/keys", "/admin/ui/requests", "/admin/ui/usage")
        ]
        listing = pages[1]
        [record_id] = re.findall(r'href="/admin/ui/requests/([^"]+)"', listing.text)
        pages.append(await browser.get(f"/admin/ui/requests/{record_id}"))
        for page in pages:
            self.assertNotIn("<img src=x", page.text)
            self.assertIn("k&lt;img src=x onerror=alert(2)&gt;", page.text)
        for page in pages[1:]:
            self.assertNotIn("<script>alert", page.text)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", pages[-1].text)

    async def test_key_form(self) -> None:
        """A key made on the form: its secret shown once, working through the SDK; removed."""
        proxy, browser = await self.logged_in(prices={FAKE_MODEL: {"input": 1, "output": 2}})
        made = await browser.submit(
            "/admin/ui/keys",
            "/admin/ui/keys",
            {"name": "carol", "rate_limit": "60/minute", "budget": "5", "budget_measure": "usd"},
        )
        self.assert_page(made)
        secret = re.search(r'<code id="new-secret">([^<]+)</code>', made.text)
        assert secret is not None
        self.assertNotIn(secret[1], (await browser.get("/admin/ui/keys")).text)
        answer = await self.sdk(proxy, chat, key=secret[1])
        self.assertEqual(answer.model, FAKE_MODEL)
        budgets = page_text((await browser.get("/admin/ui/usage")).text)
        self.assertIn("carol", budgets)
        self.assertIn("of $5.00", budgets)
        refused = await browser.submit("/admin/ui/keys", "/admin/ui/keys", {"name": "carol"})
        self.assert_page(refused, 400)
        self.assertIn("a client key named 'carol' exists", page_text(refused.text))
        gone = await browser.submit("/admin/ui/keys", "/admin/ui/keys/carol/remove", {})
        self.assertIn("Key carol removed.", gone.text)
        self.assertNotIn("carol", re.sub(r"Key carol removed\.", "", gone.text))

    async def test_upstream_forms(self) -> None:
        """Add an upstream, disable and enable the file's, remove the one added."""
        proxy, browser = await self.logged_in()
        fake = await self.fake()
        added = await browser.submit(
            "/admin/ui/upstreams",
            "/admin/ui/upstreams",
            {
                "name": "extra",
                "endpoint": fake.endpoint,
                "sk": "sk-extra-0123456789",
                "allow": "m1, m2",
                "enabled": "on",
            },
        )
        self.assert_page(added)
        self.assertIn("Upstream extra added.", added.text)
        self.assertNotIn("sk-extra-0123456789", added.text)
        listed = await self.admin_upstream(proxy, "extra")
        self.assertEqual(listed["settings"]["allow"], ["m1", "m2"])
        off = await browser.submit("/admin/ui/upstreams", "/admin/ui/upstreams/file/disable", {})
        self.assertIn("Upstream file disabled.", off.text)
        self.assertFalse((await self.admin_upstream(proxy, "file"))["enabled"])
        await browser.submit("/admin/ui/upstreams", "/admin/ui/upstreams/file/enable", {})
        self.assertTrue((await self.admin_upstream(proxy, "file"))["enabled"])
        refused = await browser.submit("/admin/ui/upstreams", "/admin/ui/upstreams/file/remove", {})
        self.assert_page(refused, 400)
        removed = await browser.submit(
            "/admin/ui/upstreams", "/admin/ui/upstreams/extra/remove", {}
        )
        self.assertIn("Upstream extra removed.", removed.text)
        bad = await browser.submit(
            "/admin/ui/upstreams", "/admin/ui/upstreams", {"name": "x", "settings": "[1]"}
        )
        self.assertIn("settings: expected a JSON object", bad.text)

    async def admin_upstream(self, proxy: RunningProxy, name: str) -> Any:
        from tests.adminclient import AdminClient

        found = await AdminClient(proxy.port).upstream(name)
        assert found is not None
        return found


class PostgresPageTests(PageTests):
    """The same pages and forms, the store in PostgreSQL."""

    def database(self) -> dict[str, Any]:
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running on 127.0.0.1:5432")
        schema = f"oaproxy_dashboard_{uuid.uuid4().hex[:12]}"
        return {"dbtype": "postgres", "dbaddr": postgres_schema(self, schema, POSTGRES_DSN)}
