"""The dashboard in a real browser: headless Chromium (Debian's
``/usr/bin/chromium``, installed by ``.ci/run``) driven by Playwright, on the
service in the test's reactor.

One walk through it, as an operator would: log in; see the upstream
``file`` healthy, then open after failures injected into its fake; make a
key on the Keys page and use it through the ``openai`` SDK; find that
request on the Requests page and open it; see its prompt, a
``<script>alert(1)</script>``, shown as text with no dialog; log out.

The browser runs in a thread of its own (Playwright's sync API blocks); the
reactor serves meanwhile.  A screenshot of each page is saved under the
trial temp directory, in ``dashboard-screenshots/`` (not committed).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import openai
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread

from tests.adminclient import ADMIN_KEY, STORE_KEY
from tests.fakeupstream import FAKE_MODEL, Status
from tests.live import ProxyCase, RunningProxy, chat, reactor, unavailable, wait_for
from tests.payloads import CLIENT_KEY, proxy_config

CHROMIUM = "/usr/bin/chromium"
PROMPT = "<script>alert(1)</script>"
#: Where the screenshots go, in the trial run's directory (_trial_temp/).
SCREENSHOTS = "dashboard-screenshots"


def _playwright() -> Any:
    if shutil.which("chromium") is None and not os.path.exists(CHROMIUM):
        unavailable("chromium is not installed (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    return sync_playwright


class BrowserTests(ProxyCase):
    timeout = 120
    client_key = CLIENT_KEY

    async def start(self) -> tuple[RunningProxy, Any]:
        self.fake_file = await self.fake()
        self.fake_spare = await self.fake()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = proxy_config(
            "browser-test",
            {"alice": CLIENT_KEY},
            [
                {"name": "file", "endpoint": self.fake_file.endpoint, "sk": "sk-file-0123456789"},
                {
                    "name": "spare",
                    "endpoint": self.fake_spare.endpoint,
                    "sk": "sk-spare-0123456789",
                },
            ],
            admin_key=ADMIN_KEY,
            store_key=STORE_KEY,
            dbtype="sqlite",
            dbaddr=os.path.join(directory, "db.sqlite"),
            breaker={"failures": 3, "cooldown": 600},
            prices={FAKE_MODEL: {"input": 1, "output": 2}},
        )
        proxy = await self.start_proxy(config, self.mktemp() + ".yaml")
        return proxy, proxy.service.sinks["sql"]

    def sdk_call(self, proxy: RunningProxy, key: str, prompt: str | None = None) -> Any:
        """A chat through the SDK, from the browser's thread."""
        with openai.OpenAI(
            base_url=proxy.base_url,
            api_key=key,
            max_retries=0,
            timeout=15,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        ) as client:
            if prompt is None:
                return chat(client)
            return client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": prompt}]
            )

    def wait_written(self, sink: Any, count: int) -> None:
        """Block the browser's thread until the SQL sink wrote ``count`` records."""

        def written() -> Any:
            return ensureDeferred(wait_for(lambda: sink.written >= count, timeout=10))

        blockingCallFromThread(reactor, written)

    async def test_walk_through(self) -> None:
        """Log in, watch a circuit open, make and use a key, open its request, log out."""
        sync_playwright = _playwright()
        proxy, sink = await self.start()
        await deferToThread(self.walk, sync_playwright, proxy, sink)

    def walk(self, sync_playwright: Any, proxy: RunningProxy, sink: Any) -> None:
        # Read now: trial runs the tests in its temp directory.
        directory = os.path.abspath(SCREENSHOTS)
        os.makedirs(directory, exist_ok=True)
        origin = f"http://127.0.0.1:{proxy.port}"
        dialogs: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})

                def dialog_opened(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", dialog_opened)
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

                def shot(name: str) -> None:
                    page.screenshot(path=os.path.join(directory, f"{name}.png"), full_page=True)

                # Log in: any page sends to the form first.
                page.goto(f"{origin}/admin/ui/")
                assert page.url.endswith("/admin/ui/login"), page.url
                shot("1-login")
                page.fill("input[name=admin_key]", "wrong-key")
                page.click("button[type=submit]")
                assert "Wrong admin key." in page.inner_text("main")
                page.fill("input[name=admin_key]", ADMIN_KEY)
                page.click("button[type=submit]")
                assert page.url.endswith("/admin/ui/"), page.url
                circuit = page.locator("td [data-circuit]").first
                assert circuit.get_attribute("data-circuit") == "closed"
                shot("2-overview-healthy")

                # Failures injected into file's fake: each request fails over to
                # spare, and after three the circuit of file opens.
                blockingCallFromThread(
                    reactor, self.fake_file.script, Status(500), Status(500), Status(500)
                )
                for _ in range(3):
                    self.sdk_call(proxy, CLIENT_KEY)
                page.reload()
                assert (
                    page.locator("td [data-circuit]").first.get_attribute("data-circuit") == "open"
                )
                shot("3-overview-open")

                # A key made on the Keys page, its secret shown once, used by the SDK.
                page.click("nav >> text=Keys")
                page.fill("form.create input[name=name]", "browser-key")
                page.fill("form.create input[name=rate_limit]", "60/minute")
                page.click("form.create button[type=submit]")
                secret = page.inner_text("#new-secret")
                assert secret.startswith("sk-oaproxy-"), secret
                shot("4-keys-new-secret")
                answer = self.sdk_call(proxy, secret, PROMPT)
                assert answer.choices[0].message.content
                self.wait_written(sink, 4)

                # Its request found on the Requests page, filtered by its key, opened.
                page.click("nav >> text=Requests")
                page.select_option("select[name=key]", "browser-key")
                page.click("form.filters button[type=submit]")
                rows = page.locator("tbody tr")
                assert rows.count() == 1, rows.count()
                shot("5-requests")
                rows.first.locator("a").first.click()
                assert "/admin/ui/requests/" in page.url
                body = page.inner_text("pre.body >> nth=0")
                assert PROMPT in body, body
                assert page.locator("script:not([src])").count() == 0
                assert dialogs == [], dialogs
                assert "spare" in page.inner_text("main")
                shot("6-request")

                for name in ("Usage", "Upstreams", "Overview"):
                    page.click(f"nav >> text={name}")
                    assert page.locator("h1").inner_text() == name
                    shot(f"7-{name.lower()}")
                assert dialogs == [], dialogs
                assert not [e for e in errors if "Content Security Policy" in e], errors

                # Log out: the pages are closed again.
                page.click("nav button:has-text('Log out')")
                assert page.url.endswith("/admin/ui/login"), page.url
                page.goto(f"{origin}/admin/ui/keys")
                assert page.url.endswith("/admin/ui/login"), page.url
                shot("8-logged-out")
            finally:
                browser.close()
